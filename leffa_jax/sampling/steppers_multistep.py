"""UniPC, DEIS and PNDM steps (diffusers 0.42 semantics, float32, jit-able).

Adapters for the `Stepper` interface of `leffa_jax.sampling.steppers`: `build_*(schedule, n,
**options) -> (timesteps, tables, needs_noise)`, `init_*(stepper, x) -> state` and
`step_*(stepper, state, i, eps, x, noise) -> (x_next, state)`. The multistep history lives in
a fixed-structure state (NamedTuple of arrays shaped like x) so the loop can be one `lax.scan`;
which formula applies at step i is selected with `jnp.where`/`lax.switch` on the traced i.

With zero-terminal-SNR every table uses `solver_alphas_cumprod` (alphas_cumprod[-1] = 2**-24),
as diffusers' UniPC does; diffusers' DEIS and PNDM have no zero-SNR option, so that is the
natural extension (and what the tests emulate on the diffusers side). These steppers ignore the
schedule's clip_sample, as the diffusers classes do.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from leffa_jax.sampling.steppers_classic import alpha_sigma, log_snr
from leffa_jax.schedulers import (
    Schedule,
    dpm_sigmas,
    dpm_timesteps,
    set_timesteps,
    solver_alphas_cumprod,
)

_F32 = jnp.float32


def data_prediction(prediction_type: str, model_output, sample, sigma):
    """x0 from the model output at noise level sigma (convert_model_output of the solvers)."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    return model_output


def _check_order(name: str, solver_order) -> None:
    if solver_order not in (1, 2):
        raise ValueError(f"{name}: solver_order must be 1 or 2, got {solver_order!r}")


# --------------------------------------------------------------------------------------------
# UniPC (UniPCMultistepScheduler, predict_x0, bh1/bh2, orders 1-2)
# --------------------------------------------------------------------------------------------


class UniPCState(NamedTuple):
    """UniPC history: data predictions at steps i-1 and i-2, and the sample the previous
    predictor started from (diffusers' last_sample), all float32 shaped like x."""

    prev_x0: jax.Array
    prev_prev_x0: jax.Array
    last_sample: jax.Array


def build_unipc(schedule: Schedule, num_inference_steps: int, *, solver_order, solver_type,
                final_sigmas_type, lower_order_final, disable_corrector):
    _check_order("unipc", solver_order)
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"unipc: solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError("unipc: final_sigmas_type must be 'zero' or 'sigma_min', got "
                         f"{final_sigmas_type!r}")
    if final_sigmas_type == "zero" and solver_order == 2 and not lower_order_final:
        # a second-order step onto sigma = 0 divides by lambda = inf (NaN in diffusers too)
        raise ValueError("unipc: final_sigmas_type='zero' needs lower_order_final=True")
    ts = dpm_timesteps(schedule, num_inference_steps)
    corrector = [i > 0 and (i - 1) not in tuple(disable_corrector) for i in range(len(ts))]
    tables = {"sigmas": dpm_sigmas(schedule, ts, final_sigmas_type),
              "use_corrector": jnp.asarray(corrector, bool)}
    return ts, tables, False


def init_unipc(stepper, x) -> UniPCState:
    zeros = jnp.zeros(jnp.shape(x), _F32)
    return UniPCState(zeros, zeros, zeros)


def _unipc_terms(sigma_t, sigma_s0, sigma_s1, bh1: bool):
    """Scalars of one UniPC update from noise level s0 to t, with s1 the step before s0."""
    alpha_t, sig_t = alpha_sigma(sigma_t)
    alpha_s0, sig_s0 = alpha_sigma(sigma_s0)
    alpha_s1, sig_s1 = alpha_sigma(sigma_s1)
    lam_s0 = log_snr(alpha_s0, sig_s0)
    h = log_snr(alpha_t, sig_t) - lam_s0
    rk = (log_snr(alpha_s1, sig_s1) - lam_s0) / h
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    b_h = hh if bh1 else jnp.expm1(hh)
    return alpha_t, sig_t, sig_s0, rk, hh, h_phi_1, b_h


def _unipc_predict(sigmas, i, x, m0, m1, second_order, bh1: bool):
    """UniP (multistep_uni_p_bh_update) from sigmas[i] to sigmas[i+1]; m0, m1: x0 at i, i-1."""
    alpha_t, sig_t, sig_s0, rk, _, h_phi_1, b_h = _unipc_terms(
        sigmas[i + 1], sigmas[i], sigmas[jnp.maximum(i - 1, 0)], bh1)
    first = sig_t / sig_s0 * x - alpha_t * h_phi_1 * m0
    second = first - alpha_t * b_h * (0.5 * ((m1 - m0) / rk))
    return jnp.where(second_order, second, first)


