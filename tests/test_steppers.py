"""leffa_jax.sampling.steppers against diffusers' PyTorch schedulers, built in the test.

Each case compares the timesteps exactly, then runs a whole trajectory with a deterministic
fake model (the same rational function of x and t in torch and in JAX) through diffusers'
`scheduler.step` and through our stepper inside one jitted `lax.scan`, comparing every step's
latent relative to that step's largest magnitude (float32 on both sides).
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from leffa_jax import schedulers as S
from leffa_jax.model import LeffaModel, tiny_config_dir
from leffa_jax.sampling.steppers import STEPPERS, Stepper, make_stepper

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr  # noqa: E402

SD = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
)
CONFIGS = {
    "sd15": dict(SD, steps_offset=1, timestep_spacing="leading"),
    # SDXL-like (Leffa's pose model): trailing, zero terminal SNR, epsilon
    "zsnr": dict(SD, steps_offset=1, timestep_spacing="trailing", rescale_betas_zero_snr=True),
    "zsnr_v": dict(
        SD,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    ),
    "linspace_v": dict(SD, timestep_spacing="linspace", prediction_type="v_prediction"),
}
REFERENCE = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "deis": DEISMultistepScheduler,
}
SHAPE = (2, 4, 6, 5)
TOL = 1e-5  # measured: max 1.7e-6 over all cases (deis-sd15-25), most ~5e-7
MEASURED: dict[str, float] = {}


def fake_model(x, t):
    """A nonlinear stand-in for the UNet, only +, *, / (bit-identical in torch and JAX):
    t is the float32 timestep."""
    s = t / 1000.0
    return 2 * x / (1 + x * x) * (0.5 + s) + 0.25 * s * x - 0.1


def _reference(name, cfg, options):
    """The diffusers scheduler for this case. DEIS and PNDM have no zero-SNR option: they get
    diffusers' own rescaled betas and alphas_cumprod[-1] = 2**-24, as its DPM/UniPC do."""
    kw = dict(cfg, **{k: v for k, v in options.items() if k != "eta"})
    if name == "pndm":
        kw["skip_prk_steps"] = True
    if name in ("dpmpp_2m", "unipc", "deis"):
        kw.setdefault("solver_order", 2)
    if "disable_corrector" in kw:
        kw["disable_corrector"] = list(kw["disable_corrector"])
    emulate_zsnr = name in ("pndm", "deis") and kw.pop("rescale_betas_zero_snr", False)
    if emulate_zsnr:
        base = DDPMScheduler.from_config(dict(cfg, rescale_betas_zero_snr=False))
        kw["trained_betas"] = rescale_zero_terminal_snr(base.betas).numpy()
    ref = REFERENCE[name].from_config(kw)
    if emulate_zsnr:
        assert float(ref.alphas_cumprod[-1]) == 0.0
        ref.alphas_cumprod[-1] = 2.0**-24
    return ref


def _reference_trajectory(ref, name, x_t, noise, eta):
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    noises = iter(noise)
    orig = ddpm_module.randn_tensor
    ddpm_module.randn_tensor = lambda *a, **k: torch.tensor(next(noises))
    extra = {"eta": eta, "variance_noise": None} if name == "ddim" else {}
    x, traj = torch.tensor(x_t), []
    try:
        for i, t in enumerate(ref.timesteps):
            if name == "ddim":
                extra["variance_noise"] = torch.tensor(noise[i])
            e = fake_model(ref.scale_model_input(x, t), torch.tensor(float(t), dtype=torch.float32))
            x = ref.step(e, t, x, **extra).prev_sample
            traj.append(x.numpy())
    finally:
        ddpm_module.randn_tensor = orig
    return np.stack(traj)


@jax.jit
def _trajectory(stepper: Stepper, x, noise):
    """Every step's latent (K, ...) of the stepper driven by `fake_model` in one lax.scan."""

    def body(carry, xs):
        x, state = carry
        i, z = xs
        e = fake_model(stepper.scale_input(x, i), stepper.timesteps[i].astype(jnp.float32))
        x, state = stepper.step(state, i, e, x, z)
        return (x, state), x

    x = x * stepper.init_noise_sigma
    xs = (jnp.arange(stepper.num_steps), noise)
    return lax.scan(body, (x, stepper.init(x)), xs)[1]


