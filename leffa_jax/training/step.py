"""One optimizer step, generic over the task's loss, and its sharded compilation.

    train_step(state, frozen, batch) -> (state, metrics)
1. rng = fold_in(state.rng, state.step); loss and gradients of `loss_fn(params, frozen, batch,
   rng)` wrt params, averaged over `grad_accum` micro-batches (lax.scan, micro-batch i gets
   fold_in(rng, i));
2. global-norm clipping + AdamW (`state.make_optimizer`), EMA of the new params;
3. a non-finite loss or gradient norm leaves the state untouched (`metrics["finite"]` is False;
   the loop stops the run and names the step).
metrics = {"loss", <the task's metrics>, "grad_norm", "lr", "finite", "step"}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from leffa_jax import sharding
from leffa_jax.training.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
LOOP_METRICS = ("loss", "grad_norm", "lr", "finite", "step")


def _accumulated_grads(grad_fn, params, frozen, batch, rng, accum: int):
    """(loss, metrics), grads averaged over `accum` micro-batches of `batch`."""
    if accum == 1:
        return grad_fn(params, frozen, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    (_, aux_shape), _ = jax.eval_shape(grad_fn, params, frozen, first, rng)

    def body(carry, xs):
        grad_sum, loss_sum, aux_sum = carry
        micro_batch, i = xs
        (loss, aux), grads = grad_fn(params, frozen, micro_batch, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss,
                jax.tree.map(jnp.add, aux_sum, aux)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
    (grads, loss, aux), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    scale = lambda x: x / accum  # noqa: E731
    return (scale(loss), jax.tree.map(scale, aux)), jax.tree.map(scale, grads)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, lr_fn: optax.Schedule, *,
                    grad_accum: int = 1, ema_decay: float = 0.9999,
                    ema_warmup: bool = False) -> Callable:
    """train_step(state, frozen, batch) -> (state, metrics); not jitted (see `compile_step`).
    `loss_fn(params, frozen, batch, rng) -> (loss, metrics)` is the task's loss."""
    accum = int(grad_accum)
    ema_decay = float(ema_decay)

    def train_step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = _accumulated_grads(grad_fn, state.params, frozen, batch, rng, accum)
        clash = set(aux) & set(LOOP_METRICS)
        if clash:
            raise ValueError(f"task metrics {sorted(clash)} clash with the loop's {LOOP_METRICS}")
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay
        if ema_warmup:
            decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree.map(lambda e, p: e * decay + (1 - decay) * p, state.ema, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(state.step + 1, params, opt_state, ema, state.rng)
        # a non-finite step changes nothing (the host stops the run and names the step)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "lr": lr_fn(state.step),
                   "finite": finite, "step": state.step}
        return new, metrics

    return train_step


def compile_step(train_step: Callable, state, frozen, batch, mesh,
                 rules: Sequence[sharding.Rule] = sharding.DEFAULT_RULES,
                 min_shard_size: int = 2 ** 14):
    """jit with explicit in/out shardings (state and frozen params by `rules`, the batch over
    ('data', 'fsdp')) and the state donated. Arguments may be arrays or ShapeDtypeStructs.
    Returns (step_fn, (state shardings, frozen shardings, batch shardings))."""
    state_sh = sharding.tree_shardings(jax.eval_shape(lambda: state), mesh, rules,
                                       min_shard_size=min_shard_size)
    frozen_sh = sharding.tree_shardings(jax.eval_shape(lambda: frozen), mesh, rules,
                                        min_shard_size=min_shard_size)
    batch_sh = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}
    step = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    return step, (state_sh, frozen_sh, batch_sh)
