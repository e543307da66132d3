"""Defaults of the settings the generic training loop reads (ml_collections; a system's config
starts from `base_config()` and adds its own `model`, `data`, ... sections), and `validate`,
run before anything is built or written."""

from __future__ import annotations

import math

import ml_collections

from leffa_jax.cli import UsageError


class ConfigError(UsageError):
    """A config value the run cannot use; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """train / mesh / sharding / checkpoint / log settings with the paper recipe's defaults."""
    c = ml_collections.ConfigDict()
    c.task = ""                       # name of the Task (leffa_jax.systems.TASKS)
    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000            # 0 is refused unless export_at_step_0 (see `validate`)
    c.train.export_at_step_0 = False  # with steps=0: export the initial model on purpose
    c.train.batch_size = 256          # global (all devices, all micro-batches)
    c.train.lr = 1e-5
    c.train.warmup_steps = 0          # linear warm-up from 0 (0: none)
    c.train.decay = "constant"        # after warm-up: constant | cosine | linear (to 0 at steps)
    c.train.loss_weighting = "uniform"  # epsilon MSE per timestep: uniform | truncated_snr |
    #                                     min_snr (objectives.epsilon_loss_weights)
    c.train.snr_gamma = 5.0           # min_snr's gamma
    c.train.b1, c.train.b2, c.train.eps = 0.9, 0.999, 1e-8
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0           # global-norm clipping
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = False        # decay min(ema_decay, (1 + step) / (10 + step))
    c.train.export_ema = True         # export the EMA (else the raw params) at the end
    c.train.dtype = "bfloat16"        # compute dtype the task casts to; parameters stay float32
    c.train.remat = True              # gradient checkpointing (read by the task's model calls)
    c.train.grad_accum = 1            # micro-batches per optimizer step
    c.train.seed = 0

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1})
    c.sharding_rules = ()             # ((regex, spec), ...); () -> sharding.DEFAULT_RULES
    c.sharding_min_size = 2 ** 14     # smaller tensors stay replicated
    c.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 3, "use_async": True})
    c.log = ml_collections.ConfigDict({"every": 50, "image_every": 1000, "sample_steps": 20,
                                       "progress_bar": True, "print_every_log": False})
    return c


def validate(config) -> None:
    """ConfigError naming the key and the fix for settings the loop cannot run with. train.steps=0
    would export the untrained initial model, so it needs train.export_at_step_0=True."""
    train = config.train
    steps = int(train.steps)
    if steps < 0:
        raise ConfigError(f"train.steps must be >= 0, got {steps}")
    if steps == 0 and not train.get("export_at_step_0", False):
        raise ConfigError(
            "train.steps=0 would only export the untrained initial model: set "
            "--config.train.steps to the number of steps to train, or add "
            "--config.train.export_at_step_0=True to export the initial model on purpose")
    for key in ("batch_size", "grad_accum"):
        if int(train[key]) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {train[key]}")
    if int(train.batch_size) % int(train.grad_accum):
        raise ConfigError(f"train.batch_size {train.batch_size} is not a multiple of "
                          f"train.grad_accum {train.grad_accum}")
    for key in ("lr", "weight_decay", "grad_clip", "ema_decay"):
        value = float(train[key])
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"train.{key} must be a finite number >= 0, got {train[key]}")
    if not float(train.ema_decay) <= 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1], got {train.ema_decay}")
    weightings = ("uniform", "truncated_snr", "min_snr")  # objectives.LOSS_WEIGHTINGS
    if train.get("loss_weighting", "uniform") not in weightings:
        raise ConfigError(f"train.loss_weighting must be one of {weightings}, got "
                          f"{train.loss_weighting!r}")
    gamma = float(train.get("snr_gamma", 5.0))
    if not (math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"train.snr_gamma must be a finite number > 0, got {train.snr_gamma}")
    decays = ("constant", "cosine", "linear")  # training/state.py LR_DECAYS
    if train.get("decay", "constant") not in decays:
        raise ConfigError(f"train.decay must be one of {decays}, got {train.decay!r}")
