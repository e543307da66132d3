"""The Task contract: everything system-specific the generic training loop needs.

A system subclasses `Task` and is selected by name (`config.task`, see `leffa_jax.systems`).
The loop (`training/loop.py`) calls, in this order:

    task.validate()                              # config errors, before anything is built
    shapes = task.batch_shapes()                 # {key: per-example shape}: what a batch holds
    dataset = task.dataset("train")              # iterable of host batches {key: (B, ...)};
                                                 # its iterator has get_state()/set_state()
    model = task.init_model()                    # the nnx model the run starts from
    params, frozen = task.prepare(model)         # {component: nnx.State}: trained / frozen
    loss, metrics = task.loss(params, frozen, batch, rng)   # traced, differentiated wrt params
    row = task.image_row(model, params, frozen, host_batch)  # PNG-grid panels, HWC uint8
    task.export(model, params, frozen, out_dir)  # the trained model, in a loadable form

`params` are float32 masters; `loss` merges them with the graph definitions kept by `prepare`
(`self.modules(...)`) and casts to the compute dtype itself, so gradients land on the masters.
`metrics` is a flat {name: scalar} dict; the loop logs every entry as `loss/<name>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Params = dict[str, Any]  # {component name: nnx.State}


class Task:
    """Base class of a training task. Subclasses set the class attributes and implement
    `init_model`, `batch_shapes`, `dataset` and `loss`; the rest has working defaults."""

    name: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ()  # model attributes holding parameters
    trainable: ClassVar[tuple[str, ...]] = ()   # the trained subset; the others are frozen
    # `config.train.loss_weighting` values the task's loss reads (objectives.loss_weights)
    loss_weightings: ClassVar[tuple[str, ...]] = ("uniform",)

    def __init__(self, config):
        self.config = config
        self.graphdefs: dict[str, Any] = {}

    # ------------------------------------------------------------------ to implement
    def init_model(self) -> nnx.Module:
        """The model the run starts from (random, or loaded as the config says)."""
        raise NotImplementedError

    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        """{batch key: per-example shape}, e.g. {"image": (H, W, 3)}. The loop keeps only these
        keys of each data batch and checks their shapes."""
        raise NotImplementedError

    def dataset(self, split: str = "train") -> Iterable[dict[str, np.ndarray]]:
        """Host batches of `config.train.batch_size` (per process) examples; `iter(dataset)`
        must give an iterator with `get_state()`/`set_state()` (checkpointed with the state)."""
        raise NotImplementedError

    def loss(self, params: Params, frozen: Params, batch: dict[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """-> (scalar loss, {metric name: scalar}). Pure and traceable; shapes are static."""
        raise NotImplementedError

    # ------------------------------------------------------------------ defaults
    def validate(self) -> None:
        """Raise `training.config.ConfigError` (naming the key and the fix) for a config this task
        cannot run, e.g. a missing data folder; called before anything is built or written, so
        it must be cheap. Default: nothing to check."""

    def prepare(self, model: nnx.Module) -> tuple[Params, Params]:
        """Split `model` into trainable and frozen parameter trees, keeping the graph
        definitions (`self.graphdefs`) for `modules`. Subclasses extend it to derive what the
        loss needs from the model (e.g. the noise schedule)."""
        missing = set(self.trainable) - set(self.components)
        if missing:
            raise ValueError(f"task {self.name!r}: trainable {sorted(missing)} are not components")
        params, frozen = {}, {}
        for name in self.components:
            self.graphdefs[name], state = nnx.split(getattr(model, name))
            (params if name in self.trainable else frozen)[name] = state
        return params, frozen

    def modules(self, trees: Params, dtype=None) -> dict[str, nnx.Module]:
        """{component: module} rebuilt from parameter trees (inside the traced loss), with
        floating leaves cast to `dtype` when given."""
        if dtype is not None:
            trees = cast_floating(trees, dtype)
        return {name: nnx.merge(self.graphdefs[name], tree) for name, tree in trees.items()}

    def image_row(self, model: nnx.Module, params: Params, frozen: Params,
                  host_batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Panels (HWC uint8) of one PNG-grid row for the first example of `host_batch`, made
        with host copies of `params` (usually the EMA). Default: no images."""
        return []

    def load_into(self, model: nnx.Module, params: Params, frozen: Params) -> nnx.Module:
        """Write parameter trees (device or host) into `model`'s components; returns it."""
        for name, tree in {**frozen, **params}.items():
            nnx.update(getattr(model, name), jax.device_get(tree))
        return model

    def export(self, model: nnx.Module, params: Params, frozen: Params, out_dir: str) -> None:
        """Write the trained model to `out_dir`. Default: `model.save_pretrained(out_dir)`."""
        self.load_into(model, params, frozen).save_pretrained(out_dir)


def cast_floating(tree, dtype):
    """Floating leaves of `tree` cast to `dtype`; other leaves unchanged."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
