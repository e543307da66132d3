"""Leaf rules: how one PyTorch tensor name and layout maps to one Flax parameter, and back.

The NNX module trees mirror the reference libraries, so a torch key and a Flax path are the same
string up to the last part; a rule renames that leaf and transposes the array. Each component
kind (`leffa_jax.components.KINDS`) names its pair of rules. The diffusers rules (UNet, VAE):
    Conv2d  weight (O, I, kh, kw)  <->  kernel (kh, kw, I, O)
    Linear  weight (O, I)          <->  kernel (I, O)
    norms   weight (C,)            <->  scale (C,)
    bias                           <->  bias
Transposes are exact and dtypes are kept, so torch -> Flax -> torch is bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from leffa_jax.weights.tensor_io import CheckpointError

# (name, array) -> (name, array): torch key -> Flax path, or Flax path -> torch key.
LeafRule = Callable[[str, np.ndarray], tuple[str, np.ndarray]]


def torch_to_flax_leaf(key: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """diffusers rule: torch key + tensor -> Flax path + array (layout only; dtype kept)."""
    base, leaf = key.rsplit(".", 1)
    if leaf == "bias":
        return key, array
    if leaf != "weight":
        raise CheckpointError(f"unexpected tensor {key!r}: only .weight/.bias leaves are known")
    if array.ndim == 4:
        return f"{base}.kernel", array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return f"{base}.kernel", array.T
    if array.ndim == 1:
        return f"{base}.scale", array
    raise CheckpointError(f"tensor {key!r} has unsupported rank {array.ndim} "
                          f"(shape {array.shape})")


def flax_to_torch_leaf(path: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """diffusers rule, inverse of `torch_to_flax_leaf`."""
    base, leaf = path.rsplit(".", 1)
    if leaf == "bias":
        return path, array
    if leaf == "scale":
        return f"{base}.weight", array
    if leaf == "kernel":
        if array.ndim == 4:
            return f"{base}.weight", array.transpose(3, 2, 0, 1)
        if array.ndim == 2:
            return f"{base}.weight", array.T
    raise CheckpointError(f"unexpected Flax parameter {path!r} with shape {array.shape}")


def apply_to_shape(rule: LeafRule, name: str, shape: tuple[int, ...]
                   ) -> tuple[str, tuple[int, ...]]:
    """A rule on a shape alone (no data read): for strict checks and for laying out files."""
    new_name, array = rule(name, np.broadcast_to(np.zeros((), np.uint8), shape))
    return new_name, tuple(array.shape)
