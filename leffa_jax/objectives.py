"""Training objectives: epsilon MSE and the Leffa loss read from the generative UNet's attention.

The Leffa loss (paper section 3.3; LEFFA_REFERENCE.md section 5) per selected self-attention
layer l of the generative UNet:
    A_l   = mean_heads softmax(Q_gen K_ref^T / (tau sqrt d))            (B, N, N), never stored
    F_l   = A_l @ coordinate_map(h_l, w_l)                               (B, h_l, w_l, 2)
    loss  = lam * mean_B( [t < t_threshold] * mean_l d(warp(ref, up(F_l)) * m, target * m) )
The UNet hands each layer's per-head Q and reference K to a `probe` (see nn/unet.py); the flow is
computed right there (fused: chunked, flash-style, custom VJP) so only (B, h, w, 2) per layer
leaves the UNet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from leffa_jax import flow as flow_lib
from leffa_jax.nn.unet import Probe, UNet


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


def leffa_loss_from_flows(flows: dict[int, jax.Array], ref_image: jax.Array, target: jax.Array,
                          mask: jax.Array, timesteps: jax.Array, cfg: LeffaLossConfig
                          ) -> jax.Array:
    """Scalar loss from {layer: flow} (layer order), images (B,H,W,3) in [-1,1], mask (B,H,W,1)."""
    ordered = [flows[i] for i in sorted(flows)]
    t = jnp.broadcast_to(jnp.asarray(timesteps), (ref_image.shape[0],))
    return flow_lib.leffa_loss(ordered, ref_image, target, mask, t, lam=cfg.lam,
                               t_threshold=cfg.t_threshold, kind=cfg.kind)


def epsilon_mse(eps_pred: jax.Array, noise: jax.Array) -> jax.Array:
    """Mean squared error in float32."""
    return jnp.mean(jnp.square(eps_pred.astype(jnp.float32) - noise.astype(jnp.float32)))
