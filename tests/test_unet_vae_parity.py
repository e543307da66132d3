"""Flax UNet / VAE vs diffusers' PyTorch models built in the test (random perturbed weights)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from flax import nnx
from torch_reference import (
    IdentityProcessor,
    diffusers,
    nchw,
    nhwc,
    perturb_,
    state_dict_numpy,
    torch,
)

from leffa_jax.convert import module_from_flat, torch_to_flax_leaf

TINY = {
    # conv projections, cross-attention with a context (SD1.5-like)
    "conv_proj": dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D",
                      "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                      layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
                      cross_attention_dim=24, in_channels=9, use_linear_projection=False),
    # linear projections, several transformer layers per block, per-block heads (SDXL-like)
    "linear_multi": dict(block_out_channels=[32, 64], down_block_types=["DownBlock2D",
                         "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D",
                         "UpBlock2D"], layers_per_block=2, transformer_layers_per_block=[1, 3],
                         attention_head_dim=[2, 4], norm_num_groups=8, cross_attention_dim=16,
                         in_channels=4, use_linear_projection=True),
    # three levels, 12 input channels, no context (Leffa rule), odd latent size -> upsample_size
    "leffa_no_context": dict(block_out_channels=[16, 32, 32], down_block_types=[
                             "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D"],
                             layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
                             cross_attention_dim=16, in_channels=12, use_linear_projection=False),
}


def _write_config(tmp_path, name, cfg, kind="unet"):
    d = tmp_path / name / kind
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return tmp_path / name


def _flax_from_torch(module, component, cfg_dir, in_channels=None):
    flat = dict(torch_to_flax_leaf(k, v) for k, v in state_dict_numpy(module).items())
    return module_from_flat(component, str(cfg_dir), flat, in_channels)


@pytest.mark.parametrize("name", sorted(TINY))
def test_unet_matches_diffusers(tmp_path, name):
    cfg = dict(TINY[name], out_channels=4)
    torch.manual_seed(0)
    tu = diffusers.UNet2DConditionModel(**cfg).eval()
    perturb_(tu)
    with_context = name != "leffa_no_context"
    if not with_context:
        for m in tu.modules():
            if isinstance(m, diffusers.models.attention_processor.Attention) and m.is_cross_attention:
                m.set_processor(IdentityProcessor())
    hw = (9, 7) if not with_context else (8, 6)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, cfg["in_channels"], *hw)).astype(np.float32)
    t = np.array([10, 700])
    ctx = rng.standard_normal((2, 5, cfg["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        want = tu(torch.from_numpy(x), torch.from_numpy(t),
                  encoder_hidden_states=torch.from_numpy(ctx) if with_context else None).sample
    cfg_dir = _write_config(tmp_path, name, cfg)
    fu = _flax_from_torch(tu, "unet", cfg_dir, cfg["in_channels"])
    got = fu(jnp.asarray(nhwc(x)), jnp.asarray(t),
             jnp.asarray(ctx) if with_context else None).sample
    err = np.abs(nchw(got) - want.numpy()).max()
    assert err <= 1e-4, f"{name}: max abs error {err}"


def test_vae_matches_diffusers(tmp_path):
    cfg = dict(block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=8,
               latent_channels=4)
    torch.manual_seed(0)
    tv = diffusers.AutoencoderKL(**cfg).eval()
    perturb_(tv)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 3, 24, 16)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 6, 4)).astype(np.float32)
    with torch.no_grad():
        post = tv.encode(torch.from_numpy(x)).latent_dist
        z = post.mean + post.std * torch.from_numpy(noise)
        dec = tv.decode(z).sample
    cfg_dir = _write_config(tmp_path, "vae_tiny", cfg, kind="vae")
    fv = _flax_from_torch(tv, "vae", cfg_dir)
    p = fv.encode(jnp.asarray(nhwc(x)))
    assert np.abs(nchw(p.mean) - post.mean.numpy()).max() <= 1e-4
    assert np.abs(nchw(p.logvar) - post.logvar.numpy()).max() <= 1e-4
    fz = fv.sample_posterior(p, jnp.asarray(nhwc(noise)))
    assert np.abs(nchw(fz) - z.numpy()).max() <= 1e-4
    got = fv.decode(fz)
    assert np.abs(nchw(got) - dec.numpy()).max() <= 1e-4


@pytest.mark.slow
def test_real_sd15_inpainting_unet_matches_diffusers():
    """The full-size SD1.5-inpainting architecture (random weights), one forward at 16x12."""
    cfg_dir = shared_path("configs", "stable-diffusion-inpainting")
    cfg = json.loads((cfg_dir / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    tu = diffusers.UNet2DConditionModel.from_config(cfg).eval()
    perturb_(tu, scale=0.01)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 9, 16, 12)).astype(np.float32)
    ctx = rng.standard_normal((1, 7, 768)).astype(np.float32)
    t = np.array([321])
    with torch.no_grad():
        want = tu(torch.from_numpy(x), torch.from_numpy(t),
                  encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    fu = _flax_from_torch(tu, "unet", cfg_dir, 9)
    del tu
    graphdef, state = nnx.split(fu)
    forward = jax.jit(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c).sample)
    got = forward(state, jnp.asarray(nhwc(x)), jnp.asarray(t), jnp.asarray(ctx))
    err = np.abs(nchw(got) - want).max()
    assert err <= 1e-3, f"SD1.5 UNet max abs error {err}"
