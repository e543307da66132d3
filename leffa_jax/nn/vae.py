"""AutoencoderKL (the SD VAE) in Flax NNX, NHWC; module tree mirrors diffusers.

`encode(x)` -> `Posterior(mean, logvar)`; `sample_posterior(posterior, noise)` draws with a given
noise array (how a PyTorch run is replayed); `decode(z)`. Latents here are UNscaled: multiply by
`config.scaling_factor` before the UNet and divide after, as the pipelines do.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from leffa_jax.nn.config import VAEConfig
from leffa_jax.nn.layers import Conv2d, GroupNorm, Linear

_EPS = 1e-6  # every VAE norm


class Posterior(NamedTuple):
    mean: jax.Array    # (B, h, w, latent_channels)
    logvar: jax.Array  # clipped to [-30, 20] as diffusers does


class VAEAttention(nnx.Module):
    """Single-head spatial self-attention of the VAE mid block (biases on q/k/v, residual)."""

    def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(c, groups, _EPS)
        self.to_q = Linear(c, c, rngs=rngs)
        self.to_k = Linear(c, c, rngs=rngs)
        self.to_v = Linear(c, c, rngs=rngs)
        self.to_out = nnx.List([Linear(c, c, rngs=rngs)])

    def __call__(self, x):
        b, h, w, c = x.shape
        n = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(n), self.to_k(n), self.to_v(n)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(c)), axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
        return out.reshape(b, h, w, c) + x


class VAEMidBlock(nnx.Module):
    def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(c, c, None, groups, _EPS, rngs=rngs)
                                 for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(c, groups, rngs=rngs)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nnx.Module):
    def __init__(self, cin, cout, n, groups, add_downsample, *, rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, _EPS,
                                               rngs=rngs) for j in range(n)])
        self.downsamplers = (nnx.List([Downsample2D(cout, 0, rngs=rngs)])
                             if add_downsample else None)

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nnx.Module):
    def __init__(self, cin, cout, n, groups, add_upsample, *, rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, _EPS,
                                               rngs=rngs) for j in range(n)])
        self.upsamplers = nnx.List([Upsample2D(cout, rngs=rngs)]) if add_upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, boc[0], 3, rngs=rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, i < len(boc) - 1,
                         rngs=rngs) for i in range(len(boc))])
        self.mid_block = VAEMidBlock(boc[-1], g, rngs=rngs)
        self.conv_norm_out = GroupNorm(boc[-1], g, _EPS)
        self.conv_out = Conv2d(boc[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        rboc, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, rboc[0], 3, rngs=rngs)
        self.mid_block = VAEMidBlock(rboc[0], g, rngs=rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(rboc[max(i - 1, 0)], rboc[i], cfg.layers_per_block + 1, g,
                         i < len(rboc) - 1, rngs=rngs) for i in range(len(rboc))])
        self.conv_norm_out = GroupNorm(rboc[-1], g, _EPS)
        self.conv_out = Conv2d(rboc[-1], cfg.out_channels, 3, rngs=rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = Conv2d(2 * c, 2 * c, 1, padding=0, rngs=rngs)
        self.post_quant_conv = Conv2d(c, c, 1, padding=0, rngs=rngs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> Posterior:
        """x (B, H, W, 3) in [-1, 1] -> Posterior of (B, H/f, W/f, latent_channels)."""
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"VAE.encode expects NHWC images with {self.config.in_channels} "
                             f"channels, got shape {x.shape}")
        f = self.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"VAE.encode: image size {x.shape[1]}x{x.shape[2]} must be a multiple "
                             f"of {f}")
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))

    @staticmethod
    def sample_posterior(posterior: Posterior, noise: jax.Array) -> jax.Array:
        """mean + exp(logvar / 2) * noise (diffusers `DiagonalGaussianDistribution.sample`)."""
        return posterior.mean + jnp.exp(0.5 * posterior.logvar) * noise.astype(posterior.mean.dtype)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, h, w, latent_channels), unscaled -> (B, h*f, w*f, 3), not clipped."""
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x, noise):
        return self.decode(self.sample_posterior(self.encode(x), noise))
