"""Face-diffuser's (FastComposer's) post-fusion MLP: a subject's image embedding fused into the
text-encoder output at the token of its noun.

Module tree and names mirror the official `FaceDiffuserPostfuseModule` (`model.py:23-42`,
`163-188`), so a parameter path equals the checkpoint key up to the leaf rule (Linear `weight`
-> `kernel` transposed, LayerNorm `weight` -> `scale`):

    mlp1: LayerNorm(2D) -> fc1 Linear(2D, D) -> GELU (exact erf) -> fc2 Linear(D, D), no residual
    mlp2: LayerNorm(D)  -> fc1 Linear(D, D)  -> GELU -> fc2 Linear(D, D), + its input
    fused(t, o) = layer_norm(mlp2(mlp1([t; o]) + t))        LayerNorm eps 1e-5

`PostfuseModule(text (B, L, D), objects (B, K, D), token_idx (B, K) int, token_valid (B, K) bool)`
replaces text[b, token_idx[b, k]] by fused(text[b, token_idx[b, k]], objects[b, k]) for every
valid k (the official boolean scatter, with explicit indices); other tokens pass unchanged.
"""

from __future__ import annotations

import json
import os
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.config import ConfigError
from leffa_jax.nn.layers import LayerNorm, Linear

_gelu = partial(jax.nn.gelu, approximate=False)


class MLP(nnx.Module):
    """LayerNorm -> fc1 -> GELU -> fc2 (+ input when `use_residual`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True, *,
                 rngs: nnx.Rngs):
        if use_residual and in_dim != out_dim:
            raise ConfigError(f"postfuse MLP: a residual needs in_dim == out_dim, got {in_dim}, "
                              f"{out_dim}")
        self.use_residual = use_residual
        self.layernorm = LayerNorm(in_dim)
        self.fc1 = Linear(in_dim, hidden_dim, rngs=rngs)
        self.fc2 = Linear(hidden_dim, out_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.fc2(_gelu(self.fc1(self.layernorm(x))))
        return y + x if self.use_residual else y


class PostfuseModule(nnx.Module):
    """`FaceDiffuserPostfuseModule(embed_dim)`; see the module docstring."""

    def __init__(self, embed_dim: int, *, rngs: nnx.Rngs):
        self.embed_dim = embed_dim
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False, rngs=rngs)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True, rngs=rngs)
        self.layer_norm = LayerNorm(embed_dim)

    def fuse(self, text: jax.Array, objects: jax.Array) -> jax.Array:
        """(..., D) text tokens and (..., D) object embeddings -> (..., D) fused tokens."""
        u = self.mlp1(jnp.concatenate([text, objects], axis=-1)) + text
        return self.layer_norm(self.mlp2(u))

    def __call__(self, text: jax.Array, objects: jax.Array, token_idx: jax.Array,
                 token_valid: jax.Array) -> jax.Array:
        b, length, d = text.shape
        if objects.shape[:2] != token_idx.shape or objects.shape[-1] != d:
            raise ValueError(f"postfuse: objects {objects.shape} must be (B, K, {d}) with "
                             f"token_idx {token_idx.shape} (B, K)")
        idx = token_idx.astype(jnp.int32)
        picked = jnp.take_along_axis(text, idx[..., None], axis=1)           # (B, K, D)
        fused = self.fuse(picked, objects.astype(text.dtype))                  # (B, K, D)
        onehot = (idx[..., None] == jnp.arange(length)) & token_valid[..., None].astype(bool)
        placed = jnp.einsum("bkl,bkd->bld", onehot.astype(fused.dtype), fused,
                            precision=jax.lax.Precision.HIGHEST)
        return jnp.where(jnp.any(onehot, axis=1)[..., None], placed, text)


def postfuse_config(folder: str | os.PathLike) -> int:
    """embed_dim from `folder/config.json` ({"embed_dim": D}); ConfigError naming the file."""
    path = os.path.join(os.fspath(folder), "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        dim = config["embed_dim"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: cannot read the postfuse config ({e!r}); it must hold "
                          '{"embed_dim": D} (768 for the released Face-diffuser SDM)') from None
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"{path}: embed_dim must be a positive integer, got {dim!r}")
    return dim


def build_postfuse(config_folder: str, *, rngs: nnx.Rngs) -> PostfuseModule:
    """The component-kind builder (leffa_jax.components KINDS["postfuse"])."""
    return PostfuseModule(postfuse_config(config_folder), rngs=rngs)


def torch_default_init(module: nnx.Module, key: jax.Array) -> None:
    """Re-draw every Linear of `module` in place as PyTorch's `nn.Linear` default: weight
    kaiming_uniform(a=sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias the same bound;
    LayerNorms keep scale 1, bias 0. What the official `FaceDiffuserPostfuseModule` starts
    training from when no checkpoint is given."""
    linears = [m for _, m in nnx.iter_graph(module) if isinstance(m, Linear)]
    keys = jax.random.split(key, 2 * len(linears))
    for i, linear in enumerate(linears):
        fan_in, fan_out = linear.kernel.shape
        bound = 1.0 / fan_in ** 0.5
        linear.kernel.value = jax.random.uniform(keys[2 * i], (fan_in, fan_out), jnp.float32,
                                                 -bound, bound)
        if linear.bias is not None:
            linear.bias.value = jax.random.uniform(keys[2 * i + 1], (fan_out,), jnp.float32,
                                                   -bound, bound)


def write_postfuse_config(folder: str, embed_dim: int) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "FaceDiffuserPostfuseModule", "embed_dim": int(embed_dim)}, f,
                  indent=2)
