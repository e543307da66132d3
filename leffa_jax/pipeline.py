"""The Leffa sampling pipeline: one compiled program from images to uint8 results.

Leffa's composition of the shared sampling parts (`leffa_jax.sampling`), following the official
`LeffaPipeline.__call__` (github.com/franciszzj/Leffa, leffa/pipeline.py) step by step:

1. `masked = person * (mask < 0.5)`; both VAE posteriors are SAMPLED (`mean + std * noise`) and
   scaled by the VAE scaling factor; `model.inpainting_conditions` takes mask and densepose to
   latent size (torch `nearest`) beside the masked-image latent.
2. The noise function (`leffa_eps_fn`) runs the generative UNet once per step on the two
   classifier-free-guidance branches (sample-major on the batch axis): unconditional = reference
   features of an ALL-ZERO reference latent (they depend only on t: computed with batch 1 and
   broadcast), conditional = the garment's. `guidance.classifier_free_guidance` combines them,
   with `rescale_noise_cfg(phi)`, phi = g by default (the official code passes the guidance
   scale as `guidance_rescale`); phi = 0 is off.
3. The loop (`loop.denoise`) steps any registered stepper: "ddpm" (official: ancestral DDPM with
   the base model's betas), "ddim", "dpmpp_2m", "unipc", "pndm", "deis". The noise schedule is
   `schedulers.schedule_for_model` (zero-terminal SNR for SDXL bases, as the official code).
4. `ref_acceleration`: the reference UNet runs once, at `timesteps[steps // 2]`.
5. Decode `D(latent / sf)`, `imageio.to_uint8`; optional repaint (host side, the official
   `do_repaint`, `imageio.apply_repaint`).

Layout: NHWC. Encode, loop and decode are one `jax.jit` (keyed on shapes, stepper and options)
over the model split into (graphdef, state). Parameters stay float32 (master); the UNets run in
`dtype`, the VAE in `vae_dtype` (float32 by default), cast once per call inside the program;
stepper, guidance and latents stay float32. With several local devices and a batch that divides,
the batch is sharded over all of them (`loop.batch_mesh`); a sample's two branches stay on one
device.

Random draws: with `noise=None` every draw comes from `jax.random` with `seed`; otherwise a
mapping with the official fixture's keys (`NOISE_KEYS`, NHWC; `noise_from_torch` converts the
NCHW arrays a PyTorch run records) is replayed, which reproduces that run exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import checks, components, sharding
from leffa_jax.imageio import apply_repaint, repaint_radius, resize_and_center, to_uint8
from leffa_jax.model import generative_input, inpainting_conditions
from leffa_jax.sampling import guidance
from leffa_jax.sampling.guidance import rescale_noise_cfg
from leffa_jax.sampling.loop import batch_mesh, denoise, progress_reporting, shard_batch
from leffa_jax.sampling.steppers import STEPPERS, make_stepper
from leffa_jax.schedulers import Schedule, schedule_for_model, uses_zero_terminal_snr

__all__ = [
    "NOISE_KEYS",
    "SCHEDULERS",
    "DTYPES",
    "GenerateOutput",
    "generate",
    "leffa_schedule",
    "uses_zero_terminal_snr",
    "cast_params",
    "encode_conditions",
    "reference_features_both",
    "leffa_eps_fn",
    "rescale_noise_cfg",
    "noise_from_torch",
    "draw_noise",
    "apply_repaint",
    "repaint_radius",
    "to_uint8",
]

NOISE_KEYS = ("vae_sample_noise_masked", "vae_sample_noise_ref", "init_noise", "step_noise")
SCHEDULERS = tuple(STEPPERS)
DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}
_F32 = jnp.float32


class GenerateOutput(NamedTuple):
    """images (B,H,W,3) uint8 (repainted when asked); latents (K,B,h,w,C) float32 scaled latents
    after each of the stepper's K model evaluations (K = steps, pndm: steps + 1), or None;
    decoded (B,H,W,3) float32 VAE output before clipping; timesteps (K,) int64."""

    images: np.ndarray
    latents: np.ndarray | None
    decoded: np.ndarray
    timesteps: np.ndarray


def leffa_schedule(model, zero_snr: bool | None = None) -> Schedule:
    """The model's noise schedule (`schedulers.schedule_for_model`); `zero_snr` overrides the
    zero-terminal-SNR choice."""
    if zero_snr is None:
        return schedule_for_model(model)
    return schedule_for_model(model, rescale_betas_zero_snr=bool(zero_snr))


# --------------------------------------------------------------------------------------------
# Leffa's pieces (traceable, NHWC)
# --------------------------------------------------------------------------------------------


def cast_params(state, compute_dtype, vae_dtype, system=components.LEFFA):
    """Cast floating params once per call: components of kind "vae" to vae_dtype, the others
    (the UNets) to compute_dtype."""
    kinds = {c.name: c.kind for c in system}

    def cast(path, x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        top = path[0].key if hasattr(path[0], "key") else None
        return x.astype(vae_dtype if kinds.get(top) == "vae" else compute_dtype)

    return jax.tree_util.tree_map_with_path(cast, state)


def encode_conditions(
    model, person, garment, mask, densepose, noise_masked, noise_ref, vae_dtype=_F32
):
    """-> (conditions (B,h,w,1+C+3) `[mask | masked-image latent | densepose]` at latent size,
    ref_latent (B,h',w',C)), both float32 and scaled."""
    sf = model.scaling_factor
    masked = person * (mask < 0.5).astype(person.dtype)
    if masked.shape == garment.shape:  # one VAE pass over per-sample (masked, garment) pairs
        both = guidance.interleave_branches(masked, garment).astype(vae_dtype)
        noise = guidance.interleave_branches(noise_masked, noise_ref)
        latents = model.vae.sample_posterior(model.encode(both), noise).astype(_F32) * sf
        masked_latent, ref_latent = guidance.split_branches(latents, 2)
    else:
        post_m = model.encode(masked.astype(vae_dtype))
        post_r = model.encode(garment.astype(vae_dtype))
        masked_latent = model.vae.sample_posterior(post_m, noise_masked).astype(_F32) * sf
        ref_latent = model.vae.sample_posterior(post_r, noise_ref).astype(_F32) * sf
    return inpainting_conditions(mask, masked_latent, densepose), ref_latent


def reference_features_both(
    model, ref_latent, t, compute_dtype=_F32, attention_kernel="xla", fuse=True
):
    """Reference features of both guidance branches: (uncond (1,N,C)..., cond (B,N,C)...); the
    unconditional branch is the all-zero reference latent (depends only on t). `fuse`: one
    reference-UNet call on [zero; references] (unsharded batches)."""
    zero = jnp.zeros((1,) + ref_latent.shape[1:], compute_dtype)
    ref = ref_latent.astype(compute_dtype)
    if fuse:
        feats = model.reference_features(
            jnp.concatenate([zero, ref]), t, attention_kernel=attention_kernel
        )
        return tuple(f[:1] for f in feats), tuple(f[1:] for f in feats)
    uncond = model.reference_features(zero, t, attention_kernel=attention_kernel)
    cond = model.reference_features(ref, t, attention_kernel=attention_kernel)
    return uncond, cond


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of the compiled program (part of the jit cache key)."""

    rescale: bool
    reference_step: int | None  # ref_acceleration: features at timesteps[reference_step]
    return_latents: bool
    compute_dtype: Any
    vae_dtype: Any
    attention_kernel: str
    fuse_uncond_ref: bool  # run the zero-latent reference pass in the same batch (1 device)


