"""Training checkpoints with Orbax: train state + data-iterator state, async, keep K.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Orbax writes each step into a temporary
folder and renames it when complete, so a run killed (even with SIGKILL) during a save leaves the
previous complete checkpoint as the latest; `restore_latest` only ever sees complete ones.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp


class CheckpointManager:
    def __init__(self, directory: str, *, every: int, keep: int, use_async: bool = True):
        self.every = int(every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=use_async,
            create=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                           item_names=("state", "data"))

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_iter) -> None:
        data_state = data_iter.get_state() if data_iter is not None else {}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(json.loads(json.dumps(data_state, default=_jsonable)))))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, state_like, data_iter):
        """Restore into the structure/shardings of `state_like`; sets the data iterator's state.
        Returns the restored state, or None when there is no checkpoint."""
        step = self._manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        if data_iter is not None and out.data:
            data_iter.set_state(out.data)
        return out.state

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _jsonable(x):
    if isinstance(x, bytes):
        return x.decode("latin-1")
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"data-iterator state holds a {type(x).__name__}, not JSON-serialisable")
