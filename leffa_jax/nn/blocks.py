"""Convolutional blocks shared by the UNet and the VAE, NHWC; module trees mirror diffusers.

- `timestep_embedding` / `TimestepEmbedding`: diffusers `get_timestep_embedding` + the two-layer
  MLP (`linear_1`, `linear_2`) of the UNet's `time_embedding` and SDXL's `add_embedding`.
- `ResnetBlock2D`: GroupNorm-SiLU-conv twice, optional time projection (`time_emb_proj`; the VAE
  builds none), 1x1 `conv_shortcut` when channels change.
- `Downsample2D` (`conv`, 3x3 stride 2) and `Upsample2D` (torch nearest x2 or to a size, `conv`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.layers import Conv2d, GroupNorm, Linear, resize_nearest_torch


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """diffusers `get_timestep_embedding`: (B,) -> (B, dim), float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_2(silu(linear_1(x))): (B, in_features) -> (B, dim)."""

    def __init__(self, in_features: int, dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, dim, rngs=rngs)
        self.linear_2 = Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """(B, H, W, cin) [+ temb (B, temb_channels)] -> (B, H, W, cout)."""

    def __init__(self, cin: int, cout: int, temb_channels: int | None, groups: int, eps: float, *,
                 rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, groups, eps)
        self.conv1 = Conv2d(cin, cout, 3, rngs=rngs)
        self.time_emb_proj = Linear(temb_channels, cout, rngs=rngs) if temb_channels else None
        self.norm2 = GroupNorm(cout, groups, eps)
        self.conv2 = Conv2d(cout, cout, 3, rngs=rngs)
        self.conv_shortcut = Conv2d(cin, cout, 1, padding=0, rngs=rngs) if cin != cout else None

    def __call__(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """3x3 stride-2 conv; `padding` 0 is diffusers' asymmetric (0, 1, 0, 1) pad (the VAE)."""

    def __init__(self, channels: int, padding: int, *, rngs: nnx.Rngs):
        pad = ((padding, padding),) * 2 if padding else ((0, 1), (0, 1))
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=pad, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    """torch nearest resize (x2, or to `size` when the skip connection is odd-sized), 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, rngs=rngs)

    def __call__(self, x, size: tuple[int, int] | None = None):
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(resize_nearest_torch(x, size))
