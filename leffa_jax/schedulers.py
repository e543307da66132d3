"""Noise schedules as pure functions of arrays (diffusers semantics, jit-able).

A `Schedule` holds the training noise schedule (betas, alphas_cumprod: float32 arrays, a pytree)
plus static configuration. This module builds it (`make_schedule`, `schedule_for_model`), spaces
inference timesteps on the host (`set_timesteps`, `ddpm_timesteps`, `ddim_timesteps`,
`dpm_timesteps`, `dpm_sigmas`) and holds the forward process used in training (`add_noise`,
`get_velocity`, `predict_x0`). The denoising update rules (DDPM, DDIM, DPM-Solver++, UniPC,
PNDM, DEIS) live in `leffa_jax.sampling.steppers`:

    schedule = schedule_for_model(model)           # betas + zero-terminal-SNR, decided once
    stepper = make_stepper("ddpm", schedule, 30)   # leading + steps_offset: 958, 925, ..., 1

Conventions follow diffusers 0.42 exactly: betas built in float64 and stored in float32 (diffusers
builds them in float32 torch; differences are ~1 ulp), step arithmetic in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "linear_betas",
    "scaled_linear_betas",
    "rescale_betas_zero_snr",
    "make_schedule",
    "schedule_for_model",
    "set_timesteps",
    "ddpm_timesteps",
    "ddim_timesteps",
    "dpm_timesteps",
    "solver_alphas_cumprod",
    "dpm_sigmas",
    "broadcast_timestep",
    "gather_at_timestep",
    "add_noise",
    "get_velocity",
    "predict_x0",
    "uses_zero_terminal_snr",
]

_F32 = jnp.float32
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")


# --------------------------------------------------------------------------------------------
# Betas
# --------------------------------------------------------------------------------------------


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """(T,) float32 `linspace(beta_start, beta_end, T)` (diffusers "linear")."""
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64).astype(
        np.float32
    )


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """(T,) float32 `linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2` (diffusers
    "scaled_linear", the latent-diffusion schedule)."""
    b = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return b.astype(np.float32)


def rescale_betas_zero_snr(betas):
    """Rescale betas (T,) to zero terminal SNR (arXiv 2305.08891, Algorithm 1), as diffusers'
    `rescale_zero_terminal_snr`: shift sqrt(alphas_cumprod) so its last value is 0, scale so the
    first is unchanged; afterwards alphas_cumprod[-1] == 0 and betas[-1] == 1. Works on numpy
    (computed in float64, returned float32) and jax arrays (jit-able)."""
    xp = jnp if isinstance(betas, jax.Array) else np
    dtype = betas.dtype
    b = betas.astype(np.float64) if xp is np else betas
    abar_sqrt = xp.sqrt(xp.cumprod(1.0 - b, axis=0))
    a0, at = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - at) * (a0 / (a0 - at))
    abar = abar_sqrt**2
    alphas = xp.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(dtype)


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Training noise schedule (a pytree: arrays are leaves, the rest static).

    betas, alphas_cumprod: (T,) float32. `final_alpha_cumprod` is DDIM's alpha at prev_t < 0
    (1 if set_alpha_to_one else alphas_cumprod[0]); DDPM always uses 1.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @property
    def alphas(self) -> jax.Array:
        return 1.0 - self.betas

    @property
    def final_alpha_cumprod(self) -> jax.Array:
        return jnp.asarray(1.0, _F32) if self.set_alpha_to_one else self.alphas_cumprod[0]


jax.tree_util.register_dataclass(
    Schedule,
    data_fields=["betas", "alphas_cumprod"],
    meta_fields=[
        "num_train_timesteps",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
        "set_alpha_to_one",
        "rescale_betas_zero_snr",
        "clip_sample",
        "clip_sample_range",
    ],
)


def make_schedule(config: dict | str | os.PathLike | None = None, **overrides: Any) -> Schedule:
    """Build a `Schedule` from a diffusers scheduler config (dict or path to
    `scheduler_config.json`, or a folder holding one), keyword overrides taking precedence
    (e.g. `rescale_betas_zero_snr=True` for the SDXL pose-transfer model, whose json omits it).

    Reads: num_train_timesteps, beta_start, beta_end, beta_schedule ("linear" | "scaled_linear"),
    trained_betas, prediction_type, timestep_spacing, steps_offset, set_alpha_to_one,
    rescale_betas_zero_snr, clip_sample, clip_sample_range. Missing keys take the defaults of
    diffusers' DDPMScheduler/DDIMScheduler (linear betas 1e-4..0.02, clip_sample True,
    set_alpha_to_one True, "leading", offset 0); the Stable Diffusion configs set them.
    """
    cfg: dict[str, Any] = {}
    if config is not None:
        if isinstance(config, dict):
            cfg = dict(config)
        else:
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "scheduler_config.json")
            with open(path) as f:
                cfg = json.load(f)
    cfg.update(overrides)
    t = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("thresholding", False):
        raise NotImplementedError("make_schedule: dynamic thresholding is not supported")
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
        if betas.shape != (t,):
            raise ValueError(
                f"make_schedule: trained_betas must have shape ({t},), got {betas.shape}"
            )
    else:
        kind = cfg.get("beta_schedule", "linear")
        start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        if kind == "linear":
            betas = linear_betas(start, end, t)
        elif kind == "scaled_linear":
            betas = scaled_linear_betas(start, end, t)
        else:
            raise NotImplementedError(f"make_schedule: beta_schedule {kind!r} is not supported")
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    if zero_snr:
        betas = rescale_betas_zero_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float64)).astype(np.float32)
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in _PREDICTION_TYPES:
        raise ValueError(
            f"make_schedule: prediction_type must be one of {_PREDICTION_TYPES}, got {pred!r}"
        )
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in _SPACINGS:
        raise ValueError(
            f"make_schedule: timestep_spacing must be one of {_SPACINGS}, got {spacing!r}"
        )
    return Schedule(
        betas=jnp.asarray(betas),
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        num_train_timesteps=t,
        prediction_type=pred,
        timestep_spacing=spacing,
        steps_offset=int(cfg.get("steps_offset", 0)),
        set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
        rescale_betas_zero_snr=zero_snr,
        clip_sample=bool(cfg.get("clip_sample", True)),
        clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
    )


# --------------------------------------------------------------------------------------------
# Timesteps (host side, numpy int64)
# --------------------------------------------------------------------------------------------


def set_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """(N,) int64 descending inference timesteps, as DDPMScheduler/DDIMScheduler.set_timesteps.

    leading: arange(N) * (T // N) reversed, + steps_offset (T=1000, N=30, offset 1: 958 ... 1);
    trailing: round(arange(T, 0, -T/N)) - 1; linspace: round(linspace(0, T-1, N)) reversed.
    """
    t, n = int(num_train_timesteps), int(num_inference_steps)
    if not 1 <= n <= t:
        raise ValueError(f"set_timesteps: num_inference_steps must be in [1, {t}], got {n}")
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (t // n)).round()[::-1].copy().astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        ts = np.round(np.arange(t, 0, -t / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"set_timesteps: spacing must be one of {_SPACINGS}, got {spacing!r}")
    return ts


def ddpm_timesteps(schedule: Schedule, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, prev_timesteps), both (N,) int64, for the ddpm stepper: prev is the next
    entry of the schedule and -1 after the last (DDPMScheduler.previous_timestep); for
    "leading" spacing this is t - T // N."""
    ts = set_timesteps(
        schedule.num_train_timesteps,
        num_inference_steps,
        schedule.timestep_spacing,
        schedule.steps_offset,
    )
    return ts, np.concatenate([ts[1:], [-1]]).astype(np.int64)


def ddim_timesteps(schedule: Schedule, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, prev_timesteps) for the ddim stepper: DDIMScheduler uses prev = t - T // N for
    every spacing."""
    ts = set_timesteps(
        schedule.num_train_timesteps,
        num_inference_steps,
        schedule.timestep_spacing,
        schedule.steps_offset,
    )
    return ts, ts - schedule.num_train_timesteps // int(num_inference_steps)


def dpm_timesteps(
    schedule: Schedule,
    num_inference_steps: int,
    spacing: str | None = None,
    lambda_min_clipped: float = -math.inf,
) -> np.ndarray:
    """(N,) int64 timesteps of DPMSolverMultistepScheduler.set_timesteps (its own grids: N+1
    points with the last dropped for "linspace"/"leading"; `spacing` defaults to the
    schedule's; note diffusers' DPM default spacing is "linspace")."""
    spacing = schedule.timestep_spacing if spacing is None else spacing
    t, n = schedule.num_train_timesteps, int(num_inference_steps)
    clipped_idx = 0
    if lambda_min_clipped > -math.inf:
        ac = np.asarray(schedule.alphas_cumprod, np.float32)
        with np.errstate(divide="ignore"):
            lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))
        clipped_idx = int(np.searchsorted(lam[::-1], lambda_min_clipped))
    last = t - clipped_idx
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += schedule.steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -t / n).round().copy().astype(np.int64) - 1
    else:
        raise ValueError(f"dpm_timesteps: spacing must be one of {_SPACINGS}, got {spacing!r}")
    return ts


def solver_alphas_cumprod(schedule: Schedule) -> np.ndarray:
    """(T,) float32 host copy of alphas_cumprod as the sigma-based solvers see it: with
    zero-terminal-SNR the last entry (exactly 0) is replaced by 2**-24, as diffusers'
    DPMSolverMultistep/UniPCMultistep schedulers do, so sigma = sqrt((1 - a) / a) stays finite."""
    ac = np.array(schedule.alphas_cumprod, np.float32)
    if schedule.rescale_betas_zero_snr:
        ac[-1] = np.float32(2.0**-24)
    return ac


def dpm_sigmas(schedule: Schedule, timesteps, final_sigmas_type: str = "zero") -> jax.Array:
    """(N+1,) float32 sigmas sqrt((1 - a) / a) at the timesteps, then the final sigma (0 for
    "zero", sigma at t=0 for "sigma_min"), from `solver_alphas_cumprod` (the table of
    DPMSolverMultistep, UniPCMultistep and DEISMultistep; DEIS always ends at "sigma_min")."""
    ac = solver_alphas_cumprod(schedule)
    sig = (((np.float32(1) - ac) / ac) ** np.float32(0.5)).astype(np.float32)
    ts = np.asarray(timesteps)
    s = np.interp(ts, np.arange(len(sig)), sig)
    if final_sigmas_type == "zero":
        last = 0.0
    elif final_sigmas_type == "sigma_min":
        last = float(((1 - ac[0]) / ac[0]) ** 0.5)
    else:
        raise ValueError(
            "dpm_sigmas: final_sigmas_type must be 'zero' or 'sigma_min', got "
            f"{final_sigmas_type!r}"
        )
    return jnp.asarray(np.concatenate([s, [last]]).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Per-timestep lookups
# --------------------------------------------------------------------------------------------


def broadcast_timestep(x, ndim: int) -> jax.Array:
    """Scalar stays scalar; (B,) -> (B, 1, ..., 1) with `ndim` dims."""
    x = jnp.asarray(x)
    if x.ndim == 0:
        return x
    if x.ndim != 1:
        raise ValueError(f"timestep must be a scalar or (B,), got shape {x.shape}")
    return x.reshape(x.shape + (1,) * (ndim - 1))


def gather_at_timestep(table: jax.Array, t, ndim: int) -> jax.Array:
    """table[t] for t a scalar or (B,) int (clipped to the table), broadcast to `ndim` dims."""
    t = jnp.asarray(t, jnp.int32)
    return broadcast_timestep(table[jnp.clip(t, 0, table.shape[0] - 1)], ndim)


def predict_x0(schedule: Schedule, model_output, sample, t) -> jax.Array:
    """x0 from the model output at timestep t (scalar or (B,)) per the schedule's
    prediction_type, before any clipping."""
    ap = gather_at_timestep(schedule.alphas_cumprod, t, sample.ndim)
    bp = 1 - ap
    if schedule.prediction_type == "epsilon":
        return (sample - bp**0.5 * model_output) / ap**0.5
    if schedule.prediction_type == "v_prediction":
        return ap**0.5 * sample - bp**0.5 * model_output
    return model_output


# --------------------------------------------------------------------------------------------
# Training forward process
# --------------------------------------------------------------------------------------------


def add_noise(schedule: Schedule, x0, noise, t) -> jax.Array:
    """Forward process q(x_t | x_0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise; t scalar or (B,)."""
    ac = schedule.alphas_cumprod.astype(x0.dtype)
    a = gather_at_timestep(ac, t, x0.ndim)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def get_velocity(schedule: Schedule, sample, noise, t) -> jax.Array:
    """v-prediction target: sqrt(a_t) * noise - sqrt(1 - a_t) * sample; t scalar or (B,)."""
    ac = schedule.alphas_cumprod.astype(sample.dtype)
    a = gather_at_timestep(ac, t, sample.ndim)
    return a**0.5 * noise - (1 - a) ** 0.5 * sample


def uses_zero_terminal_snr(config_dir: str | os.PathLike) -> bool:
    """Whether the official code would build a zero-terminal-SNR DDPM for this base config.

    Official rule (`leffa/model.py`): `rescale_betas_zero_snr = base is not SD1.5`, decided by
    "stable-diffusion-inpainting" in the base folder name. Here: an explicit
    `rescale_betas_zero_snr` in the scheduler json wins; then the folder name
    ("stable-diffusion-inpainting" -> False, "stable-diffusion-xl" -> True); otherwise (e.g. a
    leffa_jax checkpoint folder, whose config folder is named "config") the architecture decides:
    an SDXL UNet (`addition_embed_type == "text_time"`) -> True, else False.
    """
    config_dir = os.fspath(config_dir)
    sched = os.path.join(config_dir, "scheduler", "scheduler_config.json")
    if os.path.exists(sched):
        with open(sched) as f:
            cfg = json.load(f)
        if "rescale_betas_zero_snr" in cfg:
            return bool(cfg["rescale_betas_zero_snr"])
    name = os.path.basename(os.path.normpath(config_dir))
    if "stable-diffusion-inpainting" in name:
        return False
    if "stable-diffusion-xl" in name:
        return True
    unet = os.path.join(config_dir, "unet", "config.json")
    if os.path.exists(unet):
        with open(unet) as f:
            return json.load(f).get("addition_embed_type") == "text_time"
    return False


def schedule_for_model(model, **overrides: Any) -> Schedule:
    """THE noise schedule of a model (train, sample, evaluate and viz all call this): the betas
    and flags of `model.scheduler_config()`, with zero-terminal-SNR per
    `uses_zero_terminal_snr(model.config_dir)` (an official `.pth` with an SDXL base folder gets
    it; SD1.5 does not). Keyword `overrides` (e.g. a config's `scheduler_overrides`, or an
    explicit `rescale_betas_zero_snr`) win. `model` needs only `.config_dir` and
    `.scheduler_config()`."""
    overrides.setdefault("rescale_betas_zero_snr", uses_zero_terminal_snr(model.config_dir))
    return make_schedule(model.scheduler_config(), **overrides)

