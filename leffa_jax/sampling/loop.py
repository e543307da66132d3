"""The denoising loop every system samples with: one `lax.scan` over a stepper's timesteps.

    x = init_noise * stepper.init_noise_sigma;  state = stepper.init(x)
    for i in range(K):                              # K = len(stepper.timesteps)
        eps = eps_fn(stepper.scale_input(x, i), stepper.timesteps[i], conditions)
        x, state = stepper.step(state, i, eps, x, step_noise[i])

`denoise` is traced inside the system's own compiled program (encode, loop, decode in one
`jax.jit`). The noise function `eps_fn(x_t, t, conditions) -> eps` is built by the system from
its models: it runs all guidance branches in one model call (branches on the batch axis, see
`guidance.py`) and combines them. `Stages` makes the noise function depend on the loop step
(`lax.switch`: only the current stage's function runs). Steppers come from
`leffa_jax.sampling.steppers.make_stepper` (a pytree; its `timesteps` may be longer than the
number of inference steps, e.g. PNDM's N + 1).

Random draws: ancestral steppers (`needs_noise`) take replayed `step_noise` (K, B, ...) or draw
from `noise_key` (`jax.random.fold_in(key, i)` per step); the others draw nothing.

Progress: `progress_reporting(callback)` gives a per-call id that the compiled program takes as
an ordinary argument and hands to `denoise(progress=...)`; each finished step calls
`callback(i)` of that call only. One compiled program serves every callback (the id, not the
function, is the argument), and concurrent calls report to their own callbacks.

Batch sharding: `batch_mesh` and `shard_batch` place a batch over the local devices (the specs
come from `leffa_jax.sharding.batch_sharding`); the loop itself is layout-agnostic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from leffa_jax import sharding

__all__ = [
    "EpsFn",
    "Stages",
    "denoise",
    "progress_reporting",
    "batch_mesh",
    "shard_batch",
]

EpsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]  # (x_t, t, conditions) -> eps
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Stages:
    """A noise function that changes with the loop step: stage k runs for the steps
    starts[k] <= i < starts[k + 1] (starts[0] = 0, non-decreasing; an empty stage is skipped).
    Each entry of `eps_fns` has the `EpsFn` signature; only the current stage's runs."""

    starts: tuple[int, ...]
    eps_fns: tuple[EpsFn, ...]

    def __post_init__(self):
        starts = tuple(int(s) for s in self.starts)
        if len(starts) != len(self.eps_fns) or not starts or starts[0] != 0:
            raise ValueError(f"Stages: need one start per function, starting at 0; got {starts}")
        if any(b < a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"Stages: starts must be non-decreasing, got {starts}")
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "eps_fns", tuple(self.eps_fns))

    def stage_index(self, step: jax.Array) -> jax.Array:
        """The stage running at loop step `step` (traced int32 scalar)."""
        later = jnp.asarray(self.starts[1:], jnp.int32)
        return jnp.sum(step >= later).astype(jnp.int32)

    def __call__(self, x_t, t, conditions, step):
        if len(self.eps_fns) == 1:
            return self.eps_fns[0](x_t, t, conditions)
        return jax.lax.switch(self.stage_index(step), self.eps_fns, x_t, t, conditions)


def _predict(eps_fn, x_t, t, conditions, step) -> jax.Array:
    if isinstance(eps_fn, Stages):
        eps = eps_fn(x_t, t, conditions, step)
    else:
        eps = eps_fn(x_t, t, conditions)
    return eps.astype(_F32)


# --------------------------------------------------------------------------------------------
# Progress (per call)
# --------------------------------------------------------------------------------------------