def leffa_eps_fn(model, ref_latent, guidance_scale, phi=None, *, compute_dtype=_F32,
                 attention_kernel="xla", fuse_uncond_ref=True, reference_t=None):
    """Leffa's noise function for `loop.denoise`: eps_fn(x (B,h,w,C), t, conditions (2B,h,w,8)
    branch-paired) -> guided eps (B,h,w,C) float32. One generative-UNet call per step over the
    (uncond, cond) branches; phi: `rescale_noise_cfg` (None = off); `reference_t`: reference
    features computed once, at that t (ref_acceleration)."""

    def features_at(t):
        uncond, cond = reference_features_both(
            model, ref_latent, t, compute_dtype, attention_kernel, fuse_uncond_ref
        )
        return tuple(guidance.interleave_branches(u, c) for u, c in zip(uncond, cond, strict=True))

    fixed = None if reference_t is None else features_at(reference_t)

    def eps_fn(x, t, conditions):
        features = features_at(t) if fixed is None else fixed
        gen = generative_input(guidance.repeat_branches(x, 2), conditions)
        eps = model.predict_noise(
            gen.astype(compute_dtype), t, features, attention_kernel=attention_kernel
        ).astype(_F32)
        eps_uncond, eps_cond = guidance.split_branches(eps, 2)
        return guidance.classifier_free_guidance(eps_uncond, eps_cond, guidance_scale, phi)

    return eps_fn


