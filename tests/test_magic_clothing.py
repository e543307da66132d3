"""Magic Clothing: parity with every run recorded from the official code (diffusers 0.25.1,
`../shared/fixtures/magic_clothing/`), the released extractor layout both ways, garment masks,
and the sampling CLI.

Per run: token ids equal; text embeddings, garment latent and features, and every branch's eps
at every step (our full chain, fed the recorded UNet input) <= 1e-4; latents after every step
and the decoded image <= 1e-3; uint8 within 1 level. One model and one set of compiled programs
serve the whole module (same shapes in every run).
"""

import json
import os

import numpy as np
import pytest
from conftest import shared_path

from leffa_jax.systems import magic_clothing as mc_lib
from leffa_jax.weights.tensor_io import CheckpointError, TensorSource, write_safetensors

RUNS = ("generate_official", "joint_default", "joint_sg1", "joint_st1_nocfg",
        "standard_512mode", "joint_ddim", "joint_deis_base_default")
STEPPER = {"UniPCMultistepScheduler": "unipc", "DDIMScheduler": "ddim",
           "DEISMultistepScheduler": "deis"}
BRANCHES = {("joint", True): ("uncond", "cloth", "text"), ("standard", True): ("uncond", "cond"),
            ("joint", False): ("cond",)}


def fixture(*parts):
    return shared_path("fixtures", "magic_clothing", *parts)


def nhwc(a):
    a = np.asarray(a)
    return np.moveaxis(a, -3, -1)


@pytest.fixture(scope="module")
def mc():
    return mc_lib.load_magic_clothing(fixture("model"), fixture("garment_extractor.safetensors"))


@pytest.fixture(scope="module")
def meta():
    return json.loads(fixture("meta.json").read_text())["runs"]


@pytest.fixture(scope="module")
def garments():
    g = np.load(fixture("garments.npz"))
    return [g["cloth_image_0"], g["cloth_image_1"]], [g["cloth_mask_0"], g["cloth_mask_1"]]


def run_settings(run, meta, garments):
    """generate() keywords reproducing a recorded run."""
    m, (images, masks) = meta[run], garments
    common = dict(height=32, width=24, steps=m["steps"], scheduler=STEPPER[m["scheduler"]],
                  guidance=m["sT"], garment_scale=m["sG"] or 0.0, mode=m["mode"],
                  negative_prompt=m["negative_prompt"])
    if run == "generate_official":  # the literal generate() call: default prompt, 2 images
        return dict(common, garment=images[0], garment_mask_image=masks[0], prompt=None,
                    num_images_per_prompt=2)
    return dict(common, garment=images, garment_mask_image=masks, prompt=list(m["prompts"]),
                a_prompt=None)


def test_released_extractor_is_read_whole(mc):
    """Every UNet key is in the fixture file (no fallback), and it is not the denoiser."""
    assert mc.fallback_keys == ()
    w_ext = np.asarray(mc.model.extractor.conv_in.kernel[...])
    w_den = np.asarray(mc.model.unet.conv_in.kernel[...])
    assert not np.array_equal(w_ext, w_den)


