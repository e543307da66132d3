"""Magic Clothing training: the Task trains the extractor only, sharded over the 8 host devices,
resumes from its checkpoint, and exports a released-layout extractor file; the captions reader
and the condition dropout split."""

import os

import numpy as np
import pytest
from conftest import shared_path

from leffa_jax.data.garment_text import read_captions


def _config(tmp_path):
    from leffa_jax.configs import magic_clothing_tiny

    c = magic_clothing_tiny.get_config()
    c.model.base = str(shared_path("fixtures", "magic_clothing", "model"))
    c.model.denoiser = ""        # the paper's setting: the base's own denoiser, frozen,
    c.model.init = "base"        # and the extractor starting as its copy
    c.model.train_denoiser = False
    c.train.steps = 2
    c.train.batch_size = 8
    c.train.garment_drop_prob = c.train.text_drop_prob = c.train.both_drop_prob = 0.25
    c.checkpoint.every = 1
    c.checkpoint.use_async = False
    c.log.every = 1
    c.log.image_every = 0
    c.log.progress_bar = False
    c.data.synthetic.num_train, c.data.synthetic.num_test = 16, 2
    c.data.synthetic.seed = 3
    c.data.root = str(tmp_path / "data")
    return c


@pytest.mark.slow  # one sharded train-step compile (the resumed run reuses it from the cache)
def test_train_resume_export(tmp_path, compilation_cache):
    """With the optional Leffa flow loss on (every attention layer, no timestep gate): loss =
    epsilon MSE + the flow term at every step, the flow term positive and finite."""
    from leffa_jax.systems import make_task
    from leffa_jax.training.loop import train
    from leffa_jax.weights.tensor_io import TensorSource

    config = _config(tmp_path)
    config.leffa.enabled = True
    config.leffa.t_threshold = 1000
    config.leffa.min_ratio = 0.0
    work = str(tmp_path / "work")
    first = train(make_task(config), config, work, max_steps=1)
    assert first.step == 1
    task = make_task(config)
    second = train(task, config, work)  # resumes at step 1
    assert second.step == 2
    rows = first.metrics + second.metrics
    assert len(rows) == 2
    for row in rows:
        assert np.isfinite(row["loss"]) and np.isfinite(row["mse"]) and row["finite"]
        assert np.isfinite(row["leffa"]) and row["leffa"] > 0
        np.testing.assert_allclose(row["loss"], row["mse"] + row["leffa"], rtol=1e-5)
    export = TensorSource(tmp_path / "work" / "export" / "garment_extractor.safetensors")
    assert len(export.keys()) == 324
    # the extractor moved away from its initial value (the denoiser); the denoiser is frozen
    base = TensorSource(shared_path("fixtures", "magic_clothing", "model", "unet",
                                    "diffusion_pytorch_model.safetensors"))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    assert not np.array_equal(export[key], base[key])
    np.testing.assert_array_equal(
        np.asarray(task.mc.model.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                   .attn1.to_k.kernel[...]).T, base[key])
    # the finished run read back (its config.json + export), as the demo and the tools do
    from leffa_jax.systems.magic_clothing_train import trained_task

    _, model = trained_task(config, work)
    for unet, ref in ((model.extractor, export), (model.unet, base)):
        np.testing.assert_array_equal(
            np.asarray(unet.down_blocks[0].attentions[0].transformer_blocks[0]
                       .attn1.to_k.kernel[...]).T, ref[key])


def test_captions_formats(tmp_path):
    (tmp_path / "a.json").write_text('{"00001_00.jpg": "a woman in a red top"}')
    (tmp_path / "b.txt").write_text("# c\n00001_00.jpg\ta woman\n00002_00.jpg,a man, smiling\n")
    (tmp_path / "c.jsonl").write_text('{"file_name": "x.jpg", "text": "t"}\n')
    assert read_captions(str(tmp_path / "a.json")) == {"00001_00.jpg": "a woman in a red top"}
    assert read_captions(str(tmp_path / "b.txt")) == {"00001_00.jpg": "a woman",
                                                      "00002_00.jpg": "a man, smiling"}
    assert read_captions(str(tmp_path / "c.jsonl")) == {"x.jpg": "t"}
    (tmp_path / "bad.txt").write_text("only_a_name\n")
    with pytest.raises(ValueError, match="line 1"):
        read_captions(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError):
        read_captions(str(tmp_path / "missing.txt"))


def test_export_base_holds_the_trained_denoiser(tmp_path):
    """With `model.train_denoiser`, the export's base/ is the base folder with the trained
    denoiser: diffusers loads it and finds our weights; the other parts are the base's files;
    nothing half-written is left."""
    import jax.numpy as jnp
    import torch
    from diffusers import UNet2DConditionModel

    from leffa_jax.systems import magic_clothing as mc_lib
    from leffa_jax.systems.magic_clothing_train import export_base

    base = shared_path("fixtures", "magic_clothing", "model")
    unet = mc_lib.load_magic_clothing(str(base)).model.unet
    unet.conv_in.kernel.value = unet.conv_in.kernel[...] + 0.125
    out = tmp_path / "export" / "base"
    export_base(str(base), unet, str(out))
    export_base(str(base), unet, str(out))  # replaces a previous export whole
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["base"]
    loaded = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    np.testing.assert_array_equal(loaded.conv_in.weight.detach().numpy(),
                                  np.asarray(jnp.transpose(unet.conv_in.kernel[...], (3, 2, 0, 1))))
    original = UNet2DConditionModel.from_pretrained(base / "unet")
    torch.testing.assert_close(loaded.conv_out.weight, original.conv_out.weight, rtol=0, atol=0)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (base / part).iterdir():
            assert (out / part / f.name).read_bytes() == f.read_bytes()
    mc_lib.load_magic_clothing(str(out))  # what `sample --task garment2image --base` reads


