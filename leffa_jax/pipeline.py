"""The Leffa sampling pipeline: one compiled program from images to uint8 results.

Follows the official `LeffaPipeline.__call__` (LEFFA_REFERENCE section 3) step by step:

1. `masked = person * (mask < 0.5)`; both VAE posteriors are SAMPLED (`mean + std * noise`) and
   scaled by the VAE scaling factor.
2. mask and densepose go to latent size with torch `nearest` (`x[:, ::f, ::f]`).
3. Classifier-free guidance: the unconditional branch uses reference features of an ALL-ZERO
   reference latent (they depend only on t, so they are computed with batch 1 and broadcast).
   `eps = eps_u + g (eps_c - eps_u)`, then `rescale_noise_cfg(eps, eps_c, phi)` with phi = g by
   default (the official code passes the guidance scale as `guidance_rescale`); phi = 0 is off.
4. Scheduler: ancestral DDPM with the base model's betas ("ddpm", the official one), or "ddim"
   (eta 0) / "dpmpp_2m" (DPM-Solver++ 2M). SDXL-based models use zero-terminal-SNR betas, as the
   official `LeffaModel` does for every base that is not "stable-diffusion-inpainting".
5. `ref_acceleration`: reference UNet run once at `timesteps[N // 2]` for both branches.
6. Decode `D(latent / sf)`, `round(clip(x / 2 + 0.5, 0, 1) * 255)`; optional repaint (host side,
   PIL Gaussian blur exactly as the official `do_repaint`).

Layout: NHWC everywhere. The whole denoising loop is a `lax.scan` inside one `jax.jit` (keyed on
shapes, step count and options), over the model split into (graphdef, state). Parameters stay
float32 (master); the UNets run in `dtype` (float32 / bfloat16 / float16, params cast once per
call inside the program); the VAE runs in `vae_dtype` (float32 by default); scheduler, guidance
and the latents stay float32. CFG runs as per-sample (uncond, cond) pairs in one UNet batch of
2B (each sample's pair stays on one device when the batch is sharded; per-sample results equal
the official [uncond batch; cond batch] order). With several local devices and a batch that
divides, the batch axis is sharded with a NamedSharding over all of them.

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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from leffa_jax import schedulers as S
from leffa_jax.nn.layers import resize_nearest_torch

__all__ = [
    "NOISE_KEYS",
    "SCHEDULERS",
    "DTYPES",
    "GenerateOutput",
    "generate",
    "leffa_schedule",
    "uses_zero_terminal_snr",
    "inference_timesteps",
    "rescale_noise_cfg",
    "noise_from_torch",
    "draw_noise",
    "apply_repaint",
    "repaint_radius",
    "to_uint8",
]

NOISE_KEYS = ("vae_sample_noise_masked", "vae_sample_noise_ref", "init_noise", "step_noise")
SCHEDULERS = ("ddpm", "ddim", "dpmpp_2m")
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
    """images (B,H,W,3) uint8 (repainted when asked); latents (steps,B,h,w,C) float32 scaled
    latents after each step, or None; decoded (B,H,W,3) float32 VAE output before clipping;
    timesteps (steps,) int64."""

    images: np.ndarray
    latents: np.ndarray | None
    decoded: np.ndarray
    timesteps: np.ndarray


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


uses_zero_terminal_snr = S.uses_zero_terminal_snr


def leffa_schedule(model, zero_snr: bool | None = None) -> S.Schedule:
    """The DDPM training schedule the official pipeline samples with: the base config's betas
    (its `_class_name` PNDM/Euler is ignored, as the official code builds a DDPMScheduler), with
    zero-terminal-SNR per `uses_zero_terminal_snr` unless `zero_snr` is given."""
    if zero_snr is None:
        zero_snr = uses_zero_terminal_snr(model.config_dir)
    return S.make_schedule(model.scheduler_config(), rescale_betas_zero_snr=bool(zero_snr))


def inference_timesteps(
    schedule: S.Schedule, steps: int, scheduler: str = "ddpm"
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, prev_timesteps) (steps,) int64 for the chosen scheduler; prev is unused by
    "dpmpp_2m" (it walks its sigma table by step index)."""
    if scheduler == "ddpm":
        return S.ddpm_timesteps(schedule, steps)
    if scheduler == "ddim":
        return S.ddim_timesteps(schedule, steps)
    if scheduler == "dpmpp_2m":
        ts = S.dpm_timesteps(schedule, steps)
        return ts, np.concatenate([ts[1:], [-1]]).astype(np.int64)
    raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}")