def _normalised_error(traj, ref):
    traj, ref = np.asarray(traj, np.float64), np.asarray(ref, np.float64)
    assert traj.shape == ref.shape
    scale = np.maximum(1.0, np.abs(ref).reshape(len(ref), -1).max(1))
    return (np.abs(traj - ref).reshape(len(ref), -1).max(1) / scale).max()


def _case(name, config, n, **options):
    label = "-".join([name, config, str(n)] + [f"{k}={v}" for k, v in options.items()])
    return pytest.param(name, config, n, options, id=label)


CASES = [
    *[
        _case("unipc", "sd15", n, final_sigmas_type=final)
        for final in ("zero", "sigma_min")
        for n in (1, 2, 3, 10, 25)
    ],
    _case("unipc", "zsnr", 10),
    _case("unipc", "zsnr_v", 7, final_sigmas_type="sigma_min"),
    _case("unipc", "linspace_v", 10),
    _case("unipc", "sd15", 6, solver_type="bh1", lower_order_final=False,
          final_sigmas_type="sigma_min"),
    _case("unipc", "sd15", 5, solver_order=1),
    _case("unipc", "sd15", 8, disable_corrector=(0, 3)),
    *[_case("pndm", "sd15", n) for n in (1, 2, 3, 10, 25)],
    _case("pndm", "zsnr", 10),
    _case("pndm", "linspace_v", 7),
    *[_case("deis", "sd15", n) for n in (1, 2, 3, 10, 25)],
    _case("deis", "zsnr", 10),
    _case("deis", "linspace_v", 7),
    _case("deis", "sd15", 6, lower_order_final=False),
    _case("ddpm", "sd15", 10),
    _case("ddpm", "zsnr_v", 10),
    _case("ddim", "sd15", 10),
    _case("ddim", "zsnr_v", 8, eta=0.7),
    _case("dpmpp_2m", "sd15", 10),
    _case("dpmpp_2m", "zsnr", 10),
    _case("dpmpp_2m", "linspace_v", 16, final_sigmas_type="sigma_min"),
]


@pytest.mark.parametrize("name,config,n,options", CASES)
def test_trajectory_matches_diffusers(name, config, n, options):
    cfg = CONFIGS[config]
    ref = _reference(name, cfg, options)
    ref.set_timesteps(n)
    stepper = make_stepper(name, S.make_schedule(cfg), n, **options)
    np.testing.assert_array_equal(np.asarray(stepper.timesteps), ref.timesteps.numpy())
    assert stepper.init_noise_sigma == ref.init_noise_sigma
    k = stepper.num_steps
    rng = np.random.default_rng(n)
    x_t = rng.normal(size=SHAPE).astype(np.float32)
    noise = rng.normal(size=(k, *SHAPE)).astype(np.float32)
    want = _reference_trajectory(ref, name, x_t, noise, options.get("eta", 0.0))
    got = _trajectory(stepper, jnp.asarray(x_t), jnp.asarray(noise))
    err = _normalised_error(got, want)
    MEASURED[f"{name}-{config}-{n}-{options}"] = err
    assert np.isfinite(want).all() and err <= TOL, f"normalised error {err:.2e}"


def test_pndm_evaluates_n_plus_one_times():
    schedule = S.make_schedule(CONFIGS["sd15"])
    assert [make_stepper("pndm", schedule, n).num_steps for n in (1, 2, 10)] == [1, 3, 11]
    ts = np.asarray(make_stepper("pndm", schedule, 10).timesteps)
    assert ts[1] == ts[2] and list(ts[:3]) == [901, 801, 801]


