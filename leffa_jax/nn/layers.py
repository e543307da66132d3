"""Leaf layers: Linear, Conv2d, GroupNorm, LayerNorm (NHWC).

Parameter names follow Flax (`kernel`, `bias`, `scale`) so that conversion is a rule per leaf:
torch Linear `weight (O, I)` <-> `kernel (I, O)`; Conv2d `weight (O, I, kh, kw)` <-> `kernel
(kh, kw, I, O)`; norm `weight` <-> `scale`.

Precision policy: parameters keep their stored dtype; every layer computes in the dtype of its
input (params are cast to it), and normalisation statistics are always float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_lecun = nnx.initializers.lecun_normal()


class Identity(nnx.Module):
    """Parameter-free placeholder (diffusers' Dropout slots in `to_out` / `ff.net`)."""

    def __call__(self, x):
        return x


class Linear(nnx.Module):
    """x @ kernel + bias, kernel (in, out). `lora_layer` is None unless `nn.lora.apply_lora`
    attached one: then y = x @ kernel + bias + lora_layer(x) (diffusers' LoRACompatibleLinear)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_lecun(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.lora_layer = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora_layer is not None and not self.lora_layer.merged:
            y = y + self.lora_layer(x)
        return y


# XLA:CPU lowers small-image convolutions badly: a 3x3 conv on a 2x2x1280 map takes ~120 ms, 30x
# the same work as one matmul (benchmarks/conv.py). On the CPU backend, convolutions whose output
# has at most this many pixels run as patches @ kernel instead (same sum, other order; GPU and TPU
# always use conv_general_dilated). 0 disables.
CPU_MATMUL_CONV_MAX_PIXELS = 256


def conv_as_matmul(x: jax.Array, k: jax.Array, stride: int, padding) -> jax.Array:
    """conv_general_dilated(x, k, stride, padding) for NHWC x and HWIO k, as one matmul over the
    (kh*kw*Cin) patches of x."""
    kh, kw, ci, co = k.shape
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    oh = (xp.shape[1] - kh) // stride + 1
    ow = (xp.shape[2] - kw) // stride + 1
    cols = jnp.concatenate([xp[:, i:i + stride * (oh - 1) + 1:stride,
                               j:j + stride * (ow - 1) + 1:stride]
                            for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.dot(cols, k.reshape(kh * kw * ci, co))


class Conv2d(nnx.Module):
    """2-D convolution, NHWC input, HWIO kernel; `padding` is symmetric (PyTorch-style) or an
    explicit ((top, bottom), (left, right))."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
                 stride: int = 1, padding=1, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(_lecun(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
        self.stride = stride
        self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(x.dtype)
        kh, kw = k.shape[:2]
        if kh == 1 and kw == 1 and self.stride == 1 and self.padding == ((0, 0), (0, 0)):
            y = jnp.dot(x, k[0, 0])
        elif self._small_on_cpu(x.shape[1:3], (kh, kw)):
            y = conv_as_matmul(x, k, self.stride, self.padding)
        else:
            y = jax.lax.conv_general_dilated(
                x, k, (self.stride, self.stride), self.padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(x.dtype)

    def _small_on_cpu(self, hw, khw) -> bool:
        (pt, pb), (pl, pr) = self.padding
        oh = (hw[0] + pt + pb - khw[0]) // self.stride + 1
        ow = (hw[1] + pl + pr - khw[1]) // self.stride + 1
        return oh * ow <= CPU_MATMUL_CONV_MAX_PIXELS and jax.default_backend() == "cpu"


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, C/G) per group, biased variance, statistics in float32."""

    def __init__(self, num_features: int, num_groups: int, eps: float):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm: {num_features} channels not divisible by {num_groups} groups")
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, c = x.shape
        g = self.num_groups
        xf = x.astype(jnp.float32).reshape(lead[0], -1, g, c // g)
        mean = xf.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, biased variance, statistics in float32."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def nearest_indices_torch(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch `interpolate(mode="nearest")`: min(floor(i * float32(in/out)), in-1)."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest_torch(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `interpolate(x, size, mode="nearest")` on NHWC (static sizes).

    `jax.image.resize(..., "nearest")` uses half-pixel centres and does not match."""
    h, w = x.shape[1:3]
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, nearest_indices_torch(h, oh)][:, :, nearest_indices_torch(w, ow)]