# --------------------------------------------------------------------------------------------
# Pieces (pure, NHWC)
# --------------------------------------------------------------------------------------------


def rescale_noise_cfg(eps: jax.Array, eps_cond: jax.Array, phi) -> jax.Array:
    """diffusers/official `rescale_noise_cfg`: phi * eps * std(eps_c) / std(eps) + (1 - phi) *
    eps, std unbiased (ddof=1) over all non-batch axes, per sample (float32)."""
    axes = tuple(range(1, eps.ndim))
    std_c = jnp.std(eps_cond, axis=axes, keepdims=True, ddof=1)
    std_g = jnp.std(eps, axis=axes, keepdims=True, ddof=1)
    return phi * (eps * (std_c / std_g)) + (1 - phi) * eps


def to_uint8(images: jax.Array) -> jax.Array:
    """VAE output about [-1, 1] -> uint8 `round(clip(x / 2 + 0.5, 0, 1) * 255)`."""
    x = jnp.clip(images.astype(_F32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(x * 255).astype(jnp.uint8)


def _pair(x: jax.Array) -> jax.Array:
    """(B, ...) -> (2B, ...) as per-sample (uncond, cond) pairs of the same array."""
    return jnp.repeat(x, 2, axis=0)


def _pair_features(uncond, cond):
    """uncond feats (1, N, C) each, cond (B, N, C) -> (2B, N, C) pairs [u, c_0, u, c_1, ...]."""
    out = []
    for u, c in zip(uncond, cond, strict=True):
        u = jnp.broadcast_to(u, c.shape)
        out.append(jnp.stack([u, c], axis=1).reshape((2 * c.shape[0],) + c.shape[1:]))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of the compiled program (part of the jit cache key)."""

    scheduler: str
    rescale: bool
    ref_acceleration: bool
    return_latents: bool
    compute_dtype: Any
    vae_dtype: Any
    attention_kernel: str
    fuse_uncond_ref: bool  # run the zero-latent reference pass in the same batch (1 device)
    report_steps: bool


def _cast_state(state, compute_dtype, vae_dtype):
    """Cast floating params once per call: UNets to compute_dtype, VAE to vae_dtype."""

    def cast(path, x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        top = path[0].key if hasattr(path[0], "key") else None
        return x.astype(vae_dtype if top == "vae" else compute_dtype)

    return jax.tree_util.tree_map_with_path(cast, state)


def encode_conditions(
    model, person, garment, mask, densepose, noise_masked, noise_ref, vae_dtype=_F32
):
    """-> (cond (B,h,w,1+C+3) = [mask | masked-image latent | densepose] at latent size,
    ref_latent (B,h',w',C)), both float32 and scaled."""
    sf = model.scaling_factor
    masked = person * (mask < 0.5).astype(person.dtype)
    if masked.shape == garment.shape:  # one VAE pass over per-sample (masked, garment) pairs
        b = masked.shape[0]
        both = jnp.stack([masked, garment], axis=1).reshape((2 * b,) + masked.shape[1:])
        post = model.encode(both.astype(vae_dtype))
        nz = jnp.stack([noise_masked, noise_ref], axis=1).reshape((2 * b,) + noise_ref.shape[1:])
        lat = model.vae.sample_posterior(post, nz).astype(_F32) * sf
        lat = lat.reshape((b, 2) + lat.shape[1:])
        masked_lat, ref_lat = lat[:, 0], lat[:, 1]
    else:
        post_m = model.encode(masked.astype(vae_dtype))
        post_r = model.encode(garment.astype(vae_dtype))
        masked_lat = model.vae.sample_posterior(post_m, noise_masked).astype(_F32) * sf
        ref_lat = model.vae.sample_posterior(post_r, noise_ref).astype(_F32) * sf
    size = masked_lat.shape[1:3]
    mask_lat = resize_nearest_torch(mask.astype(_F32), size)
    dp_lat = resize_nearest_torch(densepose.astype(_F32), size)
    return jnp.concatenate([mask_lat, masked_lat, dp_lat], axis=-1), ref_lat


def reference_features_cfg(
    model, ref_lat, t, compute_dtype=_F32, attention_kernel="xla", fuse=True
):
    """Reference features for both branches: (uncond (1,N,C)..., cond (B,N,C)...); the
    unconditional branch is the all-zero reference latent (depends only on t)."""
    zero = jnp.zeros((1,) + ref_lat.shape[1:], compute_dtype)
    ref = ref_lat.astype(compute_dtype)
    if fuse:
        feats = model.reference_features(
            jnp.concatenate([zero, ref]), t, attention_kernel=attention_kernel
        )
        return tuple(f[:1] for f in feats), tuple(f[1:] for f in feats)
    fu = model.reference_features(zero, t, attention_kernel=attention_kernel)
    fc = model.reference_features(ref, t, attention_kernel=attention_kernel)
    return fu, fc


def guided_eps(
    model,
    latent,
    cond2,
    t,
    features2,
    guidance,
    phi,
    rescale: bool,
    compute_dtype=_F32,
    attention_kernel="xla",
):
    """One CFG noise prediction: latent (B,h,w,C) float32, cond2 (2B,h,w,8) paired conditions,
    features2 paired reference features -> (guided eps, cond eps), float32 (B,h,w,C)."""
    b = latent.shape[0]
    gen = jnp.concatenate([_pair(latent), cond2], axis=-1).astype(compute_dtype)
    eps = model.predict_noise(gen, t, features2, attention_kernel=attention_kernel).astype(_F32)
    eps = eps.reshape((b, 2) + eps.shape[1:])
    eu, ec = eps[:, 0], eps[:, 1]
    g = eu + guidance * (ec - eu)
    if rescale:
        g = rescale_noise_cfg(g, ec, phi)
    return g, ec


_PROGRESS: list[Callable[[int], None]] = []


def _report(i) -> None:
    for hook in _PROGRESS:
        hook(int(i))


def _sample_impl(
    graphdef,
    state,
    schedule,
    person,
    garment,
    mask,
    densepose,
    noise,
    timesteps,
    prev_timesteps,
    sigmas,
    guidance,
    phi,
    opts: _Options,
):
    cd, vd = opts.compute_dtype, opts.vae_dtype
    model = nnx.merge(graphdef, _cast_state(state, cd, vd))
    kern = opts.attention_kernel
    cond, ref_lat = encode_conditions(
        model,
        person,
        garment,
        mask,
        densepose,
        noise["vae_sample_noise_masked"],
        noise["vae_sample_noise_ref"],
        vd,
    )
    cond2 = _pair(cond)
    n = timesteps.shape[0]

    def feats_at(t):
        fu, fc = reference_features_cfg(model, ref_lat, t, cd, kern, opts.fuse_uncond_ref)
        return _pair_features(fu, fc)

    fixed = feats_at(timesteps[n // 2]) if opts.ref_acceleration else None
    x0 = noise["init_noise"].astype(_F32)

    def body(carry, xs):
        x, dstate = carry
        i, t, pt, nz = xs
        feats = fixed if opts.ref_acceleration else feats_at(t)
        eps, _ = guided_eps(model, x, cond2, t, feats, guidance, phi, opts.rescale, cd, kern)
        if opts.scheduler == "ddpm":
            x, _ = S.ddpm_step(schedule, eps, x, t, pt, nz.astype(_F32))
        elif opts.scheduler == "ddim":
            x, _ = S.ddim_step(schedule, eps, x, t, pt)
        else:
            x, dstate = S.dpm_solver_step(schedule, sigmas, dstate, eps, x)
            x = x.astype(_F32)
        if opts.report_steps:
            jax.debug.callback(_report, i)
        return (x, dstate), (x if opts.return_latents else None)

    xs = (jnp.arange(n, dtype=jnp.int32), timesteps, prev_timesteps, noise["step_noise"])
    (x, _), lat = jax.lax.scan(body, (x0, S.dpm_solver_init(x0)), xs)
    decoded = model.decode(x.astype(vd)).astype(_F32)
    return to_uint8(decoded), lat, decoded


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


# --------------------------------------------------------------------------------------------
# Repaint (host side, the official `do_repaint`)
# --------------------------------------------------------------------------------------------


def repaint_radius(height: int) -> int:
    """Official blur radius: height // 100, made odd (1024 -> 11, 512 -> 5, 32 -> 1)."""
    k = height // 100
    return k + 1 if k % 2 == 0 else k


def apply_repaint(
    person_uint8: np.ndarray, mask: np.ndarray, generated_uint8: np.ndarray
) -> np.ndarray:
    """Official repaint: blur the mask with PIL `GaussianBlur(repaint_radius(H))` and paste the
    generated pixels into the person: `person * (1 - m) + generated * m`, truncated to uint8.
    person/generated (B,H,W,3) uint8, mask (B,H,W[,1]) in {0,1} -> (B,H,W,3) uint8."""
    from PIL import Image, ImageFilter

    mask = np.asarray(mask, np.float32)
    if mask.ndim == 4:
        mask = mask[..., 0]
    out = []
    for p, m, g in zip(person_uint8, mask, generated_uint8, strict=True):
        mi = Image.fromarray(np.round(m * 255).astype(np.uint8), mode="L").convert("RGB")
        mi = mi.filter(ImageFilter.GaussianBlur(repaint_radius(g.shape[0])))
        mn = np.asarray(mi) / 255
        out.append((p * (1 - mn) + g * mn).astype(np.uint8))
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _as_batch(x, name: str, channels: int | None) -> np.ndarray:
    a = np.asarray(x, np.float32)
    if name == "mask" and a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or (channels is not None and a.shape[-1] != channels):
        want = f"(B, H, W, {channels})" if channels else "(B, H, W, C)"
        raise ValueError(f"{name} must be NHWC {want}, got shape {a.shape}")
    return a


def _validate(person, garment, mask, densepose, factor: int):
    person = _as_batch(person, "person", 3)
    garment = _as_batch(garment, "garment", 3)
    mask = _as_batch(mask, "mask", 1)
    densepose = _as_batch(densepose, "densepose", 3)
    b, h, w = person.shape[:3]
    for name, a in (("garment", garment), ("mask", mask), ("densepose", densepose)):
        if a.shape[0] != b:
            raise ValueError(f"{name} has batch {a.shape[0]}, person has {b}")
    for name, a in (("mask", mask), ("densepose", densepose)):
        if a.shape[1:3] != (h, w):
            raise ValueError(
                f"{name} is {a.shape[1]}x{a.shape[2]}, person is {h}x{w}: give "
                "them at the same size"
            )
    for name, a in (("person", person), ("garment", garment)):
        if a.shape[1] % factor or a.shape[2] % factor:
            raise ValueError(
                f"{name} size {a.shape[1]}x{a.shape[2]} must be a multiple of "
                f"{factor} (the VAE downsampling factor)"
            )
    for name, a in (("person", person), ("garment", garment), ("densepose", densepose)):
        lo, hi = float(a.min()), float(a.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"{name} values span [{lo:g}, {hi:g}]; images must be in [-1, 1] "
                "(uint8 x: x / 127.5 - 1)"
            )
    if not np.isin(mask, (0.0, 1.0)).all():
        bad = np.unique(mask[~np.isin(mask, (0.0, 1.0))])[:5]
        raise ValueError(
            f"mask must hold only 0 and 1 (1 = region to generate); found values "
            f"such as {bad.tolist()}. Binarise it first, e.g. (mask >= 0.5)"
        )
    return person, garment, mask, densepose


def _dtype(name) -> Any:
    if not isinstance(name, str):
        name = jnp.dtype(name).name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def _batch_mesh(batch: int, shard: bool) -> Mesh | None:
    devices = jax.local_devices()
    if not shard or len(devices) < 2 or batch % len(devices):
        return None
    return Mesh(np.asarray(devices), ("data",))


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

    person, garment: (B,H,W,3) in [-1, 1] (garment = reference image); mask: (B,H,W[,1]) in
    {0, 1}, 1 = region to generate (all ones for pose transfer); densepose: (B,H,W,3) in [-1, 1].
    guidance: CFG scale g; guidance_rescale: phi of `rescale_noise_cfg` (None = g, as the
    official pipeline; 0 turns it off). noise: recorded draws to replay (`NOISE_KEYS`, NHWC;
    see `noise_from_torch`), else everything is drawn from `seed`. dtype: UNet compute dtype
    ("float32", "bfloat16", "float16"); vae_dtype: the VAE's. scheduler: "ddpm" (official),
    "ddim" or "dpmpp_2m". zero_snr: override the zero-terminal-SNR choice. progress: called with
    the step index after each step (from inside the compiled loop).

    Returns GenerateOutput(images uint8 (B,H,W,3), latents (steps,B,h,w,C) or None, decoded
    (B,H,W,3) float32, timesteps).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {SCHEDULERS}")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    factor = model.vae.downsample_factor
    person, garment, mask, densepose = _validate(person, garment, mask, densepose, factor)
    b, h, w = person.shape[:3]
    c = model.vae.config.latent_channels
    lh, lw = h // factor, w // factor
    rh, rw = garment.shape[1] // factor, garment.shape[2] // factor
    schedule = leffa_schedule(model, zero_snr)
    ts, prev = inference_timesteps(schedule, steps, scheduler)
    if noise is None:
        nz = draw_noise(seed, b, (lh, lw), (rh, rw), c, steps)
    else:
        nz = _check_noise(
            noise,
            {
                "vae_sample_noise_masked": (b, lh, lw, c),
                "vae_sample_noise_ref": (b, rh, rw, c),
                "init_noise": (b, lh, lw, c),
                "step_noise": (steps, b, lh, lw, c),
            },
        )
    phi = float(guidance) if guidance_rescale is None else float(guidance_rescale)
    mesh = _batch_mesh(b, shard)
    opts = _Options(
        scheduler=scheduler,
        rescale=phi != 0.0,
        ref_acceleration=bool(ref_acceleration),
        return_latents=bool(return_latents),
        compute_dtype=_dtype(dtype),
        vae_dtype=_dtype(vae_dtype),
        attention_kernel=attention_kernel,
        fuse_uncond_ref=mesh is None,
        report_steps=progress is not None,
    )
    graphdef, state = nnx.split(model)
    batch_args = [person, garment, mask, densepose, nz]
    if mesh is not None:
        data = NamedSharding(mesh, P("data"))
        batch_args = [jax.device_put(a, data) for a in batch_args[:4]] + [
            {
                k: jax.device_put(
                    v, NamedSharding(mesh, P(None, "data")) if k == "step_noise" else data
                )
                for k, v in nz.items()
            }
        ]
        state = jax.device_put(state, NamedSharding(mesh, P()))
    if progress is not None:
        _PROGRESS.append(progress)
    try:
        images, lat, decoded = _sample(
            graphdef,
            state,
            schedule,
            *batch_args,
            jnp.asarray(ts, jnp.int32),
            jnp.asarray(prev, jnp.int32),
            S.dpm_sigmas(schedule, ts) if scheduler == "dpmpp_2m" else None,
            jnp.float32(guidance),
            jnp.float32(phi),
            opts=opts,
        )
        images, decoded = np.asarray(images), np.asarray(decoded)
        lat = None if lat is None else np.asarray(lat)
    finally:
        if progress is not None:
            _PROGRESS.remove(progress)
    if repaint:
        person_u8 = np.asarray(to_uint8(jnp.asarray(person)))
        images = apply_repaint(person_u8, mask, images)
    return GenerateOutput(images, lat, decoded, ts)