def test_train_denoiser_needs_a_diffusers_base(tmp_path):
    """model.train_denoiser writes the trained denoiser into a copy of the base diffusers folder:
    a base without unet/ (e.g. a leffa_jax conversion) is refused before training, naming the
    key and the fix."""
    from leffa_jax.systems import make_task
    from leffa_jax.training.config import ConfigError

    c = _config(tmp_path)
    c.model.base = str(tmp_path)
    c.model.train_denoiser = True
    with pytest.raises(ConfigError, match="model.train_denoiser.*no unet/"):
        make_task(c).validate()
    c = _config(tmp_path)
    c.model.base = str(tmp_path)
    c.model.denoiser = str(shared_path("fixtures", "magic_clothing",
                                       "garment_extractor.safetensors"))
    with pytest.raises(ConfigError, match="^model.denoiser: model.base .* no unet/"):
        make_task(c).validate()
    c = _config(tmp_path)
    c.model.denoiser = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="model.denoiser .*missing.safetensors not found"):
        make_task(c).validate()


def test_tiny_config_variants(tmp_path):
    """The tiny config fine-tunes the shipped baseline (its denoiser and extractor files exist);
    `:scratch` trains from the random base for 6000 steps; other variants are refused; a
    workdir without an export is refused naming the fix."""
    from leffa_jax.configs import magic_clothing_tiny
    from leffa_jax.systems.magic_clothing_train import trained_task
    from leffa_jax.training.config import ConfigError

    c = magic_clothing_tiny.get_config()
    assert os.path.isfile(c.model.denoiser) and c.train.steps == 200
    assert c.model.init.startswith("extractor:") and os.path.isfile(c.model.init[10:])
    s = magic_clothing_tiny.get_config("scratch")
    assert (s.model.denoiser, s.model.init, s.train.steps) == ("", "base", 6000)
    with pytest.raises(ValueError, match="scratch"):
        magic_clothing_tiny.get_config("big")
    with pytest.raises(ConfigError, match="no export/garment_extractor.safetensors.*finished"):
        trained_task(c, str(tmp_path))


def test_demo_refuses_bad_arguments(tmp_path, capsys):
    """`--demo --steps 0` is an argparse error (exit 2) naming the flag; nothing is written."""
    from leffa_jax.systems.magic_clothing_train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--workdir", str(tmp_path / "demo"), "--steps", "0"])
    assert exit_info.value.code == 2
    assert "--steps: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow  # compiles the tiny extractor + denoiser (about 15 s)
def test_shipped_baseline_reads_the_garment(tmp_path):
    """The tiny demo's shipped start (assets/tiny_magic_clothing) uses the garment: on the unseen
    test pairs its denoiser's epsilon error in the garment region is lowest with the right
    garment, higher with none, highest with another pair's (docs/magic_clothing.md)."""
    from leffa_jax.configs import magic_clothing_tiny
    from leffa_jax.systems.magic_clothing_train import garment_use, trained_task

    c = magic_clothing_tiny.get_config()
    c.data.root = str(tmp_path / "data")
    task, model = trained_task(c)
    r = garment_use(task, model, next(iter(task.dataset("test"))), timesteps=(250,), draws=2)
    right, zero, other = (r[250][k][0] for k in ("right", "zero", "other"))
    assert right < 0.95 * zero and zero < 0.95 * other


def test_sample_colour_distance_closed_form():
    """Samples painted exactly in their garment's mean colour are at distance 0 from it and at
    the garments' mutual distance from the others."""
    from leffa_jax.systems.magic_clothing_train import sample_colour_distance

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)
    garment = np.zeros((3, 4, 4, 3), np.float32) - 1
    garment[:, :2] = colours[:, None, None] / 255 * 2 - 1       # the top half is the garment
    cloth = np.zeros((3, 4, 4, 1), np.float32)
    cloth[:, :2] = 1
    person = np.zeros((3, 4, 4, 1), np.float32)
    person[:, 2:] = 1                                            # worn on the bottom half
    samples = np.zeros((3, 2, 4, 4, 3), np.uint8)
    samples[:, :, 2:] = colours[:, None, None, None].astype(np.uint8)
    right, other = sample_colour_distance(samples, {"garment": garment,
                                                    "garment_cloth_mask": cloth,
                                                    "garment_mask": person})
    assert right == pytest.approx(0.0, abs=1e-4)
    assert other == pytest.approx(255 * np.sqrt(2), rel=1e-6)