class _ProgressCallbacks:
    """Callbacks of the calls in flight, by call id: the compiled program carries the id as an
    argument (a Python function cannot be one without recompiling for each new function)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._callbacks: dict[int, Callable[[int], None]] = {}

    def add(self, callback: Callable[[int], None]) -> int:
        with self._lock:
            call_id = next(self._ids) % (2**31)
            self._callbacks[call_id] = callback
            return call_id

    def remove(self, call_id: int) -> None:
        with self._lock:
            self._callbacks.pop(call_id, None)

    def report(self, call_id, step) -> None:
        with self._lock:
            callback = self._callbacks.get(int(call_id))
        if callback is not None:
            callback(int(step))


_CALLBACKS = _ProgressCallbacks()


@contextlib.contextmanager
def progress_reporting(callback: Callable[[int], None] | None) -> Iterator[jax.Array | None]:
    """For one sampling call: yields the id (int32 scalar) to pass into the compiled program and
    on to `denoise(progress=...)`, or None when `callback` is None. Inside the block each
    finished step calls `callback(step_index)`; afterwards the callback is dropped."""
    if callback is None:
        yield None
        return
    call_id = _CALLBACKS.add(callback)
    try:
        yield jnp.asarray(call_id, jnp.int32)
    finally:
        jax.effects_barrier()
        _CALLBACKS.remove(call_id)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _step_noise(stepper, x, step_noise, noise_key) -> jax.Array | None:
    """(K, B, ...) noise for an ancestral stepper, None for the others."""
    if not stepper.needs_noise:
        return None
    k = stepper.timesteps.shape[0]
    if step_noise is not None:
        if tuple(step_noise.shape) != (k,) + tuple(x.shape):
            raise ValueError(
                f"step_noise has shape {tuple(step_noise.shape)}, the {stepper.name!r} stepper "
                f"needs {(k,) + tuple(x.shape)} (one draw like the latent per step)"
            )
        return step_noise.astype(_F32)
    if noise_key is None:
        raise ValueError(
            f"the {stepper.name!r} stepper draws noise at every step: give step_noise or noise_key"
        )
    keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(jnp.arange(k))
    return jax.vmap(lambda key: jax.random.normal(key, x.shape, _F32))(keys)


def denoise(
    stepper,
    eps_fn: EpsFn | Stages,
    init_noise: jax.Array,
    conditions: Any = None,
    *,
    step_noise: jax.Array | None = None,
    noise_key: jax.Array | None = None,
    return_latents: bool = False,
    progress: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Run the sampling loop (traceable; call it inside `jax.jit`).

    stepper: from `make_stepper` (K = len(stepper.timesteps) model evaluations).
    eps_fn(x_t (B,...) float32, t int32 scalar, conditions) -> eps (B,...) (cast to float32),
    or `Stages`. init_noise: (B, ...) standard normal draw (scaled by init_noise_sigma here).
    step_noise (K, B, ...) / noise_key: per-step draws for ancestral steppers (ignored by the
    others). progress: the id from `progress_reporting`, or None.

    Returns (x_0 (B, ...) float32, the latents after each step (K, B, ...) or None).
    """
    x = init_noise.astype(_F32) * stepper.init_noise_sigma
    noise = _step_noise(stepper, x, step_noise, noise_key)
    k = stepper.timesteps.shape[0]

    def body(carry, xs):
        x, state = carry
        i, noise_i = xs
        t = stepper.timesteps[i]
        eps = _predict(eps_fn, stepper.scale_input(x, i), t, conditions, i)
        x, state = stepper.step(state, i, eps, x, noise_i)
        x = x.astype(_F32)
        if progress is not None:
            jax.debug.callback(_CALLBACKS.report, progress, i)
        return (x, state), (x if return_latents else None)

    xs = (jnp.arange(k, dtype=jnp.int32), noise)
    (x, _), latents = jax.lax.scan(body, (x, stepper.init(x)), xs)
    return x, latents


# --------------------------------------------------------------------------------------------
# Batch sharding
# --------------------------------------------------------------------------------------------


def batch_mesh(batch: int, enabled: bool = True) -> Mesh | None:
    """A ('data', 'fsdp') mesh over all local devices for data parallelism, or None when
    disabled, with one device, or when `batch` does not divide over the devices."""
    devices = jax.local_devices()
    if not enabled or len(devices) < 2 or batch % len(devices):
        return None
    return sharding.make_mesh((-1, 1), devices)


def shard_batch(tree, mesh: Mesh | None, batch_axis: int | Sequence[int] = 0):
    """device_put every array of `tree` with its batch axis split over `mesh` (the batch spec of
    `sharding.batch_sharding`); `batch_axis` is one int or a pytree prefix of ints (e.g. 1 for
    per-step draws (K, B, ...)). Returns `tree` as jax arrays; unchanged placement if mesh is
    None."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)

    def put(axis, x):
        return jax.device_put(x, sharding.batch_sharding(mesh, np.ndim(x), axis))

    if isinstance(batch_axis, int):
        return jax.tree.map(lambda x: put(batch_axis, x), tree)
    return jax.tree.map(lambda axis, sub: jax.tree.map(lambda x: put(axis, x), sub),
                        batch_axis, tree)
