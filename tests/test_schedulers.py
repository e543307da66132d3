"""leffa_jax.schedulers (and the DDPM/DDIM/DPM-Solver++ step functions of
leffa_jax.sampling.steppers_classic) against diffusers' PyTorch schedulers, computed in the test.
The `Stepper` interface over all six update rules is tested in test_steppers.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from leffa_jax import schedulers as S
from leffa_jax.sampling import steppers_classic as C

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr  # noqa: E402

SD = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
)
SHAPE = (2, 4, 6, 5)


def _dpm(cfg, **kw):
    """diffusers' DPMSolverMultistepScheduler rejects DDPM/DDIM-only keys."""
    cfg = {k: v for k, v in cfg.items() if k not in ("clip_sample", "set_alpha_to_one")}
    return DPMSolverMultistepScheduler(**cfg, **kw)


def _assert_traj_close(traj, ref, tol=1e-6):
    """Trajectories (steps, ...) agree to `tol` relative to each step's largest magnitude (at
    least 1): float32 rounding of x0 = (x - sqrt(1-a) eps) / sqrt(a) at a ~ 0.005 scales with
    the values, and the fake model outputs push them to ~30."""
    traj, ref = np.asarray(traj, np.float64), np.asarray(ref, np.float64)
    assert traj.shape == ref.shape
    scale = np.maximum(1.0, np.abs(ref).reshape(len(ref), -1).max(1))
    err = np.abs(traj - ref).reshape(len(ref), -1).max(1) / scale
    assert err.max() <= tol, f"normalised error per step {err}"


def _fake_model_outputs(n, seed=0):
    """Deterministic stand-ins for model outputs and step noises."""
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    noise = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    x_t = rng.normal(size=SHAPE).astype(np.float32)
    return x_t, eps, noise


# ------------------------------------------------------------------ betas, alphas_cumprod


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_diffusers(kind, zero_snr):
    cfg = dict(SD, beta_schedule=kind, rescale_betas_zero_snr=zero_snr)
    ref = DDPMScheduler(**cfg)
    s = S.make_schedule(cfg)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)
    if zero_snr:
        assert float(s.alphas_cumprod[-1]) == 0.0
        assert float(s.betas[-1]) == 1.0
        # diffusers' float32 rescale is less exact; compare betas against it in float64
        b64 = torch.tensor(
            np.asarray(S.make_schedule(dict(SD, beta_schedule=kind)).betas), dtype=torch.float64
        )
        np.testing.assert_allclose(
            np.asarray(s.betas), rescale_zero_terminal_snr(b64).numpy(), atol=1e-6, rtol=0
        )
    else:
        np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), atol=1e-8)


def test_rescale_zero_snr_jax_matches_numpy():
    b = S.scaled_linear_betas(0.00085, 0.012, 1000)
    bj = jax.jit(S.rescale_betas_zero_snr)(jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(bj), S.rescale_betas_zero_snr(b), atol=2e-5)
    ac = np.cumprod(1 - S.rescale_betas_zero_snr(b).astype(np.float64))
    assert ac[-1] == 0.0 and abs(ac[0] - (1 - b[0])) < 1e-7


def test_make_schedule_from_json(tmp_path):
    from conftest import shared_path

    p = shared_path("configs", "stable-diffusion-inpainting", "scheduler", "scheduler_config.json")
    s = S.make_schedule(p)
    assert (s.prediction_type, s.timestep_spacing, s.steps_offset) == ("epsilon", "leading", 1)
    assert s.set_alpha_to_one is False and s.clip_sample is False
    ts, prev = S.ddpm_timesteps(s, 30)
    assert ts[0] == 958 and ts[1] == 925 and ts[-2] == 34 and ts[-1] == 1 and len(ts) == 30
    np.testing.assert_array_equal(prev, np.r_[ts[1:], -1])
    ts50, _ = S.ddpm_timesteps(s, 50)
    assert ts50[0] == 981 and ts50[-1] == 1
    # the SDXL pose model: zero-terminal-SNR as an override (its json does not carry the flag)
    px = shared_path("configs", "stable-diffusion-xl-1.0-inpainting-0.1", "scheduler")
    sx = S.make_schedule(px, rescale_betas_zero_snr=True)
    assert sx.rescale_betas_zero_snr and float(sx.alphas_cumprod[-1]) == 0.0
    cfg = json.loads(p.read_text())
    cfg["beta_schedule"] = "squaredcos_cap_v2"
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        S.make_schedule(cfg)
    with pytest.raises(ValueError, match="prediction_type"):
        S.make_schedule(prediction_type="flow")