def test_registry_options_and_errors():
    schedule = S.make_schedule(CONFIGS["sd15"])
    assert sorted(STEPPERS) == ["ddim", "ddpm", "deis", "dpmpp_2m", "pndm", "unipc"]
    needs = {name: make_stepper(name, schedule, 4).needs_noise for name in STEPPERS}
    assert needs == dict.fromkeys(STEPPERS, False) | {"ddpm": True}
    assert make_stepper("ddim", schedule, 4, eta=0.5).needs_noise
    assert make_stepper("dpmpp_2m", schedule, 4, algorithm_type="sde-dpmsolver++").needs_noise
    with pytest.raises(ValueError, match="choose one of .*unipc"):
        make_stepper("euler", schedule, 4)
    with pytest.raises(ValueError, match="no option.*solver_typ.*solver_type"):
        make_stepper("unipc", schedule, 4, solver_typ="bh2")
    with pytest.raises(ValueError, match="'zero' or 'sigma_min'"):
        make_stepper("unipc", schedule, 4, final_sigmas_type="last")
    with pytest.raises(ValueError, match="lower_order_final"):
        make_stepper("unipc", schedule, 4, lower_order_final=False)
    with pytest.raises(ValueError, match="solver_order"):
        make_stepper("deis", schedule, 4, solver_order=3)
    with pytest.raises(ValueError, match="prediction_type"):
        make_stepper("pndm", S.make_schedule(dict(SD, prediction_type="sample")), 4)
    stepper = make_stepper("ddpm", schedule, 4)
    with pytest.raises(ValueError, match="needs noise"):
        stepper.step(stepper.init(jnp.zeros(SHAPE)), 0, jnp.zeros(SHAPE), jnp.zeros(SHAPE))


def test_stepper_is_a_pytree_with_static_options():
    schedule = S.make_schedule(CONFIGS["sd15"])
    stepper = make_stepper("unipc", schedule, 5, disable_corrector=[1])
    leaves, treedef = jax.tree_util.tree_flatten(stepper)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert stepper.option("disable_corrector") == (1,)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.name == "unipc" and again.options == stepper.options
    assert stepper.timesteps.dtype == jnp.int32
    x = jnp.ones(SHAPE)
    assert jax.jit(lambda s, x: s.scale_input(x, 0))(stepper, x) is not None


# ------------------------------------------------------------------ schedule_for_model


class _ConfigOnlyModel:
    """What schedule_for_model needs of a model: its base config folder (as LeffaModel keeps
    for an official `.pth` + base_config_dir) and LeffaModel's own scheduler_config reader."""

    def __init__(self, config_dir):
        self.config_dir = str(config_dir)

    scheduler_config = LeffaModel.scheduler_config


@pytest.mark.parametrize("folder", ["stable-diffusion-xl-1.0-inpainting-0.1", "base"])
def test_schedule_for_model_sdxl_official_gets_zero_terminal_snr(tmp_path, folder):
    """Issue 10 item 5: an official `.pth` with an SDXL base folder samples, trains, evaluates
    and visualises with zero-terminal-SNR (by folder name, or by the SDXL UNet when renamed)."""
    from conftest import shared_path

    config_dir = tmp_path / folder
    shutil.copytree(shared_path("configs", "stable-diffusion-xl-1.0-inpainting-0.1"), config_dir)
    model = _ConfigOnlyModel(config_dir)
    schedule = S.schedule_for_model(model)
    assert schedule.rescale_betas_zero_snr and float(schedule.alphas_cumprod[-1]) == 0.0
    ref = DDPMScheduler.from_config(model.scheduler_config(), rescale_betas_zero_snr=True)
    np.testing.assert_allclose(
        np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6
    )
    assert not S.schedule_for_model(model, rescale_betas_zero_snr=False).rescale_betas_zero_snr


def test_schedule_for_model_sd15_and_tiny_model_keep_the_plain_schedule(tmp_path):
    from conftest import shared_path

    sd15 = _ConfigOnlyModel(shared_path("configs", "stable-diffusion-inpainting"))
    tiny = _ConfigOnlyModel(tiny_config_dir())
    for model in (sd15, tiny):
        schedule = S.schedule_for_model(model)
        assert not schedule.rescale_betas_zero_snr and float(schedule.alphas_cumprod[-1]) > 0
        ref = DDPMScheduler.from_config(model.scheduler_config())
        np.testing.assert_allclose(
            np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6
        )


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_for_every_spacing(spacing):
    cfg = dict(SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    schedule = S.make_schedule(cfg)
    for name in ("unipc", "pndm", "deis", "dpmpp_2m"):
        for n in (1, 3, 7, 30, 50, 333):
            ref = _reference(name, cfg, {})
            ref.set_timesteps(n)
            got = make_stepper(name, schedule, n).timesteps
            np.testing.assert_array_equal(np.asarray(got), ref.timesteps.numpy(), err_msg=name)
