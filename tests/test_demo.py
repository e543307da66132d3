"""The demo (`python -m leffa_jax.demo`) and its parts: the closed-form image metrics it prints,
the synthetic set's unpaired ground truth (checked against the garment warped by the true flow),
the VAE-training Task (KL in closed form, the UNets untouched, unit-variance latents after the
export), and the whole demo at a few steps."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leffa_jax import demo
from leffa_jax.configs import synthetic_tiny
from leffa_jax.data import synthetic, synthetic_figures
from leffa_jax.flow import grid_sample
from leffa_jax.imageio import load_image
from leffa_jax.model import LeffaModel, tiny_config_dir
from leffa_jax.systems import make_task
from leffa_jax.systems.autoencoder import autoencoder_inputs, kl_to_standard_normal
from leffa_jax.training import loop

C1, C2 = 0.01 ** 2, 0.03 ** 2


def test_masked_psnr_counts_only_the_mask():
    a = np.zeros((2, 8, 6, 3), np.uint8)
    b = a.copy()
    mask = np.zeros((2, 8, 6, 1), np.float32)
    mask[:, 2:6, 1:4] = 1
    b[mask[..., 0] > 0] = 10
    b[mask[..., 0] == 0] = 200          # outside the mask: ignored
    b[1][mask[1, ..., 0] > 0] = 20
    np.testing.assert_allclose(demo.masked_psnr(a, b, mask),
                               [10 * np.log10(255 ** 2 / 100), 10 * np.log10(255 ** 2 / 400)])


def test_masked_ssim_closed_forms():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 16, 12, 3)).astype(np.uint8)
    ones = np.ones((2, 16, 12, 1), np.float32)
    np.testing.assert_allclose(demo.masked_ssim(x, x, ones), 1.0, atol=1e-12)
    # constant images a, b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = np.full_like(x, 51), np.full_like(x, 204)
    want = (2 * 0.2 * 0.8 + C1) / (0.2 ** 2 + 0.8 ** 2 + C1)
    np.testing.assert_allclose(demo.masked_ssim(a, b, ones), want, rtol=1e-10)


def test_kl_closed_form():
    z = jnp.zeros((1, 2, 2, 4))
    np.testing.assert_allclose(kl_to_standard_normal(z + 1.0, z), 0.5, rtol=1e-6)
    np.testing.assert_allclose(kl_to_standard_normal(z, z + np.log(2.0)),
                               0.5 * (2 - 1 - np.log(2.0)), rtol=1e-6)


def test_unpaired_ground_truth_is_the_garment_warped_by_the_true_flow(tmp_path):
    """test/image-unpaired/<person> = that person wearing the garment test_pairs.txt lists: inside
    the garment region it matches the listed (flat) garment sampled at the person's flow_gt, and
    outside it matches the person."""
    h, w = 128, 96
    root = synthetic.make_synthetic_dataset(tmp_path / "set", num_train=1, num_test=3,
                                            height=h, width=w, seed=3)
    rows = [line.split() for line in (root / "test_pairs.txt").read_text().splitlines()]
    for person, cloth in rows:
        stem = person[:-4]
        truth = load_image(root / "test" / "image-unpaired" / person).astype(np.float32)
        own = load_image(root / "test" / "image" / person).astype(np.float32)
        garment = load_image(root / "test" / "cloth" / cloth).astype(np.float32)
        flow = np.load(root / "test" / "flow_gt" / f"{stem}.npy")
        region = flow[..., 2] > 0.5
        warped = np.asarray(grid_sample(jnp.asarray(garment[None]),
                                        jnp.asarray(flow[None, ..., :2])))[0]
        inside = np.abs(truth - warped)[region].mean()
        assert inside < 6.0, inside                     # bilinear + JPEG error only
        assert np.abs(own - warped)[region].mean() > 3 * inside  # the other garment differs
        assert np.abs(truth - own)[~region].mean() < 3.0


def test_wearing_the_own_garment_gives_the_paired_person():
    ex, _ = synthetic_figures.render_tryon(np.random.default_rng(5), 32, 24, "upper_body")
    np.testing.assert_array_equal(synthetic_figures.wear(ex, ex["texture"]), ex["person"])


def _ae_config(root, steps=3):
    c = synthetic_tiny.get_config()
    c = demo.autoencoder_config(c)
    c.train.steps = steps
    c.train.batch_size = c.data.batch_size = 8  # the tests' 8 CPU devices
    c.data.root = str(root)
    c.data.synthetic.num_train, c.data.synthetic.num_test = 8, 1
    c.data.flip_prob = 0.0
    c.log.progress_bar = False
    c.checkpoint.use_async = False
    return c


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("vae")
    c = _ae_config(work / "data")
    result = loop.train(make_task(c), c, str(work / "run"))
    return c, result, str(work / "run" / "export")


def test_autoencoder_task_trains_only_the_vae(vae_run):
    c, result, export = vae_run
    assert c.task == "autoencoder" and result.step == 3
    assert all(np.isfinite(m["loss"]) for m in result.metrics)
    model = LeffaModel.from_pretrained(export)
    start = LeffaModel.random_sd_inpainting(tiny_config_dir(), c.train.seed)  # "random" init

    def leaves(module):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module))]

    for name in ("unet", "unet_encoder"):
        for x, y in zip(leaves(getattr(model, name)), leaves(getattr(start, name)), strict=True):
            np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y)
               for x, y in zip(leaves(model.vae), leaves(start.vae), strict=True))


def test_autoencoder_export_gives_unit_variance_latents(vae_run):
    """scaling_factor = 1 / std of the posterior means over the training images (8 images, so
    every export batch holds all of them): scaled latents have std 1."""
    c, _, export = vae_run
    model = LeffaModel.from_pretrained(export)
    with open(os.path.join(export, "config", "vae", "config.json")) as f:
        assert json.load(f)["scaling_factor"] == pytest.approx(model.scaling_factor)
    task = make_task(c)
    batch = next(iter(task.dataset("train")))
    x = autoencoder_inputs({k: jnp.asarray(batch[k]) for k in ("person", "garment")})
    z = np.asarray(model.vae.encode(x).mean) * model.scaling_factor
    np.testing.assert_allclose(z.std(), 1.0, rtol=1e-4)


def test_shipped_baseline_is_float32_when_loaded_and_decodes_pictures(tmp_path):
    """The shipped baseline (float16 on disk) loads as float32 and its VAE reconstructs people
    of a freshly generated synthetic set (another seed: unseen) well above noise level."""
    root = synthetic.make_synthetic_dataset(tmp_path / "set", num_train=1, num_test=4,
                                            height=32, width=24, seed=11)
    model = demo.load_float32(demo.BASELINE_DIR)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    people = np.stack([load_image(p) for p in sorted((root / "test" / "image").glob("*.jpg"))])
    assert demo.vae_psnr(model, people.astype(np.float32) / 127.5 - 1.0) > 18.0


@pytest.mark.slow
def test_demo_end_to_end_from_scratch(tmp_path, capsys):
    """The demo at a few steps, every stage included (`--from-scratch`: VAE, baseline, both
    fine-tunes): each prints its numbers, the grid and the PNGs are written."""
    assert demo.main(["--workdir", str(tmp_path), "--steps", "2", "--from-scratch",
                      "--vae-steps", "2", "--baseline-steps", "2"]) == 0
    out = capsys.readouterr().out
    for needle in ("[2/5] trained the VAE", "[2/5] trained the baseline",
                   "[3/5] fine-tuned with Leffa loss", "[3/5] fine-tuned without (ablation)",
                   "identity flow", "SSIM", "PSNR dB", "input person", "baseline"):
        assert needle in out, needle
    grid = load_image(tmp_path / "grid.png")
    n = synthetic_tiny.get_config().data.synthetic.num_test
    scale, (h, w) = demo.GRID_SCALE, (32, 24)
    assert grid.shape == (n * (h * scale + 2) + 2, 7 * (w * scale + 2) + 2, 3)
    assert len(list((tmp_path / "samples").glob("*.png"))) == n
    assert len(list((tmp_path / "samples" / "baseline").glob("*.png"))) == n


def test_magic_clothing_reads_the_vae_of_a_leffa_checkpoint():
    """`--vae` / `model.vae` of Magic Clothing may name a leffa_jax checkpoint: its VAE (the
    shipped baseline's, trained on the synthetic set), parameters and scaling factor as stored."""
    from leffa_jax.systems.magic_clothing import load_vae

    vae = load_vae(demo.BASELINE_DIR)
    want = demo.load_float32(demo.BASELINE_DIR).vae
    assert vae.config.scaling_factor == want.config.scaling_factor != 0.18215
    for x, y in zip(jax.tree.leaves(nnx.state(vae, nnx.Param)),
                    jax.tree.leaves(nnx.state(want, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "must be >= 1"),
    (["--vae-steps", "5"], "add it"),
])
def test_demo_refuses_bad_flags_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--workdir", str(tmp_path / "w"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_magic_clothing_vae_from_a_checkpoint_without_a_vae_is_refused(tmp_path):
    """A leffa_jax checkpoint folder whose weights hold no `vae.*` tensor: the error names it."""
    from safetensors.numpy import load_file, save_file

    from leffa_jax.systems.magic_clothing import load_vae
    from leffa_jax.weights.tensor_io import CheckpointError

    folder = tmp_path / "no_vae"
    shutil.copytree(demo.BASELINE_DIR, folder)
    params = load_file(str(folder / "params.safetensors"))
    save_file({k: v for k, v in params.items() if not k.startswith("vae.")},
              str(folder / "params.safetensors"))
    with pytest.raises(CheckpointError, match="no vae component"):
        load_vae(str(folder))
