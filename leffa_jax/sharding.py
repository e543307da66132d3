"""Device mesh, parameter partitioning rules (as data) and sharding helpers.

Mesh axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data parallelism
with parameters and optimiser state sharded: ZeRO-3 style). Room for more axes: rules name axes,
and an axis missing from the mesh is treated as size 1.

Rules are an ordered list of (regex over the parameter path, spec); the first match wins. A spec is
a tuple with one entry per array dimension (an axis name, a tuple of names, or None), or "auto":
shard the largest dimension divisible by the `fsdp` size, when the array has at least
`min_shard_size` elements; smaller arrays are replicated. A named dimension that does not divide
falls back to "auto". Paths are dotted strings such as
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.kernel`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

Rule = tuple[str, Any]
# Default: every large tensor FSDP-sharded on its largest divisible dimension (for conv kernels
# (kh, kw, I, O) and linear kernels (I, O) that is an output/input channel axis).
DEFAULT_RULES: tuple[Rule, ...] = (
    (r".*", "auto"),
)
REPLICATED_RULES: tuple[Rule, ...] = ((r".*", ()),)


def make_mesh(shape: Sequence[int] | dict[str, int], devices=None) -> Mesh:
    """Mesh over `devices` (default all) with axes ('data', 'fsdp'); one entry may be -1."""
    if isinstance(shape, dict):
        shape = [shape.get(a, 1) for a in AXES]
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(AXES, shape, strict=True))} needs "
                         f"{int(np.prod(shape))} devices, {len(devices)} available")
    arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def path_str(path) -> str:
    """jax key path -> dotted string."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return ".".join(out)


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape.get(a, 1) for a in names if a is not None]))


def spec_for(path: str, shape: tuple[int, ...], rules: Sequence[Rule], mesh: Mesh,
             min_shard_size: int = 2 ** 14) -> P:
    match = next(((pat, sp) for pat, sp in rules if re.fullmatch(pat, path)), None)
    if match is None:
        return P()
    pattern, spec = match
    if spec != "auto":
        spec = tuple(spec)
        if len(spec) == 0:
            return P()
        if len(spec) != len(shape):
            raise ValueError(f"sharding rule {pattern!r} gives {spec} for {path} of rank {len(shape)}")
        if all(ax is None or d % _axis_size(mesh, ax) == 0 for ax, d in zip(spec, shape, strict=True)):
            return P(*spec)
    n = mesh.shape.get("fsdp", 1)
    if n == 1 or int(np.prod(shape)) < min_shard_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[dim] % n == 0:
            return P(*[("fsdp" if i == dim else None) for i in range(len(shape))])
    return P()


def tree_specs(tree, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, prefix: str = "",
               min_shard_size: int = 2 ** 14):
    """A pytree of PartitionSpecs matching `tree` (arrays or ShapeDtypeStructs)."""
    def one(path, x):
        name = prefix + path_str(path)
        return spec_for(name, tuple(np.shape(x)), rules, mesh, min_shard_size)
    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, prefix: str = "",
                   min_shard_size: int = 2 ** 14):
    specs = tree_specs(tree, mesh, rules, prefix, min_shard_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 4, axis: int = 0) -> NamedSharding:
    """Dimension `axis` (the batch; default the leading one) over ('data', 'fsdp'), the rest
    replicated."""
    return NamedSharding(mesh, P(*([None] * axis), BATCH_AXES, *([None] * (ndim - axis - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def per_device_bytes(tree) -> int:
    """Bytes held on the first device by the shards of a pytree of jax.Arrays."""
    dev = jax.devices()[0]
    total = 0
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            if s.device == dev:
                total += s.data.nbytes
    return total