@pytest.mark.parametrize("run", RUNS)
def test_official_run(mc, meta, garments, run):
    d = np.load(fixture(f"{run}.npz"))
    m = meta[run]
    kw = run_settings(run, meta, garments)
    out = mc_lib.generate(mc, init_noise=nhwc(d["init_latents"]), return_latents=True, **kw)
    errors = {}
    # tokens
    prompts = list(m["prompts"])
    np.testing.assert_array_equal(mc_lib.tokenize(mc, prompts[:len(d["cond_input_ids"])]),
                                  d["cond_input_ids"])
    np.testing.assert_array_equal(mc_lib.tokenize(mc, [m["negative_prompt"]]),
                                  d["negative_input_ids"][:1])
    np.testing.assert_array_equal(mc_lib.tokenize(mc, [""]), d["null_input_ids"])
    # conditions (the same compiled program generate() ran)
    opts = mc_lib.options_for(mc, m["mode"], m["sT"])
    index = d["garment_index_per_sample"]
    b = len(index)
    text, null, latent, feats = mc_lib.encode(
        mc, [m["negative_prompt"]] * b + prompts, out.garment_pixels[out.garment_index], opts)
    np.testing.assert_array_equal(out.garment_index, index)
    ref_pixels = nhwc(d["garment_pixels"])
    errors["garment_pixels"] = np.abs(out.garment_pixels - ref_pixels).max()
    cond = d["cond_prompt_embeds"][np.arange(b) % len(d["cond_prompt_embeds"])]
    errors["text_embeddings"] = max(
        np.abs(np.asarray(text[b:]) - cond).max(),
        np.abs(np.asarray(text[:b]) - d["negative_prompt_embeds"][0]).max(),
        np.abs(np.asarray(null) - d["null_prompt_embeds"]).max())
    ref_latent = nhwc(d["garment_latent"])
    errors["garment_latent"] = np.abs(np.asarray(latent) - ref_latent[index % len(ref_latent)]).max()
    names = list(d["garment_feature_names"])
    assert len(names) == len(feats)
    errors["garment_features"] = max(np.abs(np.asarray(f) - d[f"garment_feat_{i:02d}"]).max()
                                     for i, f in enumerate(feats))
    # every branch at every step, on the recorded UNet input. One compiled call serves every
    # mode: the joint layout [neg|0, neg|g, pos|g] holds the branches of all three
    branch_names = tuple(d["branch_names"])
    assert branch_names == BRANCHES[m["mode"], opts.cfg]
    joint = mc_lib.options_for(mc, "joint", 7.5)
    column = {"uncond": 0, "cloth": 1, "text": 2, "cond": 2}
    branch_err = 0.0
    for s, t in enumerate(d["timesteps"]):
        x = nhwc(d["unet_input"][s][:b])
        eps = mc_lib.branches(mc, x, np.int32(t), text[:b], text[b:], feats, joint)
        for name in branch_names:
            got = np.asarray(eps[column[name]])
            branch_err = max(branch_err, np.abs(got - nhwc(d[f"noise_pred_{name}"][s])).max())
    errors["branch_eps"] = branch_err
    # the trajectory
    np.testing.assert_array_equal(out.timesteps, d["timesteps"].astype(np.int64))
    want = nhwc(d["latents"])
    errors["latents"] = np.abs(out.latents - want).max()
    errors["latents_rel"] = errors["latents"] / np.abs(want).max()
    errors["decoded"] = np.abs(out.decoded - nhwc(d["decoded"])).max()
    errors["uint8"] = np.abs(out.images.astype(int) - d["image_uint8"].astype(int)).max()
    print(run, {k: float(v) for k, v in errors.items()})
    assert errors["garment_pixels"] == 0.0
    for key in ("text_embeddings", "garment_latent", "garment_features", "branch_eps"):
        assert errors[key] <= 1e-4, (run, key, errors)
    for key in ("latents", "decoded"):
        assert errors[key] <= 1e-3, (run, key, errors)
    assert errors["uint8"] <= 1, errors


def test_unet_forward(mc, meta, garments):
    """unet_fwd.npz: the extractor at t = 0 on the garment latent (that of joint_default's
    garments: the same array), then one 3-branch denoiser call at t = 500, garment rows
    [0, g, g]."""
    d = np.load(fixture("unet_fwd.npz"))
    assert int(d["extractor_timestep"]) == 0
    m = meta["joint_default"]
    images, masks = garments
    pixels = np.stack([mc_lib.prepare_garment(g, k, 32, 24)[0]
                       for g, k in zip(images, masks, strict=True)])
    opts = mc_lib.options_for(mc, "joint", 7.5)
    _, null, latent, feats = mc_lib.encode(mc, [m["negative_prompt"]] * 2 + list(m["prompts"]),
                                           pixels, opts)
    err_latent = np.abs(np.asarray(latent) - nhwc(d["garment_latent"])).max()
    err_null = np.abs(np.asarray(null[0]) - d["null_prompt_embeds"]).max()
    err_feat = max(np.abs(np.asarray(f) - d[f"garment_feat_{i:02d}"]).max()
                   for i, f in enumerate(feats))
    ehs = d["encoder_hidden_states"]
    eps = mc_lib.branches(mc, nhwc(d["latent"]), np.int32(d["timestep"]), ehs[0:2], ehs[4:6],
                          feats, opts)
    got = np.concatenate([np.asarray(e) for e in eps])  # chunk-major, as the official batch
    err_eps = np.abs(got - nhwc(d["noise_pred"])).max()
    print("unet_fwd", float(err_latent), float(err_null), float(err_feat), float(err_eps))
    assert max(err_latent, err_null, err_feat, err_eps) <= 1e-4


# -------------------------------------------------------------------------------- weights


