"""Pictures: closed-form checks of the colour coding, and the CLI on the official tiny model."""

import numpy as np
from conftest import shared_path
from PIL import Image

from leffa_jax import flow as flow_lib
from leffa_jax import viz


def test_flow_colour_wheel_closed_form():
    h, w = 6, 8
    ident = np.asarray(flow_lib.coordinate_map(h, w)).reshape(h, w, 2)
    assert viz.flow_to_rgb(ident, max_disp=1.0).max() == 0  # no displacement: black
    right = ident + np.array([0.5, 0.0])  # pure +x displacement: hue 0 (red), value 0.5
    rgb = viz.flow_to_rgb(right, max_disp=1.0)
    assert np.all(rgb[..., 0] == 128) and np.all(rgb[..., 1:] == 0)
    down = ident + np.array([0.0, 1.0])  # +y: hue 1/4 -> (0.5, 1, 0) * value 1
    assert tuple(viz.flow_to_rgb(down, max_disp=1.0)[0, 0]) == (128, 255, 0)


def test_heatmap_and_grid():
    hm = viz.heatmap(np.array([[0.0, 1.0]]))
    assert tuple(hm[0, 0]) == (0, 0, 0) and tuple(hm[0, 1]) == (255, 255, 255)
    g = viz.grid([[np.zeros((4, 3, 3), np.uint8)] * 2, [np.zeros((2, 2, 3), np.uint8)]], pad=1)
    assert g.shape == (2 * 5 + 1, 2 * 4 + 1, 3)


def test_cli_writes_pictures(tmp_path):
    base = shared_path("fixtures", "leffa_official", "sd15_tiny")
    d = np.load(base / "loss_fixture.npz")
    files = {}
    for name, arr in (("person", d["image"][0]), ("garment", d["ref_image"][0]),
                      ("densepose", d["image"][1])):
        files[name] = tmp_path / f"{name}.png"
        Image.fromarray(viz.to_uint8(arr.transpose(1, 2, 0))).save(files[name])
    files["mask"] = tmp_path / "mask.png"
    Image.fromarray((d["mask"][0, 0] * 255).astype(np.uint8)).save(files["mask"])
    out = tmp_path / "pics"
    viz.main(["--checkpoint", str(base / "weights.safetensors"), "--base-config",
              str(base / "config" / "stable-diffusion-inpainting-tiny"), "--out", str(out),
              *[a for k, v in files.items() for a in (f"--{k}", str(v))], "--layers", "0,3"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention_l00.png", "attention_l03.png", "flow_l00.png", "flow_l03.png",
                     "overview.png", "warped_l00.png", "warped_l03.png"]
    assert Image.open(out / "flow_l00.png").size == (24, 32)


def test_probe_inputs_use_the_model_schedule():
    """An official checkpoint with an SDXL base folder: evaluate/viz noise the latent with the
    zero-terminal-SNR schedule, as training and sampling do (diffusers' DDPMScheduler with
    rescale_betas_zero_snr=True as the reference; at t = 999 the latent is pure noise)."""
    import jax
    import torch
    from diffusers import DDPMScheduler

    from leffa_jax.evaluate import probe_inputs
    from leffa_jax.model import LeffaModel

    base = shared_path("fixtures", "leffa_official", "sdxl_tiny")
    model = LeffaModel.from_pretrained(base / "weights.safetensors",
                                       base / "config" / "stable-diffusion-xl-1.0-inpainting-0.1-tiny")
    rng = np.random.default_rng(0)
    person, garment, densepose = rng.uniform(-1, 1, (3, 1, 32, 24, 3)).astype(np.float32)
    mask = np.zeros((1, 32, 24, 1), np.float32)
    mask[:, 8:24, 4:20] = 1
    sched = DDPMScheduler.from_config(model.scheduler_config(), rescale_betas_zero_snr=True)
    latent = np.asarray(model.encode(person).mean) * model.scaling_factor
    noise = np.array(jax.random.normal(jax.random.PRNGKey(0), latent.shape))
    for t in (999, 300):
        gen, feats, t_batch = probe_inputs(model, person, garment, mask, densepose, t=t)
        want = sched.add_noise(torch.from_numpy(latent), torch.from_numpy(noise),
                               torch.tensor([t])).numpy()
        np.testing.assert_allclose(np.asarray(gen[..., :4]), want, rtol=1e-5, atol=1e-5)
        assert gen.shape[-1] == 12 and t_batch.tolist() == [t]
