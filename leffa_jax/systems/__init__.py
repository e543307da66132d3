"""Systems: each a composition of the shared parts (models, an eps_fn for sampling, a training
Task). `make_task(config)` builds the training Task that `config.task` names.

    TASKS = {"leffa": "leffa_jax.systems.leffa:LeffaTask"}   # name -> "module:class"

A new system adds its module here and one entry in TASKS (imported only when selected).
"""

from __future__ import annotations

import importlib

TASKS: dict[str, str] = {
    "leffa": "leffa_jax.systems.leffa:LeffaTask",
    "magic_clothing": "leffa_jax.systems.magic_clothing:MagicClothingTask",
    "face_diffuser_sdm": "leffa_jax.systems.face_diffuser:SubjectModelTask",
    "face_diffuser_tdm": "leffa_jax.systems.face_diffuser:TextModelTask",
    "storymaker": "leffa_jax.systems.storymaker_train:StoryMakerTask",
    "autoencoder": "leffa_jax.systems.autoencoder:AutoencoderTask",
}
DEFAULT_TASK = "leffa"  # for configs written before `config.task` existed


def task_class(name: str):
    """The Task class registered under `name` (ConfigError, a ValueError, naming the choices
    otherwise)."""
    from leffa_jax.training.config import ConfigError

    if name not in TASKS:
        raise ConfigError(f"config.task {name!r} is not a registered task: use one of "
                          f"{sorted(TASKS)} (leffa_jax/systems/__init__.py)")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_task(config):
    """The Task for `config.task` (default "leffa"), built from `config`."""
    return task_class(config.get("task") or DEFAULT_TASK)(config)
