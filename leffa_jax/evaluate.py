"""Does the learned attention point at the right place? Flow endpoint error against a known
correspondence (the synthetic set's `flow_gt`).

For each test pair the generative UNet runs once at timestep `t` (person latent noised with a
fixed seed, the reference from the garment), each selected layer's attention flow is upsampled to
the image and compared with `flow_gt` on the garment pixels (`flow_gt_valid * garment_mask`):
EPE = mean over those pixels of the Euclidean distance in pixels. Both flows are `grid_sample`
grids (align_corners=False), so pixels are (x * W/2, y * H/2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from leffa_jax import flow as flow_lib
from leffa_jax import schedulers
from leffa_jax.objectives import flow_probe


def endpoint_error(flow: np.ndarray, flow_gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-sample EPE in pixels. flow, flow_gt (B,H,W,2) normalised; valid (B,H,W,1) -> (B,)."""
    h, w = flow.shape[1:3]
    d = (np.asarray(flow) - np.asarray(flow_gt)) * np.array([w / 2, h / 2], np.float32)
    e = np.sqrt((d ** 2).sum(-1))
    v = np.asarray(valid)[..., 0] > 0.5
    return np.array([e[i][v[i]].mean() if v[i].any() else np.nan for i in range(len(e))])


def attention_flows(model, batch: dict, *, t: int = 250, layers=None, seed: int = 0,
                    tau: float = 2.0) -> dict[int, jax.Array]:
    """{layer: flow (B,H,W,2) at image size} of the generative UNet's attention for a batch."""
    person = jnp.asarray(batch["person"])
    garment = jnp.asarray(batch["garment"])
    mask = jnp.asarray(batch["mask"])
    sf, f = model.scaling_factor, model.vae.downsample_factor
    b, hh, ww = person.shape[:3]
    tt = jnp.full((b,), t)
    z = model.encode(person).mean * sf
    z_masked = model.encode(person * (mask < 0.5)).mean * sf
    z_ref = model.encode(garment).mean * sf
    sched = schedulers.make_schedule(model.scheduler_config())
    z_t = schedulers.add_noise(sched, z, jax.random.normal(jax.random.PRNGKey(seed), z.shape), tt)
    gen = jnp.concatenate([z_t, mask[:, ::f, ::f], z_masked,
                           jnp.asarray(batch["densepose"])[:, ::f, ::f]], -1)
    layers = tuple(range(model.unet.num_transformer_layers)) if layers is None else layers
    feats = model.reference_features(z_ref, tt)
    _, flows = model.predict_noise(gen, tt, feats, return_probes=True,
                                   probe=flow_probe(layers, tau, fused=True))
    return {i: flow_lib.flow_to_image_size(v, hh, ww) for i, v in flows.items()}


def flow_epe(model, batches, *, t: int = 250, layers=None) -> dict:
    """Mean EPE (pixels) per layer and over layers, plus the identity-flow baseline, over
    batches that carry `flow_gt`, `flow_gt_valid` and `garment_mask`."""
    per_layer: dict[int, list] = {}
    ident = []
    for batch in batches:
        valid = np.asarray(batch["flow_gt_valid"]) * np.asarray(batch["garment_mask"])
        flows = attention_flows(model, batch, t=t, layers=layers)
        for i, fl in flows.items():
            per_layer.setdefault(i, []).append(endpoint_error(fl, batch["flow_gt"], valid))
        b, h, w = valid.shape[:3]
        grid = np.broadcast_to(np.asarray(flow_lib.coordinate_map(h, w)).reshape(1, h, w, 2),
                               (b, h, w, 2))
        ident.append(endpoint_error(grid, batch["flow_gt"], valid))
    layer_epe = {i: float(np.nanmean(np.concatenate(v))) for i, v in per_layer.items()}
    return {"per_layer": layer_epe, "mean": float(np.mean(list(layer_epe.values()))),
            "best": float(min(layer_epe.values())),
            "identity": float(np.nanmean(np.concatenate(ident)))}
