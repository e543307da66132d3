"""Flow fields from attention, bilinear resampling and the Leffa loss (pure jnp).

Layout conventions: images and flows are NHWC, attention tensors are (B, heads, tokens, d) with
tokens in row-major (y, x) order, flows/grids carry (x, y) in the last axis, normalised to
[-1, 1] (x = -1 is the left edge, y = -1 the top edge).

Official conventions kept on purpose (the paper's loss as the official code computes it, checked
against the project fixture `../shared/fixtures/leffa_official/sd15_tiny/loss_fixture.npz`):

- The coordinate map is `linspace(-1, 1, w) x linspace(-1, 1, h)`: token centres sit exactly on
  -1 and +1 ("align_corners=True" style), while the warp samples with `align_corners=False`
  (where -1/+1 are the outer pixel *edges*). The half-pixel mismatch is part of the official loss.
- The layer flow is upsampled to the image size with bilinear `align_corners=False` (torch
  `interpolate` semantics, no antialiasing), then clipped to [-1, 1]; the clipped flow is the warp
  grid (bilinear, zeros padding).
- Layer loss: per sample, the mean over ALL pixels and channels (H * W * C; not over the mask
  area) of smooth-L1 (beta 1) or squared error between `warped * m` and `target * m`.
- Total: mean over layers, multiplied per sample by the gate `t < t_threshold`, mean over the
  whole batch (gated samples count as zero, the denominator stays B), times lambda.

Softmax, reductions and the resampling are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "coordinate_map",
    "attention_map",
    "flow_from_attention",
    "flow_from_qk",
    "default_chunk_size",
    "upsample_bilinear",
    "grid_sample",
    "flow_to_image_size",
    "warp",
    "layer_loss",
    "leffa_loss",
    "select_layers",
    "layer_hw",
]

_HI = lax.Precision.HIGHEST
_F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Coordinate map and attention flow
# --------------------------------------------------------------------------------------------


def coordinate_map(h: int, w: int) -> jax.Array:
    """(h*w, 2) float32 (x, y) coordinates of the token grid, row-major tokens.

    x from `linspace(-1, 1, w)`, y from `linspace(-1, 1, h)`: token 0 is (-1, -1) (top left),
    token h*w-1 is (1, 1).
    """
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"coordinate_map: h and w must be >= 1, got h={h}, w={w}")
    xs = jnp.linspace(-1.0, 1.0, int(w), dtype=_F32)
    ys = jnp.linspace(-1.0, 1.0, int(h), dtype=_F32)
    gx = jnp.broadcast_to(xs[None, :], (int(h), int(w)))
    gy = jnp.broadcast_to(ys[:, None], (int(h), int(w)))
    return jnp.stack([gx, gy], axis=-1).reshape(int(h) * int(w), 2)


def _check_qk(q: jax.Array, k_ref: jax.Array, fn: str) -> None:
    if q.ndim != 4:
        raise ValueError(f"{fn}: q must be (B, heads, N, d), got shape {q.shape}")
    if k_ref.ndim != 4:
        raise ValueError(f"{fn}: k_ref must be (B, heads, M, d), got shape {k_ref.shape}")
    b, nh, _, d = q.shape
    if (k_ref.shape[0], k_ref.shape[1], k_ref.shape[3]) != (b, nh, d):
        raise ValueError(
            f"{fn}: k_ref must be (B={b}, heads={nh}, M, d={d}) to match q {q.shape}, "
            f"got {k_ref.shape}"
        )


def _check_hw(n: int, m: int, h: int, w: int, fn: str) -> None:
    if n != h * w:
        raise ValueError(f"{fn}: q has N={n} tokens but h*w = {h}*{w} = {h * w}")
    if m != h * w:
        raise ValueError(
            f"{fn}: k_ref has M={m} tokens but the coordinate map has h*w = {h}*{w} = {h * w}"
        )


def attention_map(q: jax.Array, k_ref: jax.Array, tau: float = 2.0) -> jax.Array:
    """Materialised head-averaged attention, (B, N, M) float32.

    `mean_heads(softmax(q @ k_ref^T / (tau * sqrt(d))))` for q (B, heads, N, d) and
    k_ref (B, heads, M, d). Scores and softmax in float32.
    """
    _check_qk(q, k_ref, "attention_map")
    d = q.shape[-1]
    s = jnp.einsum("bhnd,bhmd->bhnm", q.astype(_F32), k_ref.astype(_F32))
    s = s / (float(tau) * math.sqrt(d))
    return jnp.mean(jax.nn.softmax(s, axis=-1), axis=1)


def flow_from_attention(attn: jax.Array, h: int, w: int) -> jax.Array:
    """Flow (B, h, w, 2) = attn (B, N, h*w) @ coordinate_map(h, w), N = h*w."""
    if attn.ndim != 3:
        raise ValueError(f"flow_from_attention: attn must be (B, N, M), got shape {attn.shape}")
    b, n, m = attn.shape
    _check_hw(n, m, int(h), int(w), "flow_from_attention")
    c = coordinate_map(h, w)
    f = jnp.einsum("bnm,mx->bnx", attn.astype(_F32), c, precision=_HI)
    return f.reshape(b, int(h), int(w), 2)


def default_chunk_size(
    batch: int, heads: int, n: int, m: int, budget_bytes: int | None = None
) -> int:
    """Query-chunk size for `flow_from_qk`: the largest power of two (at least 32, at most the
    next power of two >= n) whose (B, heads, chunk, M) float32 score block fits in
    `budget_bytes`. Default budget: 4 MiB on CPU (cache-friendly; measured best on a 2-core CPU
    at N=1024..4096), 128 MiB on accelerators (fewer, larger matmuls)."""
    if budget_bytes is None:
        budget_bytes = (4 << 20) if jax.default_backend() == "cpu" else (128 << 20)
    per_row = max(1, batch * heads * m * 4)
    c = max(32, int(budget_bytes) // per_row)
    c = 1 << (int(c).bit_length() - 1)
    cap = 1 << max(0, (int(n) - 1).bit_length())
    return int(max(1, min(c, cap)))


def _chunk_rows(x: jax.Array, chunk: int) -> jax.Array:
    """(B, H, Np, ...) -> (nc, B, H, chunk, ...) with Np = nc * chunk."""
    b, nh, np_ = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, nh, np_ // chunk, chunk, *rest)
    return jnp.moveaxis(x, 2, 0)


def _unchunk_rows(x: jax.Array) -> jax.Array:
    """(nc, B, H, chunk, ...) -> (B, H, nc * chunk, ...)."""
    x = jnp.moveaxis(x, 0, 2)
    b, nh, nc, c = x.shape[:4]
    return x.reshape(b, nh, nc * c, *x.shape[4:])


def _fused_fwd_chunks(qs_chunks, k, coords):
    """Forward over query chunks: per-head outputs (B,H,Np,2) and log-sum-exp (B,H,Np)."""

    def body(_, qc):
        s = jnp.einsum("bhcd,bhmd->bhcm", qc, k)
        mx = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - mx)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bhcm,mx->bhcx", e, coords, precision=_HI) / denom
        lse = (mx + jnp.log(denom))[..., 0]
        return None, (o, lse)

    _, (o, lse) = lax.scan(body, None, qs_chunks)
    return _unchunk_rows(o), _unchunk_rows(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused_flow(qs: jax.Array, k: jax.Array, coords_np: tuple, chunk: int) -> jax.Array:
    """mean_h softmax(qs @ k^T) @ C for pre-scaled, padded float32 qs (B,H,Np,d) -> (B,Np,2)."""
    out, _ = _fused_flow_fwd(qs, k, coords_np, chunk)
    return out


def _coords_from_key(coords_np: tuple) -> jax.Array:
    h, w = coords_np
    return coordinate_map(h, w)


def _fused_flow_fwd(qs, k, coords_np, chunk):
    coords = _coords_from_key(coords_np)
    o, lse = _fused_fwd_chunks(_chunk_rows(qs, chunk), k, coords)
    out = jnp.mean(o, axis=1)
    return out, (qs, k, o, lse)


def _fused_flow_bwd(coords_np, chunk, res, g):
    qs, k, o, lse = res
    coords = _coords_from_key(coords_np)
    nh = qs.shape[1]
    g = g.astype(_F32) / nh  # d out / d o_h = 1/heads
    # delta_h[n] = sum_m P[n,m] (g[n] . C[m]) = g[n] . o_h[n]
    delta = jnp.einsum("bnx,bhnx->bhn", g, o, precision=_HI)
    chunk_q = _chunk_rows(qs, chunk)
    chunk_lse = _chunk_rows(lse, chunk)
    chunk_delta = _chunk_rows(delta, chunk)
    chunk_g = jnp.moveaxis(g.reshape(g.shape[0], -1, chunk, 2), 1, 0)  # (nc, B, c, 2)

    def body(dk, xs):
        qc, lc, dc, gc = xs
        s = jnp.einsum("bhcd,bhmd->bhcm", qc, k)
        p = jnp.exp(s - lc[..., None])
        gcoord = jnp.einsum("bcx,mx->bcm", gc, coords, precision=_HI)
        ds = p * (gcoord[:, None] - dc[..., None])
        dq = jnp.einsum("bhcm,bhmd->bhcd", ds, k)
        dk = dk + jnp.einsum("bhcm,bhcd->bhmd", ds, qc)
        return dk, dq

    dk, dq = lax.scan(body, jnp.zeros_like(k), (chunk_q, chunk_lse, chunk_delta, chunk_g))
    return _unchunk_rows(dq), dk


_fused_flow.defvjp(_fused_flow_fwd, _fused_flow_bwd)


def flow_from_qk(
    q: jax.Array,
    k_ref: jax.Array,
    h: int,
    w: int,
    tau: float = 2.0,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
    """Fused flow (B, h, w, 2) = mean_h softmax(q k_ref^T / (tau sqrt d)) @ coordinate_map(h, w).

    q (B, heads, N, d), k_ref (B, heads, M, d), N = M = h*w. Never materialises the (B, heads,
    N, M) map: query chunks of `chunk_size` rows (default `default_chunk_size`: a 4 MiB score
    block on CPU, 128 MiB on accelerators) are processed in a `lax.scan`; a `custom_vjp` stores only q, k, the per-head 2-column
    outputs and the row log-sum-exp, and recomputes each chunk's probabilities in the backward
    pass (dS = P * (dO . C - dO . O_h) / heads). Float32 internally; gradients come back in the
    input dtypes.
    """
    _check_qk(q, k_ref, "flow_from_qk")
    b, nh, n, d = q.shape
    h, w = int(h), int(w)
    _check_hw(n, k_ref.shape[2], h, w, "flow_from_qk")
    if chunk_size is None:
        chunk_size = default_chunk_size(b, nh, n, k_ref.shape[2])
    chunk = int(min(int(chunk_size), n))
    if chunk < 1:
        raise ValueError(f"flow_from_qk: chunk_size must be >= 1, got {chunk_size}")
    scale = 1.0 / (float(tau) * math.sqrt(d))
    qs = q.astype(_F32) * scale
    pad = (-n) % chunk
    if pad:
        qs = jnp.pad(qs, ((0, 0), (0, 0), (0, pad), (0, 0)))
    out = _fused_flow(qs, k_ref.astype(_F32), (h, w), chunk)
    return out[:, :n].reshape(b, h, w, 2)


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch bilinear interpolation, align_corners=False, 1-D."""
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), np.float32(1.0) - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def upsample_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of x (B, h, w, C) to (B, height, width, C), float32 result.

    Matches `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` with an
    explicit `size` (source = (dst + 0.5) * in / out - 0.5, clamped at 0; no antialiasing, so
    downsampling also matches torch). Implemented as two small interpolation matrices, so the
    gradient is the exact transpose.
    """
    if x.ndim != 4:
        raise ValueError(f"upsample_bilinear: x must be (B, h, w, C), got shape {x.shape}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"upsample_bilinear: output size must be >= 1, got {height}x{width}")
    _, h, w, _ = x.shape
    x = x.astype(jnp.promote_types(x.dtype, _F32))
    if (h, w) == (int(height), int(width)):
        return x
    mh = jnp.asarray(_interp_matrix(h, int(height)))
    mw = jnp.asarray(_interp_matrix(w, int(width)))
    y = jnp.einsum("Hh,bhwc->bHwc", mh, x, precision=_HI)
    return jnp.einsum("Ww,bHwc->bHWc", mw, y, precision=_HI)


def grid_sample(image: jax.Array, grid: jax.Array, align_corners: bool = False) -> jax.Array:
    """Bilinear sampling of image (B, H, W, C) at grid (B, Ho, Wo, 2) (x, y in [-1, 1]).

    Matches `torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros",
    align_corners=...)` in values and in gradients w.r.t. image and grid (corners outside the
    image contribute zero; coordinates outside [-1, 1] are allowed). Unnormalisation:
    align_corners=False: ((x + 1) * W - 1) / 2; True: (x + 1) / 2 * (W - 1). Returns
    (B, Ho, Wo, C) in float32 (or wider).
    """
    if image.ndim != 4:
        raise ValueError(f"grid_sample: image must be (B, H, W, C), got shape {image.shape}")
    if grid.ndim != 4 or grid.shape[-1] != 2 or grid.shape[0] != image.shape[0]:
        raise ValueError(
            f"grid_sample: grid must be (B={image.shape[0]}, Ho, Wo, 2), got shape {grid.shape}"
        )
    b, hi, wi, c = image.shape
    _, ho, wo, _ = grid.shape
    dt = jnp.promote_types(jnp.promote_types(image.dtype, grid.dtype), _F32)
    image = image.astype(dt)
    grid = grid.astype(dt)
    gx, gy = grid[..., 0], grid[..., 1]
    if align_corners:
        ix = (gx + 1) / 2 * (wi - 1)
        iy = (gy + 1) / 2 * (hi - 1)
    else:
        ix = ((gx + 1) * wi - 1) / 2
        iy = ((gy + 1) * hi - 1) / 2
    ix0 = lax.stop_gradient(jnp.floor(ix))
    iy0 = lax.stop_gradient(jnp.floor(iy))
    ix1 = ix0 + 1
    iy1 = iy0 + 1
    # torch's corner weights, same expressions (nw, ne, sw, se)
    w_nw = (ix1 - ix) * (iy1 - iy)
    w_ne = (ix - ix0) * (iy1 - iy)
    w_sw = (ix1 - ix) * (iy - iy0)
    w_se = (ix - ix0) * (iy - iy0)
    cx = jnp.stack([ix0, ix1, ix0, ix1], axis=0)  # (4, B, Ho, Wo)
    cy = jnp.stack([iy0, iy0, iy1, iy1], axis=0)
    valid = (cx >= 0) & (cx <= wi - 1) & (cy >= 0) & (cy <= hi - 1)
    idx = jnp.clip(cy, 0, hi - 1).astype(jnp.int32) * wi + jnp.clip(cx, 0, wi - 1).astype(jnp.int32)
    idx = jnp.moveaxis(idx, 0, 1).reshape(b, 4 * ho * wo)
    vals = jax.vmap(lambda im, i: im[i])(image.reshape(b, hi * wi, c), idx)
    vals = jnp.moveaxis(vals.reshape(b, 4, ho, wo, c), 1, 0)
    vals = jnp.where(valid[..., None], vals, 0)
    return (
        w_nw[..., None] * vals[0]
        + w_ne[..., None] * vals[1]
        + w_sw[..., None] * vals[2]
        + w_se[..., None] * vals[3]
    )


# --------------------------------------------------------------------------------------------
# Leffa loss
# --------------------------------------------------------------------------------------------


def flow_to_image_size(flow: jax.Array, height: int, width: int) -> jax.Array:
    """Layer flow (B, h, w, 2) -> warp grid (B, height, width, 2): bilinear upsampling
    (align_corners=False), then clip to [-1, 1] (the official order)."""
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow_to_image_size: flow must be (B, h, w, 2), got shape {flow.shape}")
    return jnp.clip(upsample_bilinear(flow, height, width), -1.0, 1.0)


def warp(ref_image: jax.Array, flow: jax.Array) -> jax.Array:
    """Warp ref_image (B, H, W, C) with an image-size flow (B, H, W, 2): bilinear grid sampling,
    zeros padding, align_corners=False."""
    if flow.ndim != 4 or flow.shape[:3] != ref_image.shape[:3]:
        raise ValueError(
            f"warp: flow must be (B, H, W, 2) = {ref_image.shape[:3] + (2,)} matching ref_image "
            f"{ref_image.shape}; upsample it with flow_to_image_size first, got {flow.shape}"
        )
    return grid_sample(ref_image, flow, align_corners=False)


def layer_loss(
    warped: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    kind: str = "smooth_l1",
    *,
    beta: float = 1.0,
) -> jax.Array:
    """Per-sample loss (B,) between `warped * mask` and `target * mask`.

    warped, target (B, H, W, C); mask (B, H, W, 1) or (B, H, W). Mean over all H*W*C elements.
    kind "smooth_l1" (torch smooth_l1_loss, `beta`) or "l2" (squared error).
    """
    if warped.shape != target.shape or warped.ndim != 4:
        raise ValueError(
            f"layer_loss: warped and target must both be (B, H, W, C), got {warped.shape} and "
            f"{target.shape}"
        )
    if mask.ndim == 3:
        mask = mask[..., None]
    if (
        mask.ndim != 4
        or mask.shape[:3] != warped.shape[:3]
        or mask.shape[3] not in (1, warped.shape[3])
    ):
        raise ValueError(
            f"layer_loss: mask must be (B, H, W, 1) or (B, H, W) = {warped.shape[:3]}, got {mask.shape}"
        )
    m = mask.astype(_F32)
    diff = warped.astype(_F32) * m - target.astype(_F32) * m
    if kind == "smooth_l1":
        a = jnp.abs(diff)
        el = jnp.where(a < beta, 0.5 * diff * diff / beta, a - 0.5 * beta)
    elif kind == "l2":
        el = diff * diff
    else:
        raise ValueError(f"layer_loss: kind must be 'smooth_l1' or 'l2', got {kind!r}")
    return jnp.mean(el, axis=(1, 2, 3))


def leffa_loss(
    flows: Sequence[jax.Array],
    ref_image: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    timesteps: jax.Array,
    *,
    lam: float = 1e-3,
    t_threshold: int = 500,
    kind: str = "smooth_l1",
) -> jax.Array:
    """Scalar Leffa loss.

    flows: per selected layer, a flow (B, h_l, w_l, 2) at the layer's resolution (as from
    `flow_from_qk`); each is upsampled to the image size and clipped (`flow_to_image_size`;
    image-size flows pass through unchanged). ref_image, target (B, H, W, C); mask (B, H, W, 1);
    timesteps (B,). Returns `lam * mean_B(gate_b * mean_layers(layer_loss))`, gate_b = t_b <
    t_threshold (gated samples count as zero in the batch mean).
    """
    if len(flows) == 0:
        raise ValueError("leffa_loss: flows must hold at least one layer flow")
    if ref_image.ndim != 4 or target.shape != ref_image.shape:
        raise ValueError(
            f"leffa_loss: ref_image and target must both be (B, H, W, C), got {ref_image.shape} "
            f"and {target.shape}"
        )
    b, hh, ww, _ = ref_image.shape
    timesteps = jnp.asarray(timesteps)
    if timesteps.shape != (b,):
        raise ValueError(f"leffa_loss: timesteps must be (B={b},), got {timesteps.shape}")
    losses = []
    for i, f in enumerate(flows):
        if f.ndim != 4 or f.shape[0] != b or f.shape[-1] != 2:
            raise ValueError(f"leffa_loss: flows[{i}] must be (B={b}, h, w, 2), got {f.shape}")
        grid = flow_to_image_size(f, hh, ww)
        losses.append(layer_loss(warp(ref_image, grid), target, mask, kind))
    per_sample = jnp.mean(jnp.stack(losses, axis=0), axis=0)
    gate = (timesteps < t_threshold).astype(_F32)
    return lam * jnp.mean(per_sample * gate)


def select_layers(
    map_shapes: Sequence[tuple[int, int]],
    image_hw: tuple[int, int],
    min_ratio: float = 1 / 32,
) -> tuple[int, ...]:
    """Indices of layers whose attention map (h, w) is at least `min_ratio` of the image size
    (H, W) in both dimensions (inclusive). SD1.5 at 1024x768: the 32x24 maps qualify, the mid
    block's 16x12 does not."""
    hh, ww = (int(v) for v in image_hw)
    out = []
    eps = 1e-9
    for i, shape in enumerate(map_shapes):
        if len(shape) != 2:
            raise ValueError(f"select_layers: map_shapes[{i}] must be (h, w), got {shape}")
        h, w = (int(v) for v in shape)
        if h >= hh * min_ratio - eps and w >= ww * min_ratio - eps:
            out.append(i)
    return tuple(out)


def layer_hw(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with `n_tokens` tokens in a UNet on a latent (h0, w0): the grid after
    k stride-2 downsamplings (ceil division, as a padded 3x3 stride-2 conv gives)."""
    h, w = (int(v) for v in latent_hw)
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n_tokens:
        raise ValueError(
            f"layer_hw: {n_tokens} tokens is no downsampling of the latent {latent_hw}"
        )
    return h, w
