"""DDPM, DDIM and DPM-Solver++ 2M steps (diffusers 0.42 semantics, float32, jit-able).

The step functions take the schedule, the model output and the sample at timestep t (scalar or
(B,), traced ok) and return the previous sample; the `build_*`/`step_*` pairs adapt them to the
`Stepper` interface of `leffa_jax.sampling.steppers`, which is how samplers should use them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from leffa_jax.schedulers import (
    Schedule,
    broadcast_timestep,
    ddim_timesteps,
    ddpm_timesteps,
    dpm_sigmas,
    dpm_timesteps,
    gather_at_timestep,
    predict_x0,
)

__all__ = ["DPMState", "ddpm_step", "ddim_step", "dpm_solver_init", "dpm_solver_step"]

_F32 = jnp.float32


def clip_x0(schedule: Schedule, x0):
    """x0 clipped to +-clip_sample_range when the schedule has clip_sample (DDPM/DDIM only)."""
    if schedule.clip_sample:
        return jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


def alpha_sigma(sigma):
    """(alpha_t, sigma_t) of a sigma = sqrt((1 - a) / a): 1 / sqrt(sigma**2 + 1), sigma * alpha."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def log_snr(alpha, sigma):
    """lambda = log(alpha) - log(sigma) (inf at sigma = 0)."""
    return jnp.log(alpha) - jnp.log(sigma)


# --------------------------------------------------------------------------------------------
# DDPM (ancestral; what official Leffa samples with) and DDIM
# --------------------------------------------------------------------------------------------


def _alphas_at(schedule: Schedule, t, prev_t, ndim: int, final):
    """(alpha_cumprod[t], alpha_cumprod[prev_t]) broadcast to `ndim`; prev_t < 0 -> `final`."""
    prev_t = jnp.asarray(prev_t, jnp.int32)
    ap_prev = jnp.where(broadcast_timestep(prev_t, ndim) >= 0,
                        gather_at_timestep(schedule.alphas_cumprod, prev_t, ndim), final)
    return gather_at_timestep(schedule.alphas_cumprod, t, ndim), ap_prev


def ddpm_step(
    schedule: Schedule, model_output, sample, t, prev_t, noise
) -> tuple[jax.Array, jax.Array]:
    """One ancestral DDPM step (DDPMScheduler.step, variance "fixed_small").

    model_output, sample, noise: same shape (B, ...); t, prev_t: int scalars or (B,) (traced
    ok), prev_t < 0 means alpha_prev = 1. Variance (1 - a_prev) / (1 - a_t) * beta_t clamped at
    1e-20; noise is added wherever t > 0. Returns (prev_sample, pred_original_sample).
    """
    nd = sample.ndim
    ap, ap_prev = _alphas_at(schedule, t, prev_t, nd, jnp.asarray(1.0, _F32))
    bp = 1 - ap
    bp_prev = 1 - ap_prev
    cur_alpha = ap / ap_prev
    cur_beta = 1 - cur_alpha
    x0 = clip_x0(schedule, predict_x0(schedule, model_output, sample, t))
    c0 = (ap_prev**0.5 * cur_beta) / bp
    cs = cur_alpha**0.5 * bp_prev / bp
    prev = c0 * x0 + cs * sample
    var = jnp.maximum((1 - ap_prev) / (1 - ap) * cur_beta, 1e-20)
    tpos = broadcast_timestep(jnp.asarray(t) > 0, nd)
    prev = prev + jnp.where(tpos, var**0.5 * noise, jnp.zeros((), prev.dtype))
    return prev.astype(sample.dtype), x0


