"""The training loop, generic over a `Task` (training/task.py): it knows nothing of any system.

    result = train(task, config, workdir)

Set-up: the config checked (`validate`), a ('data', 'fsdp') device mesh (`config.mesh`), the
task's first data batch; only then is anything written (`workdir/config.json`, atomically), so a
bad config or data folder leaves the workdir as it was. The task's model split into trainable
and frozen trees; the train state (float32 masters, AdamW, EMA, RNG) and the frozen params
sharded by `config.sharding_rules` (`leffa_jax/sharding.py`), the batch over ('data', 'fsdp');
one jitted step with the state donated (`training/step.py`). Then, per step: the next host batch
(only the task's `batch_shapes` keys), the step, the metrics of the previous step checked one
step late (so the host never waits on the device), TensorBoard / progress bar / MFU
(`leffa_jax/observe.py`), an Orbax checkpoint of the state and the data-iterator state every
`config.checkpoint.every` steps (`leffa_jax/checkpoint.py`), a PNG grid every
`config.log.image_every` steps. A run restarted in the same workdir resumes from the latest
complete checkpoint and continues bit-identically, even after a SIGKILL. At `config.train.steps`
the task exports the EMA (or the params) to `workdir/export`.

`hooks` are called as hook(event, step) with event "step" (step `step` was dispatched) or
"save" (the checkpoint of step `step` started writing): fault injection for tests, profilers.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence

import jax
import numpy as np

from leffa_jax import observe, sharding
from leffa_jax.checkpoint import CheckpointManager
from leffa_jax.training import config as config_lib
from leffa_jax.training.config import ConfigError
from leffa_jax.training.state import init_state, make_optimizer
from leffa_jax.training.step import compile_step, make_train_step
from leffa_jax.training.task import Task

Hook = Callable[[str, int], None]
MetricsCallback = Callable[[int, dict], None]


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class RunResult:
    step: int               # steps done when the run stopped
    metrics: list[dict]     # host metrics of the steps run in this call, in order
    workdir: str


def select_batch(batch: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The task's keys of a data batch, checked against the per-example `shapes`."""
    missing = [k for k in shapes if k not in batch]
    if missing:
        raise KeyError(f"data batch lacks {missing}; it has {sorted(batch)}")
    for k, shape in shapes.items():
        if tuple(np.shape(batch[k])[1:]) != tuple(shape):
            raise ValueError(f"batch[{k!r}] has shape {np.shape(batch[k])}; the task expects "
                             f"(batch, {', '.join(map(str, shape))})")
    return {k: batch[k] for k in shapes}


def check_metrics(metrics, index, callback: MetricsCallback | None = None) -> dict:
    """Host copy of one step's metrics; raises NonFiniteLossError naming the step and the batch
    sample indices (`index`, or None) when that step was not finite."""
    m = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v))
         for k, v in jax.device_get(metrics).items()}
    if not m["finite"]:
        idx = None if index is None else np.asarray(index).tolist()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {int(m['step']) + 1} (loss {m['loss']}, "
            f"grad norm {m['grad_norm']}); batch sample indices {idx}. The state of that step was "
            "not applied and no checkpoint was written from it; check the data of those samples "
            "or lower the learning rate, then resume from the last checkpoint.")
    if callback is not None:
        callback(int(m["step"]) + 1, m)
    return m


def validate(task: Task, config) -> None:
    """ConfigError (naming the key and the fix) for a config the run cannot use: the loop's
    settings (`training.config.validate`), then the task's (`Task.validate`). Cheap; nothing is
    built or written."""
    config_lib.validate(config)
    weighting = config.train.get("loss_weighting", "uniform")
    if weighting not in task.loss_weightings:
        raise config_lib.ConfigError(
            f"train.loss_weighting {weighting!r}: the {task.name} task's loss takes only "
            f"{task.loss_weightings}; set one of those")
    task.validate()


def _check_batch_size(config, mesh) -> None:
    batch, accum = int(config.train.batch_size), int(config.train.grad_accum)
    if batch % (mesh.size * accum) and batch % mesh.size:
        raise ConfigError(f"train.batch_size {batch} must divide over the {mesh.size} devices "
                          "of the mesh: change --config.train.batch_size or config.mesh")