def _unipc_correct(sigmas, i, last_sample, m_t, m0, m1, second_order, bh1: bool):
    """UniC (multistep_uni_c_bh_update): redo the step sigmas[i-1] -> sigmas[i] from
    last_sample with the new data prediction m_t; m0, m1: x0 at i-1, i-2."""
    alpha_t, sig_t, sig_s0, rk, hh, h_phi_1, b_h = _unipc_terms(
        sigmas[i], sigmas[jnp.maximum(i - 1, 0)], sigmas[jnp.maximum(i - 2, 0)], bh1)
    h_phi_k = h_phi_1 / hh - 1
    b1 = h_phi_k * 1 / b_h
    b2 = (h_phi_k / hh - 1 / 2) * 2 / b_h
    # rhos_c = solve([[1, 1], [rk, 1]], [b1, b2])
    rho1 = (b2 - rk * b1) / (1 - rk)
    rho0 = b1 - rho1
    base = sig_t / sig_s0 * last_sample - alpha_t * h_phi_1 * m0
    d1_t = m_t - m0
    first = base - alpha_t * b_h * (0.5 * d1_t)
    second = base - alpha_t * b_h * (rho0 * ((m1 - m0) / rk) + rho1 * d1_t)
    return jnp.where(second_order, second, first)


def step_unipc(stepper, state: UniPCState, i, eps, x, noise):
    sigmas, k = stepper.tables["sigmas"], stepper.timesteps.shape[0]
    bh1 = stepper.option("solver_type") == "bh1"
    order2 = stepper.option("solver_order") == 2
    x = x.astype(_F32)
    m = data_prediction(stepper.schedule.prediction_type, eps.astype(_F32), x, sigmas[i])
    corrected = _unipc_correct(sigmas, i, state.last_sample, m, state.prev_x0,
                               state.prev_prev_x0, order2 & (i >= 2), bh1)
    x = jnp.where(stepper.tables["use_corrector"][i], corrected, x)
    final_first = stepper.option("lower_order_final") & (i == k - 1)
    x_next = _unipc_predict(sigmas, i, x, m, state.prev_x0, order2 & (i >= 1) & ~final_first,
                            bh1)
    return x_next, UniPCState(m, state.prev_x0, x)


# --------------------------------------------------------------------------------------------
# DEIS (DEISMultistepScheduler, logrho, orders 1-2)
# --------------------------------------------------------------------------------------------


class DEISState(NamedTuple):
    """DEIS history: the noise prediction of step i-1 (float32, shaped like x)."""

    prev_eps: jax.Array


def build_deis(schedule: Schedule, num_inference_steps: int, *, solver_order, lower_order_final):
    _check_order("deis", solver_order)
    ts = dpm_timesteps(schedule, num_inference_steps)
    return ts, {"sigmas": dpm_sigmas(schedule, ts, "sigma_min")}, False


def init_deis(stepper, x) -> DEISState:
    return DEISState(jnp.zeros(jnp.shape(x), _F32))


def _log_rho_integral(t, b, c):
    """DEIS' ind_fn: integral of the Lagrange basis through (b, c) in log(rho)."""
    return t * (-jnp.log(c) + jnp.log(t) - 1) / (jnp.log(b) - jnp.log(c))


def step_deis(stepper, state: DEISState, i, eps, x, noise):
    sigmas, k = stepper.tables["sigmas"], stepper.timesteps.shape[0]
    x = x.astype(_F32)
    alpha_t, sig_t = alpha_sigma(sigmas[i + 1])
    alpha_s0, sig_s0 = alpha_sigma(sigmas[i])
    alpha_s1, sig_s1 = alpha_sigma(sigmas[jnp.maximum(i - 1, 0)])
    x0 = data_prediction(stepper.schedule.prediction_type, eps.astype(_F32), x, sigmas[i])
    m0 = (x - alpha_s0 * x0) / sig_s0
    h = log_snr(alpha_t, sig_t) - log_snr(alpha_s0, sig_s0)
    first = (alpha_t / alpha_s0) * x - (sig_t * (jnp.exp(h) - 1.0)) * m0
    rho_t, rho_s0, rho_s1 = sig_t / alpha_t, sig_s0 / alpha_s0, sig_s1 / alpha_s1
    coef1 = _log_rho_integral(rho_t, rho_s0, rho_s1) - _log_rho_integral(rho_s0, rho_s0, rho_s1)
    coef2 = _log_rho_integral(rho_t, rho_s1, rho_s0) - _log_rho_integral(rho_s0, rho_s1, rho_s0)
    second = alpha_t * (x / alpha_s0 + coef1 * m0 + coef2 * state.prev_eps)
    final_first = stepper.option("lower_order_final") and k < 15
    use_first = (stepper.option("solver_order") == 1) | (i == 0) | (final_first & (i == k - 1))
    return jnp.where(use_first, first, second), DEISState(m0)


