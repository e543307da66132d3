"""The train state (float32 masters, AdamW state, EMA, step, RNG) and the optimizer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array           # int32 scalar: optimizer updates done
    params: dict[str, Any]    # {component: nnx.State} of the trainable components, float32
    opt_state: Any
    ema: dict[str, Any]       # exponential moving average of params (same structure)
    rng: jax.Array            # base key; step keys are fold_in(rng, step)


def make_optimizer(train_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """-> (global-norm clipping then AdamW, learning-rate schedule) from `config.train`
    (lr, warmup_steps, decay, b1, b2, eps, weight_decay, grad_clip)."""
    t = train_config
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(lr := lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                    weight_decay=t.weight_decay),
    )
    return tx, lr


LR_DECAYS = ("constant", "cosine", "linear")


def lr_schedule(train_config) -> optax.Schedule:
    """Learning rate per optimizer step: a linear warm-up from 0 over `warmup_steps` (0: none),
    then `decay`: "constant" (lr), "cosine" or "linear" (from lr to 0 at step `steps`)."""
    t = train_config
    warmup, decay = int(t.get("warmup_steps", 0)), t.get("decay", "constant")
    if decay not in LR_DECAYS:
        raise ValueError(f"train.decay must be one of {LR_DECAYS}, got {decay!r}")
    rest = max(int(t.steps) - warmup, 1)
    after = {"constant": lambda: optax.constant_schedule(t.lr),
             "cosine": lambda: optax.cosine_decay_schedule(t.lr, rest),
             "linear": lambda: optax.linear_schedule(t.lr, 0.0, rest)}[decay]()
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warmup), after], [warmup])


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: params as float32 masters, fresh optimizer state, EMA = params."""
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(seed))