def ddim_step(
    schedule: Schedule,
    model_output,
    sample,
    t,
    prev_t,
    eta: float = 0.0,
    noise=None,
    use_clipped_model_output: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step (DDIMScheduler.step). prev_t from `ddim_timesteps` (t - T // N); prev_t < 0
    uses `final_alpha_cumprod`. With eta > 0, `noise` (shape of sample) is required and
    std = eta * sqrt(variance) is applied. Returns (prev_sample, pred_original_sample)."""
    nd = sample.ndim
    ap, ap_prev = _alphas_at(schedule, t, prev_t, nd, schedule.final_alpha_cumprod)
    bp = 1 - ap
    if schedule.prediction_type == "epsilon":
        x0 = (sample - bp**0.5 * model_output) / ap**0.5
        eps = model_output
    elif schedule.prediction_type == "v_prediction":
        x0 = ap**0.5 * sample - bp**0.5 * model_output
        eps = ap**0.5 * model_output + bp**0.5 * sample
    else:
        x0 = model_output
        eps = (sample - ap**0.5 * x0) / bp**0.5
    x0 = clip_x0(schedule, x0)
    bp_prev = 1 - ap_prev
    variance = (bp_prev / bp) * (1 - ap / ap_prev)
    std = eta * variance**0.5
    if use_clipped_model_output:
        eps = (sample - ap**0.5 * x0) / bp**0.5
    direction = (1 - ap_prev - std**2) ** 0.5 * eps
    prev = ap_prev**0.5 * x0 + direction
    if not isinstance(eta, (int, float)) or eta > 0:
        if noise is None:
            raise ValueError("ddim_step: noise (shape of sample) is required when eta > 0")
        prev = prev + std * noise
    return prev.astype(sample.dtype), x0


# --------------------------------------------------------------------------------------------
# DPM-Solver++ 2M
# --------------------------------------------------------------------------------------------


class DPMState(NamedTuple):
    """DPM-Solver++ multistep state: previous data prediction (shape of sample, float32) and
    the current step index (int32 scalar)."""

    prev_x0: jax.Array
    step: jax.Array


def dpm_solver_init(sample) -> DPMState:
    """Initial `DPMState` for a sample of this shape."""
    return DPMState(jnp.zeros(jnp.shape(sample), _F32), jnp.zeros((), jnp.int32))


def _dpm_updates(sample, x0, prev_x0, sigmas3, noise, sde: bool, solver_type: str):
    """(first-order, second-order) DPM-Solver++ updates from sigmas (t, s0, s1)."""
    alpha_t, sigma_t = alpha_sigma(sigmas3[0])
    alpha_s0, sigma_s0 = alpha_sigma(sigmas3[1])
    alpha_s1, sigma_s1 = alpha_sigma(sigmas3[2])
    lam_t, lam_s0 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0)
    h = lam_t - lam_s0
    r0 = (lam_s0 - log_snr(alpha_s1, sigma_s1)) / h
    d0, d1 = x0, (1.0 / r0) * (x0 - prev_x0)
    if sde:
        decay = (sigma_t / sigma_s0 * jnp.exp(-h)) * sample
        gain = alpha_t * (1 - jnp.exp(-2.0 * h))
        fresh = sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise
        first = decay + gain * x0 + fresh
        if solver_type == "midpoint":
            corr = 0.5 * gain * d1
        else:
            corr = (alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
        return first, decay + gain * d0 + corr + fresh
    first = (sigma_t / sigma_s0) * sample - (alpha_t * (jnp.exp(-h) - 1.0)) * x0
    if solver_type == "midpoint":
        second = (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
            - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
        )
    else:
        second = (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
            + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
        )
    return first, second


def dpm_solver_step(
    schedule: Schedule,
    sigmas: jax.Array,
    state: DPMState,
    model_output,
    sample,
    noise=None,
    *,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    final_sigmas_type: str = "zero",
) -> tuple[jax.Array, DPMState]:
    """One DPM-Solver++ 2M step (DPMSolverMultistepScheduler.step, solver_order 2).

    sigmas (N+1,) from `dpm_sigmas`; state.step is the index i of the current timestep (the
    caller feeds the model timesteps[i]). First order at i == 0 and at the last step when
    final_sigmas_type == "zero" / euler_at_final / (lower_order_final and N < 15); otherwise the
    second-order multistep update with the previous data prediction. algorithm_type
    "dpmsolver++" (deterministic) or "sde-dpmsolver++" (needs `noise`). Returns
    (prev_sample, new_state); prev_sample has model_output's dtype.
    """
    if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError(f"dpm_solver_step: algorithm_type {algorithm_type!r} is not supported")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(
            f"dpm_solver_step: solver_type must be 'midpoint' or 'heun', got {solver_type!r}"
        )
    sde = algorithm_type == "sde-dpmsolver++"
    if sde and noise is None:
        raise ValueError("dpm_solver_step: noise is required for sde-dpmsolver++")
    n = sigmas.shape[0] - 1
    i = jnp.asarray(state.step, jnp.int32)
    sample = sample.astype(_F32)
    alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
    if schedule.prediction_type == "epsilon":
        x0 = (sample - sigma_s0 * model_output) / alpha_s0
    elif schedule.prediction_type == "v_prediction":
        x0 = alpha_s0 * sample - sigma_s0 * model_output
    else:
        x0 = model_output
    x0 = x0.astype(_F32)
    sigmas3 = (sigmas[i + 1], sigmas[i], sigmas[jnp.maximum(i - 1, 0)])
    noise = None if noise is None else noise.astype(_F32)
    first, second = _dpm_updates(sample, x0, state.prev_x0, sigmas3, noise, sde, solver_type)
    final_first = euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero"
    use_first = (i == 0) | ((i == n - 1) & final_first)
    prev = jnp.where(use_first, first, second).astype(model_output.dtype)
    return prev, DPMState(x0, i + 1)


# --------------------------------------------------------------------------------------------
# Stepper adapters: build(schedule, n, **options) -> (timesteps, tables, needs_noise),
# init(stepper, x) -> state, step(stepper, state, i, eps, x, noise) -> (x_next, state)
# --------------------------------------------------------------------------------------------


def init_stateless(stepper, x) -> tuple:
    """Steppers without history carry an empty state."""
    return ()


def build_ddpm(schedule: Schedule, num_inference_steps: int):
    ts, prev = ddpm_timesteps(schedule, num_inference_steps)
    return ts, {"prev_timesteps": jnp.asarray(prev, jnp.int32)}, True


def step_ddpm(stepper, state, i, eps, x, noise):
    t, prev_t = stepper.timesteps[i], stepper.tables["prev_timesteps"][i]
    x_next, _ = ddpm_step(stepper.schedule, eps, x, t, prev_t, noise.astype(x.dtype))
    return x_next, state


def build_ddim(schedule: Schedule, num_inference_steps: int, eta: float):
    ts, prev = ddim_timesteps(schedule, num_inference_steps)
    return ts, {"prev_timesteps": jnp.asarray(prev, jnp.int32)}, float(eta) > 0


def step_ddim(stepper, state, i, eps, x, noise):
    t, prev_t = stepper.timesteps[i], stepper.tables["prev_timesteps"][i]
    eta = stepper.option("eta")
    x_next, _ = ddim_step(stepper.schedule, eps, x, t, prev_t, eta=eta,
                          noise=noise if eta > 0 else None)
    return x_next, state


def build_dpmpp_2m(schedule: Schedule, num_inference_steps: int, **options):
    if options["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError("dpmpp_2m: final_sigmas_type must be 'zero' or 'sigma_min', got "
                         f"{options['final_sigmas_type']!r}")
    if options["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError("dpmpp_2m: algorithm_type must be 'dpmsolver++' or 'sde-dpmsolver++'")
    if options["solver_type"] not in ("midpoint", "heun"):
        raise ValueError("dpmpp_2m: solver_type must be 'midpoint' or 'heun'")
    ts = dpm_timesteps(schedule, num_inference_steps)
    sigmas = dpm_sigmas(schedule, ts, options["final_sigmas_type"])
    return ts, {"sigmas": sigmas}, options["algorithm_type"] == "sde-dpmsolver++"


def init_dpmpp_2m(stepper, x) -> DPMState:
    return dpm_solver_init(x)


def step_dpmpp_2m(stepper, state, i, eps, x, noise):
    state = DPMState(state.prev_x0, jnp.asarray(i, jnp.int32))
    noise = noise if stepper.needs_noise else None
    x_next, state = dpm_solver_step(stepper.schedule, stepper.tables["sigmas"], state,
                                    eps.astype(_F32), x, noise, **dict(stepper.options))
    return x_next.astype(x.dtype), state

