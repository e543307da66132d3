"""StoryMaker sampling and weights against the official code's recorded runs
(`../shared/fixtures/storymaker/`): the official preprocessing from the raw photo / mask /
insightface face (CLIP pixels exact), `generate` replaying the recorded initial noise (UniPC with
the leading-spacing quirk, CFG 7.5, ip / LoRA scale 0.8, 128x192): latents after every step,
the decoded image and uint8; a batch of prompts; mask.bin -> leffa_jax adapter -> mask.bin
bit-exact, strict errors.
"""

import numpy as np
import pytest
from storymaker_fixture import cached_system, characters_from_npz, fixture_weights, load_npz

from leffa_jax.systems import storymaker as sm
from leffa_jax.systems import storymaker_inputs as si
from leffa_jax.weights import storymaker as smw
from leffa_jax.weights.tensor_io import CheckpointError

PROMPTS = {"infer_1char.npz": "a person is taking a selfie, the person is wearing a red hat, and "
                              "a volcano is in the distance",
           "infer_2char.npz": "A man and a woman are taking a selfie, and a volcano is in the "
                              "distance"}
NEGATIVE = "bad quality, NSFW, low quality, ugly, disfigured, deformed"


@pytest.fixture(scope="module")
def loaded():
    return cached_system(0.8)


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_preprocessing_matches_the_pipeline(name):
    f = load_npz(name)
    for i, (image, mask, face) in enumerate(characters_from_npz(f)):
        c = si.prepare_character(image, mask, face)
        np.testing.assert_array_equal(c.image_pixels, f["clip_image_pixels"][i].transpose(1, 2, 0))
        np.testing.assert_array_equal(c.face_pixels, f["clip_face_pixels"][i].transpose(1, 2, 0))
        np.testing.assert_array_equal(c.id_embedding, f["proj_in_id_embeds"][i])


@pytest.mark.parametrize("name,prompts", [("infer_1char.npz", 1), ("infer_2char.npz", 2)])
def test_generate_replays_the_official_run(loaded, name, prompts):
    """infer_2char runs as a batch of two identical prompts: both rows must equal the run."""
    system = loaded[0]
    f = load_npz(name)
    ids = system.tokenizers["text_encoder"]([PROMPTS[name], NEGATIVE])["input_ids"]
    ids2 = system.tokenizers["text_encoder_2"]([PROMPTS[name], NEGATIVE])["input_ids"]
    np.testing.assert_array_equal(ids, f["input_ids_1"])
    np.testing.assert_array_equal(ids2, f["input_ids_2"])
    characters = [si.prepare_character(*c) for c in characters_from_npz(f)]
    noise = np.repeat(f["init_noise"].transpose(0, 2, 3, 1), prompts, axis=0)
    out = sm.generate(system, [PROMPTS[name]] * prompts, characters, negative_prompt=NEGATIVE,
                      steps=4, guidance=7.5, ip_scale=0.8, height=128, width=192,
                      init_noise=noise, return_latents=True)
    np.testing.assert_array_equal(out.timesteps, f["timesteps"])
    np.testing.assert_allclose(out.image_tokens, f["prompt_image_emb"], atol=1e-4, rtol=0)
    for row in range(prompts):
        np.testing.assert_allclose(out.latents[:, row], f["latents"][:, 0].transpose(0, 2, 3, 1),
                                   atol=1e-3, rtol=0)
        np.testing.assert_allclose(out.decoded[row], f["decoded"][0].transpose(1, 2, 0),
                                   atol=1e-3, rtol=0)
        diff = np.abs(out.images[row].astype(int) - f["image_uint8"].astype(int))
        assert diff.max() <= 1, diff.max()


def test_adapter_conversion_round_trip(loaded, tmp_path):
    """`convert storymaker-to-flax` then `storymaker-to-torch` (.bin and .safetensors): the
    released layout comes back bit-exact, same keys, processor order."""
    import torch
    from storymaker_fixture import fixture_dir

    from leffa_jax import convert

    _, base, mask = loaded
    adapter = tmp_path / "storymaker.safetensors"
    config = fixture_dir() / "config" / "storymaker_adapter.json"
    assert convert.main(["storymaker-to-flax", "--adapter", str(mask), "--base", str(base),
                         "--adapter-config", str(config), "--out", str(adapter)]) == 0
    assert convert.main(["storymaker-to-flax", "--adapter", str(mask), "--base", str(base),
                         "--adapter-config", str(config), "--out", str(adapter)]) == 2  # exists
    weights = fixture_weights()
    official = {k: v for k, v in weights.items()
                if k.startswith(("image_proj_model.", "ip_adapter."))}
    back, back_st = tmp_path / "mask_back.bin", tmp_path / "mask_back.safetensors"
    for out in (back, back_st):
        assert convert.main(["storymaker-to-torch", "--adapter", str(adapter),
                             "--out", str(out)]) == 0
    state = torch.load(back, weights_only=True)
    assert sorted(state) == ["image_proj_model", "ip_adapter"]
    flat = {f"{p}.{k}": v.numpy() for p, d in state.items() for k, v in d.items()}
    from safetensors.numpy import load_file

    for got in (flat, load_file(str(back_st))):
        assert sorted(got) == sorted(official)
        for key, value in official.items():
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert list(state["ip_adapter"])[:2] == ["0.to_k_lora.down.weight", "0.to_k_lora.up.weight"]