def write_config(config, workdir: str) -> None:
    """`workdir/config.json` (process 0), replaced whole or not at all: the JSON is made first,
    then written to a temporary file that is renamed over the old one (a single object write on
    gs:// and other remote paths)."""
    text = config.to_json_best_effort(indent=2)
    if "://" in workdir:
        from etils import epath

        if jax.process_index() == 0:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            (epath.Path(workdir) / "config.json").write_text(text)
        return
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() != 0:
        return
    handle, temp = tempfile.mkstemp(prefix=".config.json.", dir=workdir)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(temp, os.path.join(workdir, "config.json"))
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def _sharded_state(task: Task, config, mesh, example):
    """(jitted step, train state, frozen params, state shardings), placed on `mesh`."""
    model = task.init_model()
    params, frozen = task.prepare(model)
    tx, lr_fn = make_optimizer(config.train)
    train_step = make_train_step(task.loss, tx, lr_fn, grad_accum=config.train.grad_accum,
                                 ema_decay=config.train.ema_decay,
                                 ema_warmup=config.train.ema_warmup)
    state = init_state(params, tx, config.train.seed)
    del params
    rules = tuple(config.get("sharding_rules") or sharding.DEFAULT_RULES)
    step_fn, (state_sh, frozen_sh, _) = compile_step(
        train_step, state, frozen, example, mesh, rules, config.get("sharding_min_size", 2 ** 14))
    return (model, step_fn, jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh),
            state_sh)


def train(task: Task, config, workdir: str, *, max_steps: int | None = None,
          callback: MetricsCallback | None = None, hooks: Sequence[Hook] = ()) -> RunResult:
    """Run (or resume) training of `task` in `workdir`. `max_steps` stops after that many steps
    of this call; `callback(step, metrics)` sees every checked step's host metrics. The config
    and the data are checked (ConfigError, the data's errors) before anything is written."""
    from leffa_jax.data import pipeline as data_pipeline

    validate(task, config)
    mesh = sharding.make_mesh([config.mesh.data, config.mesh.fsdp])
    _check_batch_size(config, mesh)
    shapes = task.batch_shapes()
    dataset = task.dataset("train")
    example = data_pipeline.shard_batch(select_batch(next(iter(dataset)), shapes), mesh)
    write_config(config, workdir)
    model, step_fn, state, frozen, state_sh = _sharded_state(task, config, mesh, example)
    data_iter = iter(dataset)
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"),
                                every=config.checkpoint.every, keep=config.checkpoint.keep,
                                use_async=config.checkpoint.use_async)
    restored = manager.restore_latest(state, data_iter)
    if restored is not None:
        state = jax.device_put(restored, state_sh)
    start, total = int(jax.device_get(state.step)), int(config.train.steps)
    end = min(total, start + max_steps) if max_steps is not None else total
    history: list[dict] = []
    if end > start:
        compiled = step_fn.lower(state, frozen, example).compile()  # once: FLOPs and steps
        logger = observe.Logger(workdir, config, flops=observe.step_flops(compiled),
                                start=start, total=total, enabled=jax.process_index() == 0)
        steps = _StepRunner(task, model, config, mesh, shapes, compiled, manager, logger,
                            callback, tuple(hooks))
        try:
            state, history = steps.run(state, frozen, data_iter, start, end)
        finally:
            manager.wait()
            logger.close()
    step = int(jax.device_get(state.step))
    if step >= total and jax.process_index() == 0:
        task.export(model, state.ema if config.train.export_ema else state.params, frozen,
                    os.path.join(workdir, "export"))
    return RunResult(step, history, workdir)


@dataclasses.dataclass
class _StepRunner:
    """The per-step part of `train` (everything is set up; this only steps, checks, logs,
    saves and draws)."""
    task: Task
    model: object
    config: object
    mesh: object
    shapes: dict
    step_fn: Callable
    manager: CheckpointManager
    logger: observe.Logger
    callback: MetricsCallback | None
    hooks: tuple[Hook, ...]

    def _checked(self, pending, history: list) -> None:
        history.append(check_metrics(*pending, self.callback))
        self.logger.log(history[-1])

    def run(self, state, frozen, data_iter, start: int, end: int):
        from leffa_jax.data import pipeline as data_pipeline

        history: list[dict] = []
        pending = None  # (metrics, batch indices) of the previous step: checked one step late
        image_every = int(self.config.log.image_every)
        for step in range(start + 1, end + 1):
            host_batch = next(data_iter)
            batch = data_pipeline.shard_batch(select_batch(host_batch, self.shapes), self.mesh)
            state, metrics = self.step_fn(state, frozen, batch)
            for hook in self.hooks:
                hook("step", step)
            if pending is not None:
                self._checked(pending, history)
            pending = (metrics, host_batch.get("index"))
            if self.manager.should_save(step) or step == end:
                self._checked(pending, history)
                pending = None
                self.manager.save(step, state, data_iter)
                for hook in self.hooks:
                    hook("save", step)
            if image_every and step % image_every == 0:
                self._images(step, state, frozen, host_batch)
        if pending is not None:
            self._checked(pending, history)
        return state, history

    def _images(self, step: int, state, frozen, host_batch: dict) -> None:
        # host copies on every process (a collective under multi-host); process 0 draws
        ema, frozen_host = observe.host_params(state.ema), observe.host_params(frozen)
        if self.logger.enabled:
            row = self.task.image_row(self.model, ema, frozen_host, host_batch)
            self.logger.images(step, row)