# ------------------------------------------------------------------ timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 7, 30, 50, 333, 1000])
def test_timesteps_match_diffusers(spacing, n):
    cfg = dict(SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    s = S.make_schedule(cfg)
    for cls, fn in ((DDPMScheduler, S.ddpm_timesteps), (DDIMScheduler, S.ddim_timesteps)):
        ref = cls(**cfg)
        ref.set_timesteps(n)
        ts, prev = fn(s, n)
        np.testing.assert_array_equal(ts, ref.timesteps.numpy())
        if cls is DDPMScheduler:
            np.testing.assert_array_equal(prev, [int(ref.previous_timestep(int(t))) for t in ts])
    if n < 1000:  # DPM-Solver's N+1 grid
        ref = _dpm(cfg)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(S.dpm_timesteps(s, n), ref.timesteps.numpy())
        np.testing.assert_allclose(
            np.asarray(S.dpm_sigmas(s, S.dpm_timesteps(s, n))), ref.sigmas.numpy(), rtol=1e-5
        )


# ------------------------------------------------------------------ trajectories


def _scan(step, x, xs):
    return jax.jit(lambda x, xs: lax.scan(step, x, xs))(x, xs)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(SD, steps_offset=1),
        dict(
            SD,
            steps_offset=1,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
        ),
        dict(SD, timestep_spacing="linspace", prediction_type="v_prediction"),
    ],
    ids=["sd15", "zsnr-v-trailing", "linspace-v"],
)
def test_ddpm_trajectory(cfg):
    n = 8
    ref = DDPMScheduler(**cfg)
    ref.set_timesteps(n)
    s = S.make_schedule(cfg)
    ts, prev = S.ddpm_timesteps(s, n)
    x_t, eps, noise = _fake_model_outputs(n)

    x = torch.tensor(x_t)
    ref_traj = []
    noises = iter(noise)

    def fake_randn(shape, generator=None, device=None, dtype=None):
        return torch.tensor(next(noises))

    import diffusers.schedulers.scheduling_ddpm as mod

    orig = mod.randn_tensor
    mod.randn_tensor = fake_randn
    try:
        for i, t in enumerate(ref.timesteps):
            x = ref.step(torch.tensor(eps[i]), int(t), x).prev_sample
            ref_traj.append(x.numpy())
    finally:
        mod.randn_tensor = orig

    def body(x, xs):
        t, pt, e, z = xs
        x, _ = C.ddpm_step(s, e, x, t, pt, z)
        return x, x

    _, traj = _scan(body, jnp.asarray(x_t), (jnp.asarray(ts), jnp.asarray(prev), eps, noise))
    _assert_traj_close(traj, np.stack(ref_traj))


def test_ddpm_step_single_matches_tightly():
    cfg = dict(SD, steps_offset=1)
    ref = DDPMScheduler(**cfg)
    ref.set_timesteps(30)
    s = S.make_schedule(cfg)
    ts, prev = S.ddpm_timesteps(s, 30)
    x_t, eps, noise = _fake_model_outputs(1)
    for i in (0, 14, 29):
        import diffusers.schedulers.scheduling_ddpm as mod

        orig = mod.randn_tensor
        mod.randn_tensor = lambda *a, **k: torch.tensor(noise[0])
        try:
            out = ref.step(torch.tensor(eps[0]), int(ts[i]), torch.tensor(x_t))
        finally:
            mod.randn_tensor = orig
        got, x0 = jax.jit(C.ddpm_step)(s, eps[0], x_t, ts[i], prev[i], noise[0])
        np.testing.assert_allclose(np.asarray(got), out.prev_sample.numpy(), rtol=1e-6, atol=1e-6)
        # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) cancels terms of size ~30: an element near 0
        # carries their rounding, so the absolute bound is 2 ulp of the largest x0, not 1e-6
        # (the compiler's choice of fused multiply-adds moves such elements by ~1 ulp)
        ref_x0 = out.pred_original_sample.numpy()
        ulp = float(np.spacing(np.float32(np.abs(ref_x0).max())))
        np.testing.assert_allclose(np.asarray(x0), ref_x0, rtol=1e-6, atol=max(1e-6, 2 * ulp))


