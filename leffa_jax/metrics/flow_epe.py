"""Flow endpoint error of the attention (moved from `leffa_jax.evaluate`, which re-exports it).

Does the learned attention point at the right place? Flow endpoint error against a known
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
from leffa_jax.model import generative_input, inpainting_conditions
from leffa_jax.objectives import flow_probe


def endpoint_error(flow: np.ndarray, flow_gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-sample EPE in pixels. flow, flow_gt (B,H,W,2) normalised; valid (B,H,W,1) -> (B,)."""
    h, w = flow.shape[1:3]
    d = (np.asarray(flow) - np.asarray(flow_gt)) * np.array([w / 2, h / 2], np.float32)
    e = np.sqrt((d ** 2).sum(-1))
    v = np.asarray(valid)[..., 0] > 0.5
    return np.array([e[i][v[i]].mean() if v[i].any() else np.nan for i in range(len(e))])


def probe_inputs(model, person, garment, mask, densepose, *, t: int, seed: int = 0):
    """The generative UNet's inputs for looking at its attention at one timestep: the person's
    latent (posterior mean) noised to t with the model's schedule (`schedule_for_model`), the
    inpainting conditions, and the garment's reference features at t.
    Images (B,H,W,C) -> (gen_input (B,h,w,12), reference features, t (B,))."""
    sf = model.scaling_factor
    t_batch = jnp.full((person.shape[0],), t)
    latent = model.encode(person).mean * sf
    masked_latent = model.encode(person * (mask < 0.5)).mean * sf
    ref_latent = model.encode(garment).mean * sf
    noise = jax.random.normal(jax.random.PRNGKey(seed), latent.shape)
    noisy = schedulers.add_noise(schedulers.schedule_for_model(model), latent, noise, t_batch)
    gen = generative_input(noisy, inpainting_conditions(mask, masked_latent, densepose))
    return gen, model.reference_features(ref_latent, t_batch), t_batch


def attention_flows(model, batch: dict, *, t: int = 250, layers=None, seed: int = 0,
                    tau: float = 2.0) -> dict[int, jax.Array]:
    """{layer: flow (B,H,W,2) at image size} of the generative UNet's attention for a batch."""
    person = jnp.asarray(batch["person"])
    hh, ww = person.shape[1:3]
    gen, feats, t_batch = probe_inputs(
        model, person, jnp.asarray(batch["garment"]), jnp.asarray(batch["mask"]),
        jnp.asarray(batch["densepose"]), t=t, seed=seed)
    layers = tuple(range(model.unet.num_transformer_layers)) if layers is None else layers
    _, flows = model.predict_noise(gen, t_batch, feats, return_probes=True,
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