def test_extractor_round_trip_bit_exact(mc, tmp_path, capsys):
    out = tmp_path / "extractor.safetensors"
    assert mc_lib.save_extractor(mc, str(out)) == 324
    assert out.read_bytes() == fixture("garment_extractor.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="exists"):
        mc_lib.save_extractor(mc, str(out))
    from leffa_jax import convert

    again = tmp_path / "again.safetensors"
    assert convert.main(["verify-extractor", "--extractor",
                         str(fixture("garment_extractor.safetensors")), "--base",
                         str(fixture("model")), "--out", str(again)]) == 0
    assert "bit-exact for all 324" in capsys.readouterr().out
    assert again.read_bytes() == out.read_bytes()


def test_missing_keys_fall_back_to_the_denoiser(mc, tmp_path):
    """The official strict=False load: a file without the attn2 keys keeps the denoiser's."""
    from leffa_jax.weights.plan_magic_clothing import read_extractor

    src = TensorSource(fixture("garment_extractor.safetensors"))
    keep = [k for k in src.keys() if ".attn2." not in k]
    path = tmp_path / "partial.safetensors"
    write_safetensors(str(path), [(k, src[k]) for k in keep])
    model = mc.model
    extractor, fallback = read_extractor(path, model.unet, model.config_dir)
    assert len(fallback) == len(src.keys()) - len(keep) > 0
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    for name in ("attn2.to_k", "attn1.to_k"):
        got = np.asarray(extractor.down_blocks[0].attentions[0].transformer_blocks[0]
                         .__getattribute__(name.split(".")[0]).to_k.kernel[...])
        ref = src[f"{blk}.{name}.weight"].T
        den = np.asarray(model.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                         .__getattribute__(name.split(".")[0]).to_k.kernel[...])
        np.testing.assert_array_equal(got, den if name.startswith("attn2") else ref)


def test_bad_extractor_files(mc, tmp_path):
    from leffa_jax.weights.plan_magic_clothing import read_extractor

    src = TensorSource(fixture("garment_extractor.safetensors"))
    model = mc.model
    sdxl = tmp_path / "sdxl.safetensors"
    write_safetensors(str(sdxl), [(k, src[k]) for k in src.keys()]
                      + [("add_embedding.linear_1.weight", np.zeros((8, 8), np.float32))])
    with pytest.raises(CheckpointError, match="SDXL"):
        read_extractor(sdxl, model.unet, model.config_dir)
    bad = tmp_path / "misshaped.safetensors"
    write_safetensors(str(bad), [(k, src[k] if k != "conv_in.weight"
                                  else np.zeros((32, 4, 1, 1), np.float32)) for k in src.keys()])
    with pytest.raises(CheckpointError, match=r"conv_in.weight \(32, 4, 1, 1\)"):
        read_extractor(bad, model.unet, model.config_dir)
    empty = tmp_path / "other.safetensors"
    write_safetensors(str(empty), [])
    with pytest.raises(CheckpointError, match="no UNet tensor"):
        read_extractor(empty, model.unet, model.config_dir)
    with pytest.raises(CheckpointError, match="not found"):
        read_extractor(tmp_path / "missing.safetensors", model.unet, model.config_dir)


def test_shipped_denoiser_is_read_whole(mc):
    """The tiny demo's shipped denoiser (float16, flat diffusers layout): diffusers loads it
    strictly into the fixture base's UNet, and `read_denoiser` holds its values (read here with
    the safetensors package) in float32; the base UNet it replaces is left unchanged."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import load_file

    from leffa_jax.systems.magic_clothing_train import BASELINE_DENOISER, BASELINE_DIR
    from leffa_jax.weights.plan_magic_clothing import read_denoiser

    path = os.path.join(BASELINE_DIR, BASELINE_DENOISER)
    ref = load_file(path)
    torch_unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(fixture("model", "unet")))
    torch_unet.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in ref.items()},
                               strict=True)
    before = np.asarray(mc.model.unet.conv_out.kernel[...]).copy()
    unet = read_denoiser(path, mc.model.unet)
    blk = unet.up_blocks[1].attentions[0].transformer_blocks[0]
    for got, key in ((unet.conv_in.kernel, "conv_in.weight"),
                     (blk.attn1.to_q.kernel, "up_blocks.1.attentions.0.transformer_blocks.0"
                                             ".attn1.to_q.weight"),
                     (unet.conv_out.bias, "conv_out.bias")):
        want = ref[key].astype(np.float32)
        want = want.transpose(2, 3, 1, 0) if want.ndim == 4 else want.T
        assert np.asarray(got[...]).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(got[...]), want)
    np.testing.assert_array_equal(np.asarray(mc.model.unet.conv_out.kernel[...]), before)
    # the training start with it: the extractor is a copy of the replaced denoiser
    start = mc_lib.load_magic_clothing(fixture("model"), denoiser=path)
    conv_in = ref["conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0)
    for module in (start.model.unet, start.model.extractor):
        np.testing.assert_array_equal(np.asarray(module.conv_in.kernel[...]), conv_in)


def test_bad_denoiser_files(mc, tmp_path):
    """A denoiser file must hold every key of the base UNet in its shape, and nothing else."""
    from leffa_jax.weights.plan_magic_clothing import read_denoiser

    src = TensorSource(fixture("garment_extractor.safetensors"))
    unet = mc.model.unet
    partial = tmp_path / "partial.safetensors"
    write_safetensors(str(partial), [(k, src[k]) for k in src.keys() if ".attn2." not in k])
    with pytest.raises(CheckpointError, match=r"missing:\n.*attn2"):
        read_denoiser(partial, unet)
    sdxl = tmp_path / "sdxl.safetensors"
    write_safetensors(str(sdxl), [(k, src[k]) for k in src.keys()]
                      + [("add_embedding.linear_1.weight", np.zeros((8, 8), np.float32))])
    with pytest.raises(CheckpointError, match="unexpected:\n *add_embedding"):
        read_denoiser(sdxl, unet)
    bad = tmp_path / "misshaped.safetensors"
    write_safetensors(str(bad), [(k, src[k] if k != "conv_in.weight"
                                  else np.zeros((32, 4, 1, 1), np.float32)) for k in src.keys()])
    with pytest.raises(CheckpointError, match=r"conv_in.weight: \(32, 4, 1, 1\) vs"):
        read_denoiser(bad, unet)


# -------------------------------------------------------------------------------- masks


def test_garment_masks():
    """User mask > alpha channel > plain-background threshold (closed forms)."""
    img = np.full((20, 16, 3), 250, np.uint8)
    img[5:15, 4:12] = (200, 30, 40)
    want = np.zeros((20, 16), np.uint8)
    want[5:15, 4:12] = 255
    np.testing.assert_array_equal(mc_lib.garment_mask(img), want)
    rgba = np.concatenate([img, 255 - want[..., None]], axis=-1)
    np.testing.assert_array_equal(mc_lib.garment_mask(rgba), 255 - want)
    np.testing.assert_array_equal(mc_lib.garment_mask(img, want // 2), want // 2)
    pixels, mask = mc_lib.prepare_garment(img, want, 20, 16)
    np.testing.assert_array_equal(mask, want / 255)
    assert (pixels[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="plain colour"):
        mc_lib.garment_mask(np.full((8, 8, 3), 9, np.uint8))


# -------------------------------------------------------------------------------- CLI


def test_cli_writes_images(tmp_path, garments, mc, monkeypatch):
    """The CLI end to end; the model load is the module's (so the compiled programs of the
    parity runs serve it: same shapes), the --vae folder is read and matches the base's."""
    from PIL import Image

    from leffa_jax import sample
    from leffa_jax.weights.modules import module_to_flat

    vae = mc_lib.load_vae(fixture("model", "vae"))
    for key, value in module_to_flat(mc.model.vae).items():
        np.testing.assert_array_equal(module_to_flat(vae)[key], value)
    calls = []

    def load(base, extractor, vae=None, denoiser=None):
        calls.append((base, extractor, vae, denoiser))
        return mc

    monkeypatch.setattr(mc_lib, "load_magic_clothing", load)
    images, masks = garments
    Image.fromarray(images[0]).save(tmp_path / "g.png")
    Image.fromarray(masks[0]).save(tmp_path / "m.png")
    out = tmp_path / "out"
    args = ["--task", "garment2image", "--base", str(fixture("model")), "--vae",
            str(fixture("model", "vae")), "--extractor",
            str(fixture("garment_extractor.safetensors")), "--garment", str(tmp_path / "g.png"),
            "--denoiser", str(fixture("model", "unet", "diffusion_pytorch_model.safetensors")),
            "--garment-mask", str(tmp_path / "m.png"), "--num-images", "2", "--height", "32",
            "--width", "24", "--no-progress", "--grid", "--out", str(out)]
    assert sample.main(args) == 0
    assert calls == [(str(fixture("model")), str(fixture("garment_extractor.safetensors")),
                      str(fixture("model", "vae")),
                      str(fixture("model", "unet", "diffusion_pytorch_model.safetensors")))]
    files = sorted(os.listdir(out))
    assert files == ["garment2image_000.png", "garment2image_001.png", "garment_mask.png",
                     "grid.png"]
    assert np.asarray(Image.open(out / files[0])).shape == (32, 24, 3)
    rc = sample.main(["--task", "garment2image", "--base", str(fixture("model")),
                      "--extractor", str(tmp_path / "nope.safetensors"),
                      "--garment", str(tmp_path / "g.png"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and not (tmp_path / "o2").exists()
    rc = sample.main(["--task", "garment2image", "--base", str(fixture("model")),
                      "--extractor", str(fixture("garment_extractor.safetensors")),
                      "--denoiser", str(tmp_path / "nope.safetensors"),
                      "--garment", str(tmp_path / "g.png"), "--out", str(tmp_path / "o3")])
    assert rc == 2 and not (tmp_path / "o3").exists()
