"""Between NNX modules and flat parameter dicts {'down_blocks.0.resnets.0.conv1.kernel': array},
with strict key and shape checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from leffa_jax import components as components_lib
from leffa_jax.components import Component
from leffa_jax.nn.abstract import abstract_init
from leffa_jax.weights.tensor_io import CheckpointError


def abstract_module(component: Component | str, config_dir: str,
                    in_channels: int | None = None):
    """The component's module with abstract (shape-only) parameters: nothing is allocated.
    `component`: a Component, a kind name or a Leffa component name (see `as_component`)."""
    from flax import nnx

    component = components_lib.as_component(component, in_channels)
    return abstract_init(lambda: components_lib.build(component, config_dir,
                                                       rngs=nnx.Rngs(0)))


def expected_params(component: Component | str, config_dir: str, in_channels: int | None = None
                    ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Flax path -> (shape, dtype) of a component built from its base config (no allocation)."""
    from flax import nnx

    module = abstract_module(component, config_dir, in_channels)
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(map(str, p)): (tuple(v.shape), v.dtype) for p, v in flat}


def check_keys(got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]],
               where: str) -> None:
    """Strict check: missing, unexpected and mis-shaped keys are one error listing them."""
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = sorted(k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
    if not (missing or unexpected or misshaped):
        return

    def show(keys, fmt=str, limit=12):
        body = "\n    ".join(fmt(k) for k in keys[:limit])
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return body + more

    parts = [f"{where} does not fit the model:"]
    if missing:
        parts.append(f"  {len(missing)} missing:\n    {show(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected:\n    {show(unexpected)}")
    if misshaped:
        parts.append(f"  {len(misshaped)} with wrong shape (checkpoint vs model):\n    "
                     + show(misshaped, lambda k: f"{k}: {tuple(got[k])} vs {tuple(want[k])}"))
    parts.append("  Is the checkpoint of another architecture, or the base config folder the "
                 "wrong one (SD1.5 vs SDXL)?")
    raise CheckpointError("\n".join(parts))


def flat_to_nested(flat: Mapping[str, Any]) -> dict:
    """{'a.0.b': x} -> {'a': {0: {'b': x}}} (integer keys for list indices, as NNX uses)."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        parts = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return root


def nested_to_flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Inverse of `flat_to_nested` (keys become strings)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(nested_to_flat(value, name + "."))
        else:
            out[name] = value
    return out


def module_from_flat(component: Component | str, config_dir: str, flat: Mapping[str, Any],
                     in_channels: int | None = None):
    """The NNX module of `component` holding exactly the given {flax path: array}."""
    component = components_lib.as_component(component, in_channels)
    return module_with_params(abstract_module(component, config_dir), flat,
                              f"[{component.name}] parameters")


def module_with_params(module, flat: Mapping[str, Any], where: str):
    """A module of `module`'s structure (abstract or not; it is left unchanged) holding exactly
    `flat` {flax path: array}: every variable, in its shape (`check_keys`, naming `where`)."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(module)
    want = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    check_keys({k: tuple(v.shape) for k, v in flat.items()}, want, where)
    nnx.replace_by_pure_dict(state, flat_to_nested({k: jnp.asarray(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def module_to_flat(module) -> dict[str, np.ndarray]:
    """{flax path: numpy array} of a module's parameters."""
    from flax import nnx

    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
