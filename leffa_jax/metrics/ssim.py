"""SSIM as torchmetrics `StructuralSimilarityIndexMeasure(data_range=1.0)` (VtonEval's setting).

Gaussian window: size int(3.5*sigma+0.5)*2+1 = 11 for sigma 1.5, k1 0.01, k2 0.03; both images
reflect-padded by 5 and filtered with a valid convolution, so the SSIM map has the input's size
and its mean over (H, W, C) is the image's score (torchmetrics does not crop the border).
Variances are clamped at 0. Images NHWC in [0, 1]; the metric is the mean over images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from leffa_jax.metrics.ops import HIGHEST


def gaussian_window(sigma: float = 1.5) -> np.ndarray:
    """torchmetrics `_gaussian`: the normalised 1-D window (float32), size int(3.5s+0.5)*2+1."""
    size = int(3.5 * sigma + 0.5) * 2 + 1
    dist = np.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=np.float32)
    g = np.exp(-((dist / np.float32(sigma)) ** 2) / 2).astype(np.float32)
    return g / g.sum()


def _filter(x: jax.Array, g: jax.Array) -> jax.Array:
    """Valid depthwise filtering of (N, H, W, C) with the 2-D window outer(g, g) (torchmetrics
    `_gaussian_kernel_2d`, one kernel per channel)."""
    k, c = g.shape[0], x.shape[-1]
    w = jnp.tile((g[:, None] * g[None, :]).reshape(k, k, 1, 1), (1, 1, 1, c))
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c, precision=HIGHEST)


def ssim(pred: jax.Array, target: jax.Array, *, data_range: float = 1.0, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Per-image SSIM (B,) of pred vs target, both (B, H, W, C) float in [0, data_range]."""
    if pred.shape != target.shape:
        raise ValueError(f"SSIM needs images of one shape, got {pred.shape} and {target.shape}")
    g = jnp.asarray(gaussian_window(sigma))
    pad = (g.shape[0] - 1) // 2
    if min(pred.shape[1:3]) <= pad:
        raise ValueError(f"SSIM needs images larger than {pad} pixels per side, got {pred.shape[1:3]}")
    p, t = pred.astype(jnp.float32), target.astype(jnp.float32)
    cfg = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    p, t = jnp.pad(p, cfg, mode="reflect"), jnp.pad(t, cfg, mode="reflect")
    b = p.shape[0]
    out = _filter(jnp.concatenate([p, t, p * p, t * t, p * t]), g)
    mu_p, mu_t, e_pp, e_tt, e_pt = (out[i * b:(i + 1) * b] for i in range(5))
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_pp, mu_tt, mu_pt = mu_p ** 2, mu_t ** 2, mu_p * mu_t
    s_pp = jnp.maximum(e_pp - mu_pp, 0.0)
    s_tt = jnp.maximum(e_tt - mu_tt, 0.0)
    s_pt = e_pt - mu_pt
    upper = 2 * s_pt + c2
    lower = s_pp + s_tt + c2
    full = ((2 * mu_pt + c1) * upper) / ((mu_pp + mu_tt + c1) * lower)
    return full.reshape(b, -1).mean(-1)


def psnr(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """torchmetrics `PeakSignalNoiseRatio(data_range)` of one batch: 10 log10(R^2 / MSE) with the
    MSE over the whole batch (what VtonEval weights by batch size)."""
    mse = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)
    return 10 * jnp.log10(data_range ** 2 / mse)
