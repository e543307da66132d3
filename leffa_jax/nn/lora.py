"""LoRA on any `Linear` of a built module, selected by parameter path.

    y = x @ W + b + scale * up(down(x)),   scale = lora_scale * (alpha / rank if alpha else 1)

`down` (in, rank) and `up` (rank, out) mirror diffusers' `LoRALinearLayer` (`down` ~ N(0, 1/rank),
`up` zero, so a fresh LoRA changes nothing); they sit at `<linear>.lora_layer.down.kernel` and
`<linear>.lora_layer.up.kernel`, the diffusers `LoRACompatibleLinear` key up to the leaf. With
`alpha=None` the scale is `lora_scale` alone (StoryMaker, diffusers without `network_alpha`); with
an alpha it is PEFT's / diffusers' `alpha / rank` times `lora_scale`.

Training only the LoRA: its factors are `LoRAParam` (a subclass of `nnx.Param`), so
`nnx.split(module, LoRAParam, ...)`, `nnx.Optimizer(module, tx, wrt=LoRAParam)` and
`optax.masked(tx, lora_mask(params))` select them and nothing else.

`merge_lora` folds scale * down @ up into W (inference without the extra matmuls) and keeps the
original W (a `LoRAOriginalKernel`, not a Param), so `unmerge_lora` restores it bit for bit.

Example (StoryMaker: rank-128 LoRA on q/k/v/out of every self- and cross-attention):

    paths = apply_lora(unet, ATTENTION_PROJECTIONS, rank=128, lora_scale=0.8, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.layers import Linear

# q/k/v/out projections of every attn1 and attn2 (not to_k_ip/to_v_ip, not the VAE's attention).
ATTENTION_PROJECTIONS = r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


class LoRAParam(nnx.Param):
    """A LoRA factor: the parameters a LoRA fine-tune trains."""


class LoRAOriginalKernel(nnx.Variable):
    """The base kernel saved by `merge_lora` for an exact `unmerge_lora` (not a parameter)."""


class LoRAFactor(nnx.Module):
    """Bias-free x @ kernel, kernel a `LoRAParam`."""

    def __init__(self, kernel: jax.Array):
        self.kernel = LoRAParam(kernel)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.kernel[...].astype(x.dtype))


class LoRALayer(nnx.Module):
    """scale * up(down(x)): (..., in) -> (..., out). `original_kernel` is set while merged."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, *,
                 rngs: nnx.Rngs):
        down = jax.random.normal(rngs.params(), (in_features, rank), jnp.float32) / rank
        self.down = LoRAFactor(down)
        self.up = LoRAFactor(jnp.zeros((rank, out_features), jnp.float32))
        self.rank = rank
        self.scale = float(scale)
        self.original_kernel = None

    @property
    def merged(self) -> bool:
        return self.original_kernel is not None

    def delta(self) -> jax.Array:
        """scale * down @ up: (in, out), float32."""
        down = self.down.kernel[...].astype(jnp.float32)
        up = self.up.kernel[...].astype(jnp.float32)
        return self.scale * jnp.dot(down, up, precision=jax.lax.Precision.HIGHEST)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.asarray(self.scale, x.dtype) * self.up(self.down(x))


def _matcher(pattern: str | Callable[[str], bool]) -> Callable[[str], bool]:
    if callable(pattern):
        return pattern
    regex = re.compile(pattern)
    return lambda path: regex.search(path) is not None


def linear_layers(module: nnx.Module, pattern: str | Callable[[str], bool] = ""
                  ) -> list[tuple[str, Linear]]:
    """(dotted path, Linear) of every `Linear` in `module` whose path matches `pattern` (a regex,
    `re.search`, or a predicate on the path), in module order."""
    match = _matcher(pattern)
    found = []
    for path, sub in nnx.iter_modules(module):
        dotted = ".".join(map(str, path))
        if isinstance(sub, Linear) and match(dotted):
            found.append((dotted, sub))
    return found


def apply_lora(module: nnx.Module, pattern: str | Callable[[str], bool], rank: int, *,
               lora_scale: float = 1.0, alpha: float | None = None, rngs: nnx.Rngs) -> list[str]:
    """Attach a rank-`rank` LoRA to every matching `Linear` of `module` (in place; before any
    `nnx.split`). Returns the dotted paths of the Linear layers it changed; no match, a non-positive
    rank or a Linear that already has a LoRA is an error."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = linear_layers(module, pattern)
    if not targets:
        raise ValueError(f"no Linear layer matches the LoRA pattern {pattern!r}")
    scale = lora_scale * (alpha / rank if alpha is not None else 1.0)
    for path, linear in targets:
        if linear.lora_layer is not None:
            raise ValueError(f"{path} already has a LoRA")
        fan_in, fan_out = linear.kernel.shape
        linear.lora_layer = nnx.data(LoRALayer(fan_in, fan_out, rank, scale, rngs=rngs))
    return [path for path, _ in targets]


def lora_layers(module: nnx.Module) -> list[tuple[str, LoRALayer]]:
    """(dotted path of the Linear, its LoRALayer) for every LoRA in `module`."""
    return [(path, lin.lora_layer) for path, lin in linear_layers(module)
            if lin.lora_layer is not None]


def set_lora_scale(module: nnx.Module, lora_scale: float, *, alpha: float | None = None) -> None:
    """Set every LoRA's scale to lora_scale * (alpha / rank if alpha else 1) (not while merged)."""
    for path, layer in lora_layers(module):
        if layer.merged:
            raise ValueError(f"{path}: unmerge the LoRA before changing its scale")
        layer.scale = float(lora_scale * (alpha / layer.rank if alpha is not None else 1.0))


def merge_lora(module: nnx.Module) -> int:
    """W <- W + scale * down @ up (in W's dtype) for every unmerged LoRA; the LoRA term is then
    skipped in the forward. Returns the number of layers merged."""
    count = 0
    for _, lin in linear_layers(module):
        layer = lin.lora_layer
        if layer is None or layer.merged:
            continue
        kernel = lin.kernel[...]
        layer.original_kernel = nnx.data(LoRAOriginalKernel(kernel))
        lin.kernel[...] = (kernel.astype(jnp.float32) + layer.delta()).astype(kernel.dtype)
        count += 1
    return count


def unmerge_lora(module: nnx.Module) -> int:
    """Restore every merged Linear's original kernel exactly. Returns the number restored."""
    count = 0
    for _, lin in linear_layers(module):
        layer = lin.lora_layer
        if layer is None or not layer.merged:
            continue
        lin.kernel[...] = layer.original_kernel[...]
        layer.original_kernel = None
        count += 1
    return count


def is_lora_path(path) -> bool:
    """True for a parameter path (tuple of keys or dotted string) inside a LoRA layer."""
    parts = path.split(".") if isinstance(path, str) else [str(getattr(p, "key", p)) for p in path]
    return "lora_layer" in parts


def lora_mask(tree):
    """A pytree of bools over `tree` (an nnx.State of Variables, or a pure dict of arrays such as
    `nnx.to_pure_dict(state)`): True at LoRA factors. For `optax.masked` / `multi_transform`."""
    def leaf(path, x):
        if isinstance(x, nnx.Variable):
            return isinstance(x, LoRAParam)
        return is_lora_path(path)

    return jax.tree_util.tree_map_with_path(leaf, tree,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))
