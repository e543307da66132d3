"""Training configs (ml_collections, big_vision style): one `get_config()` per file, with the
command line, hardware and expected result in its docstring. They live in the package, so they
import after `pip install` without `sys.path` edits:

    python -m leffa_jax.train --config leffa_jax/configs/tryon_512.py --workdir DIR
    python -m leffa_jax.train --config tryon_512 --workdir DIR          # by name
    from leffa_jax.configs import get_config; c = get_config("tryon_512")

`--config` also takes the pre-package paths (`configs/tryon_512.py`), see `resolve`.
"""

from __future__ import annotations

import importlib
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
_PREFIX = "leffa_jax.configs."


def names() -> list[str]:
    """The packaged configs' names (e.g. "tryon_512"); `*common.py` files hold shared defaults."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and f != "__init__.py" and not f.endswith("common.py"))


def get_config(name: str):
    """`get_config()` of the packaged config `name` (e.g. "tryon_512")."""
    return importlib.import_module(_PREFIX + name).get_config()


def resolve(spec: str) -> str:
    """A `--config` value -> the config file to load (a trailing `:args` is kept). An existing
    file is used as given; otherwise a packaged config is found from its name: `NAME`,
    `leffa_jax.configs.NAME`, or a missing `configs/NAME.py` / `leffa_jax/configs/NAME.py`
    (the pre-package location, or the repository path from another directory)."""
    path, sep, args = spec.partition(":")
    if os.path.exists(path):
        return spec
    name = path[len(_PREFIX):] if path.startswith(_PREFIX) else path
    folder, base = os.path.split(name)
    if folder and os.path.basename(os.path.normpath(folder)) != "configs":
        return spec  # someone's own (missing) file: let the loader report it
    base = base[:-3] if base.endswith(".py") else base
    if base in names():
        return os.path.join(CONFIG_DIR, base + ".py") + sep + args
    return spec


def resolve_argv(argv: list[str]) -> list[str]:
    """argv with the value of `--config VALUE` / `--config=VALUE` passed through `resolve`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out