def test_characters_cli_reproduces_the_official_image(loaded, tmp_path, monkeypatch):
    """`python -m leffa_jax.sample --task characters` from files (photo png, mask png, face
    .npz) writes the official run's image (uint8 within 1). The already loaded system stands in
    for the load (same base folder and mask.bin) and the shapes equal the 1-character replay's,
    so the compiled program is reused: keeps the test fast."""
    from leffa_jax import imageio, sample

    system, base, mask = loaded
    f = load_npz("infer_1char.npz")
    specs = []
    for i, (image, mask_image, face) in enumerate(characters_from_npz(f)):
        imageio.save_png(tmp_path / f"c{i}.png", image)
        imageio.save_png(tmp_path / f"m{i}.png", mask_image)
        np.savez(tmp_path / f"f{i}.npz", kps=face.kps, normed_embedding=face.normed_embedding)
        specs += ["--character", f"{tmp_path}/c{i}.png:{tmp_path}/m{i}.png:{tmp_path}/f{i}.npz"]
    calls = []

    def load(*args, **kwargs):
        calls.append((args, kwargs))
        return system

    monkeypatch.setattr(sm, "load_storymaker", load)
    noise = f["init_noise"].transpose(0, 2, 3, 1)
    real_generate = sm.generate
    monkeypatch.setattr(sm, "generate", lambda *a, **k: real_generate(*a, **{**k,
                                                                            "init_noise": noise}))
    out = tmp_path / "out"
    argv = ["--task", "characters", "--base", str(base), "--adapter", str(mask),
            "--prompt", PROMPTS["infer_1char.npz"], *specs, "--steps", "4", "--height", "128",
            "--width", "192", "--dtype", "float32", "--out", str(out), "--no-progress"]
    assert sample.main(argv) == 0
    assert calls[0][1]["lora_scale"] == 0.8
    (written,) = out.glob("000_*.png")
    image = imageio.load_image(written)
    diff = np.abs(image.astype(int) - f["image_uint8"].astype(int))
    assert diff.max() <= 1
    assert sorted(p.name for p in out.iterdir())[-1] == "grid.png"


@pytest.mark.parametrize("change,message", [
    (["--guidance", "1"], "guidance"),
    (["--character", "nope.png:m.png:f.npz"], "does not exist"),
    (["--character", "a.png"], "IMAGE:MASK:FACE"),
    (["--height", "100"], "multiple of 8"),
])
def test_characters_cli_errors(tmp_path, capsys, change, message):
    from leffa_jax import sample

    (tmp_path / "base").mkdir()
    (tmp_path / "mask.bin").write_bytes(b"")
    argv = ["--task", "characters", "--base", str(tmp_path / "base"), "--adapter",
            str(tmp_path / "mask.bin"), "--image-encoder", str(tmp_path), "--prompt", "x",
            "--character", f"{tmp_path}/mask.bin:{tmp_path}/mask.bin:{tmp_path}/mask.bin",
            "--out", str(tmp_path / "out")]
    if change[0] == "--character":
        argv = [a for a in argv if not a.startswith(f"{tmp_path}/mask.bin:")]
        argv.remove("--character")
    assert sample.main(argv + change) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_adapter_file_loads_the_same_model(loaded, tmp_path):
    """save_adapter of the loaded model and reading it back give the loaded parameters."""
    system = loaded[0]
    path = tmp_path / "a.safetensors"
    smw.save_adapter(system.model, str(path))
    cfg, proj, unet = smw.read_adapter(str(path))
    assert cfg == system.model.adapter_config
    have = {".".join(map(str, p)): np.asarray(v[...]) for p, v in
            sm.nnx.to_flat_state(sm.adapter_state(system.model))}
    got = {**{f"image_proj_model.{k}": v for k, v in proj.items()},
           **{f"unet.{k}": v for k, v in unet.items()}}
    assert sorted(have) == sorted(got)
    for key in have:
        np.testing.assert_array_equal(have[key], got[key], err_msg=key)


def test_strict_errors(loaded, tmp_path):
    import torch

    _, base, mask = loaded
    state = torch.load(mask, weights_only=True)
    del state["ip_adapter"]["3.to_k_ip.weight"]
    broken = tmp_path / "broken.bin"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match="1 missing"):
        smw.official_to_adapter(str(broken), str(base), str(tmp_path / "x.safetensors"),
                                config=_fixture_config())
    state = torch.load(mask, weights_only=True)
    state["ip_adapter"]["99.to_q_lora.down.weight"] = torch.zeros(4, 32)
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match="processors"):
        smw.official_to_adapter(str(broken), str(base), str(tmp_path / "x.safetensors"),
                                config=_fixture_config())
    with pytest.raises(CheckpointError, match="mask.bin"):
        smw.read_official(str(tmp_path / "missing.bin"))
    assert not (tmp_path / "x.safetensors").exists()


def test_shapes_give_the_released_widths():
    """Without a config json, widths come from the tensor shapes (dim_head 64 as released):
    the fixture's tiny dim_head 10 / 16 cannot be told from shapes, the rest can."""
    weights = fixture_weights()
    official = {k: v for k, v in weights.items()
                if k.startswith(("image_proj_model.", "ip_adapter."))}
    with pytest.raises(CheckpointError, match="dim_head"):
        smw.config_from_shapes(official)
    cfg = smw.config_from_shapes(official, dim_head=8)
    want = _fixture_config()
    assert (cfg.cross_attention_dim, cfg.clip_embeddings_dim, cfg.lora_rank) == (40, 32, 4)
    assert (cfg.max_characters, cfg.bg_tokens, cfg.tokens_per_character) == (3, 20, 20)
    assert (cfg.perceiver.heads * 8, cfg.perceiver.depth) == (40, want.perceiver.depth)
    assert (cfg.resampler.dim, cfg.resampler.heads * 8) == (48, 48)


def _fixture_config():
    from storymaker_fixture import fixture_dir

    return sm.AdapterConfig.from_json(fixture_dir() / "config" / "storymaker_adapter.json")