# --------------------------------------------------------------------------------------------
# PNDM (PNDMScheduler with skip_prk_steps: PLMS with a Heun-like second step)
# --------------------------------------------------------------------------------------------


def pndm_timesteps(schedule: Schedule, num_inference_steps: int):
    """(timesteps, from_timesteps, to_timesteps), each (K,) int64 with K = N + 1 for N >= 2
    (the second timestep repeats) and K = 1 for N = 1. Step i moves the sample from
    from_timesteps[i] to to_timesteps[i] = from - T // N; step 1 instead redoes the first
    interval (from timesteps[1] + T // N to timesteps[1]) with the averaged output."""
    n = int(num_inference_steps)
    base = set_timesteps(schedule.num_train_timesteps, n, schedule.timestep_spacing,
                         schedule.steps_offset)[::-1]
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
    ratio = schedule.num_train_timesteps // n
    t_from, t_to = ts.copy(), ts - ratio
    if len(ts) > 1:
        t_from[1], t_to[1] = ts[1] + ratio, ts[1]
    return ts, t_from, t_to


class PNDMState(NamedTuple):
    """PLMS history: ets (4, *x.shape), the model outputs entering the multistep formula,
    newest last (diffusers' ets; step 1's output is never added), and the sample at step 0
    (diffusers' cur_sample, the start of step 1)."""

    ets: jax.Array
    first_sample: jax.Array


def build_pndm(schedule: Schedule, num_inference_steps: int):
    if schedule.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError("pndm: prediction_type must be 'epsilon' or 'v_prediction', got "
                         f"{schedule.prediction_type!r}")
    ts, t_from, t_to = pndm_timesteps(schedule, num_inference_steps)
    tables = {"from_timesteps": jnp.asarray(t_from, jnp.int32),
              "to_timesteps": jnp.asarray(t_to, jnp.int32),
              "alphas_cumprod": jnp.asarray(solver_alphas_cumprod(schedule))}
    return ts, tables, False


def init_pndm(stepper, x) -> PNDMState:
    return PNDMState(jnp.zeros((4, *jnp.shape(x)), _F32), jnp.zeros(jnp.shape(x), _F32))


def _pndm_transfer(stepper, sample, t, prev_t, model_output):
    """PNDMScheduler._get_prev_sample: formula (9) of the PNDM paper from t to prev_t."""
    ac = stepper.tables["alphas_cumprod"]
    a_t = ac[t]
    a_prev = jnp.where(prev_t >= 0, ac[jnp.maximum(prev_t, 0)],
                       stepper.schedule.final_alpha_cumprod)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if stepper.schedule.prediction_type == "v_prediction":
        model_output = (a_t**0.5) * model_output + (b_t**0.5) * sample
    sample_coeff = (a_prev / a_t) ** 0.5
    denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
    return sample_coeff * sample - (a_prev - a_t) * model_output / denom


def step_pndm(stepper, state: PNDMState, i, eps, x, noise):
    x, eps = x.astype(_F32), eps.astype(_F32)
    ets = jnp.where(i == 1, state.ets, jnp.concatenate([state.ets[1:], eps[None]]))
    combos = (
        lambda: eps,
        lambda: (eps + ets[-1]) / 2,
        lambda: (3 * ets[-1] - ets[-2]) / 2,
        lambda: (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12,
        lambda: (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]),
    )
    model_output = jax.lax.switch(jnp.clip(i, 0, 4), combos)
    sample = jnp.where(i == 1, state.first_sample, x)
    t_from, t_to = stepper.tables["from_timesteps"][i], stepper.tables["to_timesteps"][i]
    x_next = _pndm_transfer(stepper, sample, t_from, t_to, model_output)
    return x_next, PNDMState(ets, jnp.where(i == 0, x, state.first_sample))
