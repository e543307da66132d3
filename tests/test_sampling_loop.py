"""The sampling loop (`leffa_jax.sampling.loop.denoise`) against independent references.

- Every registered stepper driven by the loop vs a plain Python loop over the diffusers
  scheduler (built here from the same config) with the same fake noise function.
- Official recorded runs replayed through the loop: Magic Clothing's joint-guidance runs (UniPC,
  DDIM, DEIS; branch predictions looked up by timestep, combined by `nested_guidance`) and
  Face-diffuser's PNDM run with its three stages (`Stages`, saliency fusion in stage 2).
- Sharded over the 8 CPU devices (tests/conftest.py) vs unsharded; progress callbacks; seeds.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path

from leffa_jax.sampling import guidance as G
from leffa_jax.sampling.loop import Stages, batch_mesh, denoise, progress_reporting, shard_batch
from leffa_jax.sampling.steppers import STEPPERS, make_stepper
from leffa_jax.schedulers import make_schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD15 = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading",
}
CONFIGS = {
    "sd15": SD15,
    "zero_snr": {**SD15, "rescale_betas_zero_snr": True},  # Leffa's SDXL-based models
    "v_trailing": {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
}
DIFFUSERS_CLASS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler", "deis": "DEISMultistepScheduler",
}
SHAPE = (2, 8, 6, 4)  # B, h, w, C


def fake_eps(x, t, conditions):
    """A smooth nonlinear stand-in for a UNet (the same formula in jax, numpy and torch)."""
    lib = torch if isinstance(x, torch.Tensor) else jnp
    return lib.tanh(x) * (t / 1000.0) + 0.1 * x + conditions


def nchw(x):
    return np.moveaxis(np.asarray(x), -1, -3)


def nhwc(x):
    return np.moveaxis(np.asarray(x), -3, -1)


def diffusers_trajectory(name, config, steps, init, conditions, step_noise, monkeypatch):
    """Plain Python loop over the diffusers scheduler: latents after each step (K, B, h, w, C)."""
    cls = getattr(diffusers, DIFFUSERS_CLASS[name])
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    draws = iter(torch.from_numpy(nchw(n)) for n in step_noise)
    from diffusers.schedulers import scheduling_ddpm

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(draws))
    x = torch.from_numpy(nchw(init)) * sched.init_noise_sigma
    cond = torch.from_numpy(nchw(conditions))
    out = []
    for t in sched.timesteps:
        eps = fake_eps(sched.scale_model_input(x, t), float(t), cond)
        x = sched.step(eps, t, x).prev_sample
        out.append(nhwc(x.numpy()))
    return np.stack(out), sched.timesteps.numpy()


@jax.jit
def run_loop(stepper, init, conditions, step_noise=None, noise_key=None):
    return denoise(stepper, fake_eps, init, conditions, step_noise=step_noise,
                   noise_key=noise_key, return_latents=True)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(STEPPERS))
def test_loop_matches_diffusers_python_loop(name, config, monkeypatch):
    cfg = CONFIGS[config]
    if config == "zero_snr" and name in ("pndm", "deis"):
        pytest.skip(f"diffusers' {DIFFUSERS_CLASS[name]} has no zero-terminal-SNR option")
    steps = 5
    rng = np.random.default_rng(0)
    init = rng.standard_normal(SHAPE).astype(np.float32)
    conditions = 0.05 * rng.standard_normal(SHAPE).astype(np.float32)
    stepper = make_stepper(name, make_schedule(cfg), steps)
    k = stepper.timesteps.shape[0]
    step_noise = rng.standard_normal((k,) + SHAPE).astype(np.float32)
    want, want_ts = diffusers_trajectory(name, cfg, steps, init, conditions, step_noise,
                                         monkeypatch)
    _, latents = run_loop(stepper, init, conditions, step_noise=step_noise)
    np.testing.assert_array_equal(np.asarray(stepper.timesteps), want_ts)
    err = np.abs(np.asarray(latents) - want).max() / np.abs(want).max()
    assert err <= 1e-5, f"{name}/{config}: relative latent error {err}"


# --------------------------------------------------------------------------------------------
# Official runs replayed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run,name", [("joint_default", "unipc"), ("joint_ddim", "ddim"),
                                      ("joint_deis_base_default", "deis")])
def test_magic_clothing_joint_guidance_replay(run, name):
    """Recorded branch predictions (looked up by timestep) -> nested guidance -> loop: the
    official latents after every step."""
    base = shared_path("fixtures", "magic_clothing")
    d = np.load(base / f"{run}.npz")
    meta = json.loads((base / "meta.json").read_text())["runs"][run]
    assert meta["scheduler"] == {"unipc": "UniPCMultistepScheduler", "ddim": "DDIMScheduler",
                                 "deis": "DEISMultistepScheduler"}[name]
    # diffusers 0.25.1 (the official pin) ends UniPC on sigma_min; 0.42's default is "zero"
    options = {"final_sigmas_type": "sigma_min"} if name == "unipc" else {}
    schedule = make_schedule(meta["scheduler_config"])
    stepper = make_stepper(name, schedule, meta["steps"], **options)
    np.testing.assert_array_equal(np.asarray(stepper.timesteps), d["timesteps"].astype(int))
    branches = jnp.stack([nhwc(d[f"noise_pred_{b}"]) for b in ("uncond", "cloth", "text")])
    scales = (float(d["guidance_scale_cloth"]), float(d["guidance_scale_text"]))

    def replay(x, t, recorded):
        step = jnp.argmax(stepper.timesteps == t)
        return G.nested_guidance(list(recorded[:, step]), scales,
                                 ((False, False), (True, False), (True, True)))

    fn = jax.jit(lambda st, x0, rec: denoise(st, replay, x0, rec, return_latents=True))
    _, latents = fn(stepper, nhwc(d["init_latents"]), branches)
    want = nhwc(d["latents"])
    err = np.abs(np.asarray(latents) - want).max(axis=(1, 2, 3, 4)) / np.abs(want).max()
    assert err.max() <= 1e-5, f"{run}: relative latent error per step {err}"


def test_face_diffuser_stages_replay():
    """Face-diffuser's PNDM run (N = 8, K = 9): TDM alone for i <= 2, SNF fusion for i in 3..5,
    SDM alone after, each step replaying the recorded UNet outputs through `Stages`."""
    d = np.load(shared_path("fixtures", "face_diffuser", "sampler_pndm.npz"))
    cfg = json.loads(str(d["scheduler_config"]))
    stepper = make_stepper("pndm", make_schedule(cfg), int(d["num_inference_steps"]))
    np.testing.assert_array_equal(np.asarray(stepper.timesteps), d["timesteps"])
    w = float(d["guidance_scale"])
    tdm, sdm = list(d["tdm_iters"]), list(d["sdm_iters"])
    s1, s2 = int(d["start_merge_step"]), int(d["final_step"])

    def recorded(model_out, iters, i):
        uncond, cond = nhwc(model_out[iters.index(i)])[:, None]
        delta = G.guidance_delta(uncond, cond, w)
        return uncond + delta, delta

    def replay_step(i):
        def eps_fn(x, t, conditions):
            if i <= s1:
                return recorded(d["tdm_out"], tdm, i)[0]
            if i > s2:
                return recorded(d["sdm_out"], sdm, i)[0]
            return G.saliency_fusion(*recorded(d["tdm_out"], tdm, i),
                                     *recorded(d["sdm_out"], sdm, i))
        return eps_fn

    k = stepper.timesteps.shape[0]
    stages = Stages(tuple(range(k)), tuple(replay_step(i) for i in range(k)))
    fn = jax.jit(lambda st, x0: denoise(st, stages, x0, return_latents=True))
    x, latents = fn(stepper, nhwc(d["init_noise"]))
    want = nhwc(d["latents_out"])
    err = np.abs(np.asarray(latents) - want).max() / np.abs(want).max()
    assert err <= 1e-5, f"relative latent error {err}"
    np.testing.assert_allclose(x, nhwc(d["final_latents"]), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Sharding, progress, seeds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm", "pndm"])
def test_sharded_equals_unsharded_and_progress(name):
    """Batch 8 split over the 8 CPU devices vs one device; each reports K steps to its own
    callback (PNDM: K = N + 1)."""
    assert len(jax.local_devices()) == 8, "tests/conftest.py provides 8 CPU devices"
    steps, b = 4, 8
    rng = np.random.default_rng(1)
    shape = (b,) + SHAPE[1:]
    init = rng.standard_normal(shape).astype(np.float32)
    conditions = 0.05 * rng.standard_normal(shape).astype(np.float32)
    stepper = make_stepper(name, make_schedule(SD15), steps)
    k = stepper.timesteps.shape[0]
    noise = rng.standard_normal((k,) + shape).astype(np.float32)
    fn = jax.jit(lambda st, x0, c, n, p: denoise(st, fake_eps, x0, c, step_noise=n, progress=p,
                                                 return_latents=True))
    mesh = batch_mesh(b)
    assert mesh is not None and batch_mesh(b, enabled=False) is None and batch_mesh(3) is None
    seen = {"plain": [], "sharded": []}
    with progress_reporting(seen["plain"].append) as call:
        plain = fn(stepper, init, conditions, noise, call)
        plain = jax.block_until_ready(plain)
    x0, cond = shard_batch((init, conditions), mesh)
    sharded_noise = shard_batch(noise, mesh, 1)
    assert len(x0.sharding.device_set) == 8 and sharded_noise.sharding.spec[0] is None
    with progress_reporting(seen["sharded"].append) as call:
        sharded = fn(stepper, x0, cond, sharded_noise, call)
        sharded = jax.block_until_ready(sharded)
    assert len(sharded[0].sharding.device_set) == 8
    for a, c in zip(plain, sharded, strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-6, atol=1e-6)
    assert sorted(seen["plain"]) == list(range(k)), seen["plain"]
    assert sorted(seen["sharded"]) == list(range(k)), seen["sharded"]
    with progress_reporting(None) as call:
        assert call is None


def test_concurrent_calls_report_to_their_own_callback():
    stepper = make_stepper("ddim", make_schedule(SD15), 3)
    fn = jax.jit(lambda st, x0, p: denoise(st, fake_eps, x0, 0.0, progress=p))
    x0 = jnp.zeros(SHAPE)
    first, second = [], []
    with progress_reporting(first.append) as a, progress_reporting(second.append) as b:
        jax.block_until_ready((fn(stepper, x0, a), fn(stepper, x0 + 1, b)))
    assert sorted(first) == sorted(second) == [0, 1, 2]


def test_seeded_step_noise():
    stepper = make_stepper("ddpm", make_schedule(SD15), 3)
    init = jnp.ones(SHAPE)
    key = jax.random.key(0)
    a, b, c = (run_loop(stepper, init, 0.0, noise_key=kk)[0]
               for kk in (key, key, jax.random.key(1)))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="give step_noise or noise_key"):
        run_loop(stepper, init, 0.0)
    with pytest.raises(ValueError, match="step_noise has shape"):
        run_loop(stepper, init, 0.0, step_noise=jnp.zeros((2,) + SHAPE))
    # steppers that draw nothing ignore the noise arguments
    ddim = make_stepper("ddim", make_schedule(SD15), 3)
    np.testing.assert_array_equal(run_loop(ddim, init, 0.0)[0],
                                  run_loop(ddim, init, 0.0, noise_key=key)[0])


def test_stages_validation():
    with pytest.raises(ValueError, match="starting at 0"):
        Stages((1, 2), (fake_eps, fake_eps))
    with pytest.raises(ValueError, match="non-decreasing"):
        Stages((0, 3, 2), (fake_eps,) * 3)
    stages = Stages((0, 2, 2, 4), (fake_eps,) * 4)  # an empty stage is skipped
    assert [int(stages.stage_index(jnp.int32(i))) for i in range(6)] == [0, 0, 2, 2, 3, 3]