def test_ddpm_step_per_sample_timesteps():
    s = S.make_schedule(SD)
    x_t, eps, noise = _fake_model_outputs(1)
    t = np.array([500, 0])
    pt = np.array([450, -1])
    got, _ = C.ddpm_step(s, eps[0], x_t, t, pt, noise[0])
    for b in range(2):
        one, _ = C.ddpm_step(s, eps[0][b : b + 1], x_t[b : b + 1], t[b], pt[b], noise[0][b : b + 1])
        np.testing.assert_allclose(np.asarray(got[b : b + 1]), np.asarray(one), atol=1e-7)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(SD, steps_offset=1),
        dict(
            SD, prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True
        ),
    ],
    ids=["sd15", "v-trailing"],
)
def test_ddim_trajectory(cfg, eta):
    n = 10
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(n)
    s = S.make_schedule(cfg)
    ts, prev = S.ddim_timesteps(s, n)
    x_t, eps, noise = _fake_model_outputs(n, seed=1)
    x = torch.tensor(x_t)
    ref_traj = []
    for i, t in enumerate(ref.timesteps):
        x = ref.step(
            torch.tensor(eps[i]), int(t), x, eta=eta, variance_noise=torch.tensor(noise[i])
        ).prev_sample
        ref_traj.append(x.numpy())

    def body(x, xs):
        t, pt, e, z = xs
        x, _ = C.ddim_step(s, e, x, t, pt, eta=eta, noise=z)
        return x, x

    _, traj = _scan(body, jnp.asarray(x_t), (jnp.asarray(ts), jnp.asarray(prev), eps, noise))
    _assert_traj_close(traj, np.stack(ref_traj))


@pytest.mark.parametrize(
    "cfg,kw,n",
    [
        (dict(SD, steps_offset=1, timestep_spacing="leading"), {}, 12),
        (dict(SD, timestep_spacing="linspace"), {}, 20),
        (
            dict(
                SD,
                prediction_type="v_prediction",
                timestep_spacing="trailing",
                rescale_betas_zero_snr=True,
            ),
            {},
            9,
        ),
        (dict(SD, timestep_spacing="linspace"), dict(solver_type="heun"), 6),
        (dict(SD, timestep_spacing="linspace"), dict(algorithm_type="sde-dpmsolver++"), 7),
        (
            dict(SD, timestep_spacing="trailing"),
            dict(final_sigmas_type="sigma_min", lower_order_final=False),
            16,
        ),
    ],
    ids=["leading12", "linspace20", "zsnr-v-trailing9", "heun6", "sde7", "sigma_min16"],
)
def test_dpm_solver_trajectory(cfg, kw, n):
    ref = _dpm(cfg, solver_order=2, **kw)
    ref.set_timesteps(n)
    s = S.make_schedule(cfg)
    ts = S.dpm_timesteps(s, n)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    sig = S.dpm_sigmas(s, ts, kw.get("final_sigmas_type", "zero"))
    x_t, eps, noise = _fake_model_outputs(n, seed=2)
    x = torch.tensor(x_t)
    ref_traj = []
    for i, t in enumerate(ref.timesteps):
        x = ref.step(torch.tensor(eps[i]), t, x, variance_noise=torch.tensor(noise[i])).prev_sample
        ref_traj.append(x.numpy())

    def body(carry, xs):
        x, st = carry
        e, z = xs
        x, st = C.dpm_solver_step(s, sig, st, e, x, z, **kw)
        return (x, st), x

    x0 = jnp.asarray(x_t)
    (_, st), traj = _scan(body, (x0, C.dpm_solver_init(x0)), (eps, noise))
    assert int(st.step) == n
    # sigma = sqrt((1 - a) / a) near t = 0 amplifies the ~1e-7 alphas_cumprod difference (ours
    # built in float64, diffusers' in float32) to ~3e-6 relative: allow 2e-6 here
    _assert_traj_close(traj, np.stack(ref_traj), tol=2e-6)


# ------------------------------------------------------------------ training helpers


@pytest.mark.parametrize("zero_snr", [False, True])
def test_add_noise_and_velocity(zero_snr):
    cfg = dict(SD, rescale_betas_zero_snr=zero_snr)
    ref = DDPMScheduler(**cfg)
    s = S.make_schedule(cfg)
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=SHAPE).astype(np.float32)
    z = rng.normal(size=SHAPE).astype(np.float32)
    t = np.array([0, 999])
    got = jax.jit(S.add_noise)(s, x0, z, t)
    want = ref.add_noise(torch.tensor(x0), torch.tensor(z), torch.tensor(t))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6)
    got_v = jax.jit(S.get_velocity)(s, x0, z, t)
    want_v = ref.get_velocity(torch.tensor(x0), torch.tensor(z), torch.tensor(t))
    np.testing.assert_allclose(np.asarray(got_v), want_v.numpy(), atol=1e-6)
