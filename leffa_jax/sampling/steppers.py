"""Steppers: the denoising update rules, chosen by name, behind one interface.

A `Stepper` is a pytree (timesteps and tables are leaves; name and options are static), so it
can be passed through `jax.jit`. The loop every sampler runs is

    stepper = make_stepper("unipc", schedule, 25)        # schedule: schedulers.Schedule
    x = init_noise * stepper.init_noise_sigma
    state = stepper.init(x)
    def body(carry, i):                                   # i: traced int32 step index
        x, state = carry
        eps = eps_fn(stepper.scale_input(x, i), stepper.timesteps[i], conditions)
        x, state = stepper.step(state, i, eps, x, step_noise[i])
        return (x, state), None
    (x, _), _ = jax.lax.scan(body, (x, state), jnp.arange(len(stepper.timesteps)))

`timesteps` has K entries, one per model evaluation; K may differ from num_inference_steps
(pndm: N + 1). `eps` is the raw model output (epsilon, v or sample per
schedule.prediction_type). `noise` (shaped like x) is read only when `needs_noise` (ddpm,
ddim with eta > 0, sde-dpmsolver++). Each name reproduces one diffusers 0.42 scheduler:

| name     | diffusers class                 | options (defaults)                               |
|----------|---------------------------------|--------------------------------------------------|
| ddpm     | DDPMScheduler (ancestral)       | -                                                |
| ddim     | DDIMScheduler                   | eta=0.0                                          |
| dpmpp_2m | DPMSolverMultistepScheduler     | final_sigmas_type="zero", solver_type="midpoint",|
|          | (solver_order 2)                | lower_order_final=True, euler_at_final=False,    |
|          |                                 | algorithm_type="dpmsolver++"                     |
| unipc    | UniPCMultistepScheduler         | solver_order=2, solver_type="bh2",               |
|          | (predict_x0)                    | final_sigmas_type="zero", lower_order_final=True,|
|          |                                 | disable_corrector=()                             |
| pndm     | PNDMScheduler (skip_prk_steps)  | -                                                |
| deis     | DEISMultistepScheduler (logrho) | solver_order=2, lower_order_final=True           |

Timestep spacing (leading/trailing/linspace), steps_offset and prediction_type come from the
schedule, as each diffusers class reads them from its config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from leffa_jax.sampling import steppers_classic as classic
from leffa_jax.sampling import steppers_multistep as multistep
from leffa_jax.schedulers import Schedule

__all__ = ["Stepper", "StepperKind", "STEPPERS", "make_stepper"]


@dataclasses.dataclass(frozen=True)
class Stepper:
    """One configured update rule (a pytree).

    timesteps: (K,) int32, the timestep of each model evaluation in order. tables: the per-step
    arrays the rule reads (prev timesteps, sigmas, ...). options: sorted (name, value) pairs.
    """

    name: str
    timesteps: jax.Array
    tables: dict[str, jax.Array]
    schedule: Schedule
    options: tuple[tuple[str, Any], ...] = ()
    needs_noise: bool = False
    init_noise_sigma: float = 1.0

    @property
    def num_steps(self) -> int:
        """K, the number of model evaluations."""
        return self.timesteps.shape[0]

    def option(self, key: str) -> Any:
        return dict(self.options)[key]

    def init(self, x: jax.Array):
        """Initial state (fixed structure, arrays shaped like x) for a sample x (B, ...)."""
        return STEPPERS[self.name].init(self, x)

    def scale_input(self, x: jax.Array, i) -> jax.Array:
        """diffusers' scale_model_input: the identity for all registered steppers."""
        return x

    def step(self, state, i, eps: jax.Array, x: jax.Array, noise: jax.Array | None = None):
        """(x at timesteps[i + 1], new state) from the model output `eps` at timesteps[i]."""
        if self.needs_noise and noise is None:
            raise ValueError(f"stepper {self.name!r} needs noise (shape of x) at every step")
        i = jnp.asarray(i, jnp.int32)
        return STEPPERS[self.name].step(self, state, i, eps, x, noise)


jax.tree_util.register_dataclass(
    Stepper,
    data_fields=["timesteps", "tables", "schedule"],
    meta_fields=["name", "options", "needs_noise", "init_noise_sigma"],
)


class StepperKind(NamedTuple):
    """A registry entry: build(schedule, n, **options) -> (timesteps, tables, needs_noise);
    init(stepper, x) -> state; step(stepper, state, i, eps, x, noise) -> (x_next, state)."""

    build: Callable
    init: Callable
    step: Callable
    defaults: dict[str, Any]


STEPPERS: dict[str, StepperKind] = {
    "ddpm": StepperKind(classic.build_ddpm, classic.init_stateless, classic.step_ddpm, {}),
    "ddim": StepperKind(
        classic.build_ddim, classic.init_stateless, classic.step_ddim, {"eta": 0.0}
    ),
    "dpmpp_2m": StepperKind(
        classic.build_dpmpp_2m,
        classic.init_dpmpp_2m,
        classic.step_dpmpp_2m,
        {
            "final_sigmas_type": "zero",
            "solver_type": "midpoint",
            "lower_order_final": True,
            "euler_at_final": False,
            "algorithm_type": "dpmsolver++",
        },
    ),
    "unipc": StepperKind(
        multistep.build_unipc,
        multistep.init_unipc,
        multistep.step_unipc,
        {
            "solver_order": 2,
            "solver_type": "bh2",
            "final_sigmas_type": "zero",
            "lower_order_final": True,
            "disable_corrector": (),
        },
    ),
    "pndm": StepperKind(multistep.build_pndm, multistep.init_pndm, multistep.step_pndm, {}),
    "deis": StepperKind(
        multistep.build_deis,
        multistep.init_deis,
        multistep.step_deis,
        {"solver_order": 2, "lower_order_final": True},
    ),
}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def make_stepper(name: str, schedule: Schedule, num_inference_steps: int, **options) -> Stepper:
    """The stepper `name` (see the module table) for `num_inference_steps` on `schedule`.
    Unknown names or options raise ValueError listing the choices."""
    if name not in STEPPERS:
        raise ValueError(f"unknown stepper {name!r}; choose one of {sorted(STEPPERS)}")
    kind = STEPPERS[name]
    unknown = sorted(set(options) - set(kind.defaults))
    if unknown:
        raise ValueError(
            f"stepper {name!r} has no option(s) {unknown}; its options are "
            f"{sorted(kind.defaults) or 'none'}"
        )
    merged = {k: _hashable(options.get(k, v)) for k, v in kind.defaults.items()}
    timesteps, tables, needs_noise = kind.build(schedule, int(num_inference_steps), **merged)
    return Stepper(
        name=name,
        timesteps=jnp.asarray(timesteps, jnp.int32),
        tables=tables,
        schedule=schedule,
        options=tuple(sorted(merged.items())),
        needs_noise=bool(needs_noise),
    )
