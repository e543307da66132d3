"""Array ops of the metric networks, NHWC, with PyTorch's exact conventions: convolution at full
float32 precision, max / average pooling (`ceil_mode`, `count_include_pad=False`), and
`F.interpolate(mode="bilinear", align_corners=False)` as two small resize matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d(x: jax.Array, kernel: jax.Array, stride=1, padding=0, precision=HIGHEST) -> jax.Array:
    """torch conv2d (no bias): x (B,H,W,I), kernel (kh,kw,I,O), symmetric int/pair padding."""
    ph, pw = pair(padding)
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), pair(stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


def _ceil_extra(size: int, k: int, s: int, pad: int, ceil_mode: bool) -> int:
    """Extra right/bottom padding that reproduces torch's output size (ceil_mode rule: the last
    window must start inside the input or left padding)."""
    if not ceil_mode:
        return 0
    out = -(-(size + 2 * pad - k) // s) + 1
    if (out - 1) * s >= size + pad:
        out -= 1
    return max(0, (out - 1) * s + k - (size + 2 * pad))


def max_pool(x: jax.Array, k: int, s: int, pad: int = 0, ceil_mode: bool = False) -> jax.Array:
    """torch MaxPool2d(k, s, padding=pad, ceil_mode) on NHWC."""
    eh = _ceil_extra(x.shape[1], k, s, pad, ceil_mode)
    ew = _ceil_extra(x.shape[2], k, s, pad, ceil_mode)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1),
                                 ((0, 0), (pad, pad + eh), (pad, pad + ew), (0, 0)))


def avg_pool_exclude_pad(x: jax.Array, k: int = 3, pad: int = 1) -> jax.Array:
    """torch avg_pool2d(k, stride=1, padding=pad, count_include_pad=False) on NHWC."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, k, 1), (1, 1, 1, 1), padding)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, k, k, 1), (1, 1, 1, 1), padding)
    return total / count


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch bilinear interpolation, align_corners=False, no antialias:
    src = (dst + 0.5) * n_in / n_out - 0.5 clamped at 0, neighbours floor(src) and +1 (clamped)."""
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale
                     - np.float32(0.5), 0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] += 1 - lam
    m[np.arange(n_out), i1] += lam
    return m


def resize_bilinear_torch(x: jax.Array, height: int, width: int) -> jax.Array:
    """F.interpolate(x, (height, width), mode="bilinear", align_corners=False) on NHWC."""
    if x.shape[1:3] == (height, width):
        return x
    mh = jnp.asarray(bilinear_matrix(x.shape[1], height))
    mw = jnp.asarray(bilinear_matrix(x.shape[2], width))
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=HIGHEST)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=HIGHEST)
