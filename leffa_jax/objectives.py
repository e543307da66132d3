"""Training objectives: epsilon MSE and the Leffa loss read from the generative UNet's attention.

The Leffa loss (paper section 3.3) per selected self-attention
layer l of the generative UNet:
    A_l   = mean_heads softmax(Q_gen K_ref^T / (tau sqrt d))            (B, N, N), never stored
    F_l   = A_l @ coordinate_map(h_l, w_l)                               (B, h_l, w_l, 2)
    loss  = lam * mean_B( [t < t_threshold] * mean_l d(warp(ref, up(F_l)) * m, target * m) )
The UNet hands each layer's per-head Q and reference K to a `probe` (see nn/transformer.py); the
flow is computed right there (fused: chunked, flash-style, custom VJP) so only (B, h, w, 2) per
layer leaves the UNet.

Attention probes at any softmax (self, reference, text, image prompt; `attention_probe=` of the
UNet) for attention losses and pictures:
- `key_mass_probe`: per query, the head-averaged softmax mass on each of a few key ranges, a map
  (B, h, w, G) (StoryMaker's attention-mask loss: the image-prompt attention mass of the
  background and of each character's tokens), computed in query chunks without the N x M map;
- `attention_probability_probe`: the materialised head-averaged attention (B, N, M).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from leffa_jax import flow as flow_lib
from leffa_jax.nn.unet import AttentionProbe, Probe, ProbeSite, UNet

# (start, stop) over the keys of one softmax, Python slice semantics (negative = from the end).
KeyRange = tuple[int | None, int | None]


@dataclasses.dataclass(frozen=True)
class LeffaLossConfig:
    lam: float = 1e-3            # weight of the Leffa term
    tau: float = 2.0             # softmax temperature
    t_threshold: int = 500       # per-sample gate: only t < t_threshold contributes
    min_ratio: float = 1 / 32    # layers whose map is >= min_ratio of the image size
    kind: str = "l2"             # "l2" (paper) or "smooth_l1" (early draft, beta 1)
    fused: bool = True           # fused flow (no N x N map) or materialised attention
    chunk_size: int | None = None  # query rows per chunk for the fused path
    layers: tuple[int, ...] | None = None  # explicit layer indices (overrides min_ratio)


def selected_layers(unet: UNet, latent_hw: tuple[int, int], image_hw: tuple[int, int],
                    cfg: LeffaLossConfig) -> tuple[int, ...]:
    """Layer indices (call order) the loss uses: explicit, or by map size vs image size."""
    if cfg.layers is not None:
        bad = [i for i in cfg.layers if not 0 <= i < unet.num_transformer_layers]
        if bad:
            raise ValueError(f"Leffa loss layers {bad} out of range: the UNet has "
                             f"{unet.num_transformer_layers} transformer layers")
        return tuple(cfg.layers)
    layers = flow_lib.select_layers(unet.layer_resolutions(latent_hw), image_hw, cfg.min_ratio)
    if not layers:
        raise ValueError(f"no attention layer reaches {cfg.min_ratio:g} of the image size "
                         f"{image_hw}; lower min_ratio or pick layers explicitly")
    return layers


def flow_probe(layers: Sequence[int], tau: float = 2.0, *, fused: bool = True,
               chunk_size: int | None = None) -> Probe:
    """Probe returning the flow (B, h, w, 2) of each selected layer."""
    wanted = frozenset(layers)

    def probe(index, q, k_ref, hw):
        if index not in wanted:
            return None
        if fused:
            return flow_lib.flow_from_qk(q, k_ref, *hw, tau, chunk_size=chunk_size)
        return flow_lib.flow_from_attention(flow_lib.attention_map(q, k_ref, tau), *hw)

    return probe


def attention_map_probe(layers: Sequence[int], tau: float = 1.0) -> Probe:
    """Probe returning the head-averaged attention (B, N, M) of generated queries over reference
    keys (tau 1: the attention the UNet actually uses; tau 2: the loss's temperature)."""
    wanted = frozenset(layers)
    return lambda index, q, k_ref, hw: (flow_lib.attention_map(q, k_ref, tau)
                                        if index in wanted else None)


def key_group_mass(q: jax.Array, k: jax.Array, groups: Sequence[KeyRange], tau: float = 1.0, *,
                   chunk_size: int | None = None) -> jax.Array:
    """Head-averaged softmax mass of each query on each key range, (B, N, G) float32:

        mass[b, n, g] = mean_h sum_{m in groups[g]} softmax_m(q[b, h, n] . k[b, h, m] / (tau sqrt d))

    q (B, heads, N, d), k (B, heads, M, d). The softmax runs over all M keys; only a
    (B, heads, chunk, M) float32 score block exists at a time (query chunks in `lax.map`, each
    recomputed in the backward pass)."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"key_group_mass: q (B, heads, N, d) and k (B, heads, M, d) must agree, "
                         f"got {q.shape} and {k.shape}")
    b, nh, n, d = q.shape
    m = k.shape[2]
    member = np.zeros((m, len(groups)), np.float32)
    for g, (start, stop) in enumerate(groups):
        if not range(m)[slice(start, stop)]:
            raise ValueError(f"key_group_mass: key range {(start, stop)} is empty for {m} keys")
        member[slice(start, stop), g] = 1.0
    chunk = int(min(chunk_size or flow_lib.default_chunk_size(b, nh, n, m), n))
    pad = (-n) % chunk
    q_chunks = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0)))
    q_chunks = jnp.moveaxis(q_chunks.reshape(b, nh, (n + pad) // chunk, chunk, d), 2, 0)
    keys, member = k.astype(jnp.float32), jnp.asarray(member)
    scale = 1.0 / (float(tau) * math.sqrt(d))

    @jax.checkpoint
    def chunk_mass(q_chunk):  # (B, heads, chunk, d) -> (B, chunk, G)
        probs = jax.nn.softmax(jnp.einsum("bhnd,bhmd->bhnm", q_chunk, keys) * scale, axis=-1)
        return jnp.einsum("bhnm,mg->bng", probs, member) / nh

    mass = lax.map(chunk_mass, q_chunks)  # (n_chunks, B, chunk, G)
    return jnp.moveaxis(mass, 0, 1).reshape(b, n + pad, len(groups))[:, :n]


def _at(site: ProbeSite, branch: str, layers: frozenset[int] | None) -> bool:
    return site.branch == branch and (layers is None or site.layer_index in layers)


def key_mass_probe(groups: Sequence[KeyRange], *, branch: str = "image_prompt",
                   layers: Sequence[int] | None = None, tau: float = 1.0,
                   chunk_size: int | None = None) -> AttentionProbe:
    """Attention probe: at the `branch` softmax of the selected layers (all when None), the map
    (B, h, w, G) of `key_group_mass`. StoryMaker with one character: branch "image_prompt",
    groups ((0, 20), (20, 40)) = background tokens, character tokens."""
    wanted = None if layers is None else frozenset(layers)
    groups = tuple(groups)

    def probe(site, q, k, hw):
        if not _at(site, branch, wanted):
            return None
        mass = key_group_mass(q, k, groups, tau, chunk_size=chunk_size)
        return mass.reshape(mass.shape[0], *hw, len(groups))

    return probe


def attention_probability_probe(*, branch: str = "text", layers: Sequence[int] | None = None,
                                tau: float = 1.0) -> AttentionProbe:
    """Attention probe: the materialised head-averaged attention (B, N, M) of the `branch`
    softmax ("self", "reference", "text", "image_prompt") in the selected layers."""
    wanted = None if layers is None else frozenset(layers)
    return lambda site, q, k, hw: (flow_lib.attention_map(q, k, tau)
                                   if _at(site, branch, wanted) else None)


def leffa_loss_from_flows(flows: dict[int, jax.Array], ref_image: jax.Array, target: jax.Array,
                          mask: jax.Array, timesteps: jax.Array, cfg: LeffaLossConfig
                          ) -> jax.Array:
    """Scalar loss from {layer: flow} (layer order), images (B,H,W,3) in [-1,1], mask (B,H,W,1)."""
    ordered = [flows[i] for i in sorted(flows)]
    t = jnp.broadcast_to(jnp.asarray(timesteps), (ref_image.shape[0],))
    return flow_lib.leffa_loss(ordered, ref_image, target, mask, t, lam=cfg.lam,
                               t_threshold=cfg.t_threshold, kind=cfg.kind)


def epsilon_mse(eps_pred: jax.Array, noise: jax.Array, weights: jax.Array | None = None
                ) -> jax.Array:
    """Mean squared error in float32; `weights` (B,): per-sample weights of the per-sample means
    (`epsilon_loss_weights`), None: the plain mean."""
    err = jnp.square(eps_pred.astype(jnp.float32) - noise.astype(jnp.float32))
    if weights is None:
        return jnp.mean(err)
    per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return jnp.mean(weights.astype(jnp.float32) * per_sample)


LOSS_WEIGHTINGS = ("uniform", "truncated_snr", "min_snr")
MAX_LOSS_WEIGHT = 1e3  # bounds 1 / SNR where SNR reaches 0 (zero-terminal-SNR schedules)


def epsilon_loss_weights(alphas_cumprod: jax.Array, t: jax.Array, weighting: str = "uniform",
                         gamma: float = 5.0) -> jax.Array:
    """(B,) float32 weights of the per-sample epsilon MSE at timesteps t (B,), SNR = a / (1 - a)
    with a = alphas_cumprod[t]:
    - "uniform": 1 (DDPM's simple loss; Stable Diffusion's and the papers' training);
    - "truncated_snr": max(1, 1 / SNR) (Salimans & Ho 2022): the loss becomes max(|x0 error|^2,
      |eps error|^2), so the noisy steps, where the conditioning decides the picture, weigh as
      much as the nearly clean ones (bounded by MAX_LOSS_WEIGHT);
    - "min_snr": min(SNR, gamma) / SNR (Hang et al. 2023, min-SNR-gamma for epsilon)."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    snr = a / jnp.maximum(1.0 - a, 1e-12)
    if weighting == "uniform":
        return jnp.ones_like(snr)
    if weighting == "truncated_snr":
        return jnp.minimum(jnp.maximum(1.0, 1.0 / jnp.maximum(snr, 1.0 / MAX_LOSS_WEIGHT)),
                           MAX_LOSS_WEIGHT)
    return jnp.minimum(snr, gamma) / jnp.maximum(snr, 1e-12)


def loss_weights(train_config, schedule, t: jax.Array) -> jax.Array | None:
    """`epsilon_loss_weights` for `config.train.loss_weighting` / `snr_gamma`; None if uniform."""
    weighting = train_config.get("loss_weighting", "uniform")
    if weighting == "uniform":
        return None
    return epsilon_loss_weights(schedule.alphas_cumprod, t, weighting,
                                float(train_config.get("snr_gamma", 5.0)))