def _sample_impl(graphdef, state, person, garment, mask, densepose, noise, stepper,
                 guidance_scale, phi, progress, opts: _Options):
    model = nnx.merge(graphdef, cast_params(state, opts.compute_dtype, opts.vae_dtype))
    conditions, ref_latent = encode_conditions(
        model, person, garment, mask, densepose, noise["vae_sample_noise_masked"],
        noise["vae_sample_noise_ref"], opts.vae_dtype,
    )
    reference_t = None
    if opts.reference_step is not None:
        reference_t = stepper.timesteps[opts.reference_step]
    eps_fn = leffa_eps_fn(
        model, ref_latent, guidance_scale, phi if opts.rescale else None,
        compute_dtype=opts.compute_dtype, attention_kernel=opts.attention_kernel,
        fuse_uncond_ref=opts.fuse_uncond_ref, reference_t=reference_t,
    )
    x, latents = denoise(
        stepper, eps_fn, noise["init_noise"], guidance.repeat_branches(conditions, 2),
        step_noise=noise["step_noise"] if stepper.needs_noise else None,
        return_latents=opts.return_latents, progress=progress,
    )
    decoded = model.decode(x.astype(opts.vae_dtype)).astype(_F32)
    return to_uint8(decoded), latents, decoded


_sample = jax.jit(_sample_impl, static_argnames=("graphdef", "opts"))


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def noise_from_torch(noise: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Recorded NCHW noise (a PyTorch run / the official fixture's `pipeline.npz`) -> the NHWC
    mapping `generate` replays: (B,C,h,w) -> (B,h,w,C), step_noise (N,B,C,h,w) -> (N,B,h,w,C)."""
    missing = [k for k in NOISE_KEYS if k not in noise]
    if missing:
        raise KeyError(f"recorded noise lacks {missing}; needs all of {list(NOISE_KEYS)}")
    out = {k: np.asarray(noise[k], np.float32).transpose(0, 2, 3, 1) for k in NOISE_KEYS[:3]}
    out["step_noise"] = np.asarray(noise["step_noise"], np.float32).transpose(0, 1, 3, 4, 2)
    return out


def draw_noise(
    seed: int,
    batch: int,
    latent_hw: tuple[int, int],
    ref_hw: tuple[int, int],
    channels: int,
    steps: int,
) -> dict[str, jax.Array]:
    """Every random draw of one sampling call from `jax.random` (NHWC, float32): independent
    streams per key, so a draw does not depend on the device layout."""
    k = jax.random.split(jax.random.key(seed), 4)
    h, w = latent_hw
    hr, wr = ref_hw
    return {
        "vae_sample_noise_masked": jax.random.normal(k[0], (batch, h, w, channels), _F32),
        "vae_sample_noise_ref": jax.random.normal(k[1], (batch, hr, wr, channels), _F32),
        "init_noise": jax.random.normal(k[2], (batch, h, w, channels), _F32),
        "step_noise": jax.random.normal(k[3], (steps, batch, h, w, channels), _F32),
    }


def _check_noise(noise: Mapping[str, Any], want: dict[str, tuple[int, ...]]) -> dict:
    missing = [k for k in NOISE_KEYS if k not in noise]
    if missing:
        raise ValueError(
            f"noise mapping lacks {missing}; give all of {list(NOISE_KEYS)} "
            "(the keys of the official fixture's pipeline.npz)"
        )
    out = {}
    for k, shape in want.items():
        a = np.asarray(noise[k], np.float32)
        if a.shape != shape:
            hint = ""
            nchw = shape[:-3] + (shape[-1],) + shape[-3:-1]
            if a.shape == nchw:
                hint = " It looks NCHW: convert recorded PyTorch noise with noise_from_torch()."
            raise ValueError(f"noise[{k!r}] has shape {a.shape}, expected NHWC {shape}.{hint}")
        out[k] = a
    return out


def _noise_for_call(model, person, garment, steps: int, seed: int, noise) -> dict:
    """Every draw of one `generate` call: replayed `noise` (shapes checked) or drawn from seed."""
    factor, c = model.vae.downsample_factor, model.vae.config.latent_channels
    b, lh, lw = person.shape[0], person.shape[1] // factor, person.shape[2] // factor
    rh, rw = garment.shape[1] // factor, garment.shape[2] // factor
    if noise is None:
        return draw_noise(seed, b, (lh, lw), (rh, rw), c, steps)
    return _check_noise(noise, {
        "vae_sample_noise_masked": (b, lh, lw, c),
        "vae_sample_noise_ref": (b, rh, rw, c),
        "init_noise": (b, lh, lw, c),
        "step_noise": (steps, b, lh, lw, c),
    })


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _garment_like_person(garment: np.ndarray, person_hw: tuple[int, int]) -> np.ndarray:
    """A garment (reference) of another size than the person is resized and centred onto the
    person's size, keeping its aspect ratio on white padding (OpenCV bicubic, clipped to
    [-1, 1]), as the official demo prepares every image before its pipeline."""
    if garment.shape[1:3] == tuple(person_hw):
        return garment
    out = [resize_and_center(g, *person_hw, fill=1.0) for g in garment]
    return np.clip(np.stack(out), -1.0, 1.0).astype(np.float32)


def _checked_inputs(model, person, garment, mask, densepose):
    """`checks.validate_inputs`, then the garment brought to the person's size."""
    person, garment, mask, densepose = checks.validate_inputs(
        person, garment, mask, densepose, model.vae.downsample_factor)
    return person, _garment_like_person(garment, person.shape[1:3]), mask, densepose


def _dtype(name) -> Any:
    if not isinstance(name, str):
        name = jnp.dtype(name).name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def generate(
    model,
    person,
    garment,
    mask,
    densepose,
    *,
    steps: int = 30,
    guidance: float = 2.5,
    guidance_rescale: float | None = None,
    ref_acceleration: bool = False,
    repaint: bool = False,
    seed: int = 42,
    noise: Mapping[str, Any] | None = None,
    dtype="float32",
    vae_dtype="float32",
    scheduler: str = "ddpm",
    zero_snr: bool | None = None,
    return_latents: bool = False,
    attention_kernel: str = "xla",
    shard: bool = True,
    progress: Callable[[int], None] | None = None,
) -> GenerateOutput:
    """Sample Leffa results (try-on or pose transfer).

    person, garment: (B,H,W,3) in [-1, 1] (garment = reference image; of another size, it is
    resized and centred onto the person's size on white, as the official demo does); mask:
    (B,H,W[,1]) in {0, 1}, 1 = region to generate (all ones for pose transfer); densepose:
    (B,H,W,3) in [-1, 1]. Non-finite inputs, settings or results, and a request that cannot fit
    the device's memory (`checks.check_memory`, before compiling) raise ValueError.
    guidance: CFG scale g; guidance_rescale: phi of `rescale_noise_cfg` (None = g, as the
    official pipeline; 0 turns it off). noise: recorded draws to replay (`NOISE_KEYS`, NHWC;
    see `noise_from_torch`), else everything is drawn from `seed`. dtype: UNet compute dtype
    ("float32", "bfloat16", "float16"); vae_dtype: the VAE's. scheduler: any registered stepper
    (`SCHEDULERS`; "ddpm" is the official one). zero_snr: override the zero-terminal-SNR
    choice. progress: called with the step index after each step (from inside the compiled
    loop; this call's steps only).

    Returns GenerateOutput(images uint8 (B,H,W,3), latents (K,B,h,w,C) or None, decoded
    (B,H,W,3) float32, timesteps (K,)).
    """
    if scheduler not in STEPPERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    checks.check_settings(guidance=guidance, guidance_rescale=guidance_rescale)
    person, garment, mask, densepose = _checked_inputs(model, person, garment, mask, densepose)
    b = person.shape[0]
    stepper = make_stepper(scheduler, leffa_schedule(model, zero_snr), steps)
    nz = _noise_for_call(model, person, garment, steps, seed, noise)
    phi = float(guidance) if guidance_rescale is None else float(guidance_rescale)
    mesh = batch_mesh(b, shard)
    checks.check_memory(model, b // (mesh.size if mesh is not None else 1), *person.shape[1:3],
                        jnp.dtype(_dtype(dtype)).itemsize, attention_kernel)
    opts = _Options(
        rescale=phi != 0.0,
        reference_step=steps // 2 if ref_acceleration else None,
        return_latents=bool(return_latents),
        compute_dtype=_dtype(dtype),
        vae_dtype=_dtype(vae_dtype),
        attention_kernel=attention_kernel,
        fuse_uncond_ref=mesh is None,
    )
    graphdef, state = nnx.split(model)
    inputs = shard_batch((person, garment, mask, densepose), mesh)
    nz = shard_batch(nz, mesh, {k: 1 if k == "step_noise" else 0 for k in nz})
    if mesh is not None:
        state = jax.device_put(state, sharding.replicated(mesh))
    with progress_reporting(progress) as progress_id:
        images, latents, decoded = _sample(
            graphdef, state, *inputs, nz, stepper, jnp.float32(guidance), jnp.float32(phi),
            progress_id, opts=opts,
        )
        images, decoded = np.asarray(images), np.asarray(decoded)
        latents = None if latents is None else np.asarray(latents)
    checks.check_results(decoded, model, jnp.dtype(_dtype(dtype)).name)
    if repaint:
        images = apply_repaint(to_uint8(person), mask, images)
    return GenerateOutput(images, latents, decoded, np.asarray(stepper.timesteps, np.int64))
