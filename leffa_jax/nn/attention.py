"""Multi-head attention kernels, chosen by name.

Tokens are (B, N, heads * d). Scale 1/sqrt(d). Softmax statistics in float32 for every kernel.

Kernels (`ATTENTION_KERNELS`):
- "xla":     einsum -> float32 softmax -> einsum. Reference semantics, runs everywhere.
- "dot_product": `jax.nn.dot_product_attention` with the implementation left to XLA.
- "cudnn":   `jax.nn.dot_product_attention(implementation="cudnn")` (fused flash kernel on
             NVIDIA GPUs, bf16/fp16 only).

The generative UNet's reference concatenation is expressed in the INPUT (keys/values =
[own tokens; reference tokens]), never as a special kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """(B, N, heads*d) -> (B, N, heads, d)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads)


def _xla_attention(q, k, v):
    """q (B, Nq, h, d), k/v (B, Nk, h, d) -> (B, Nq, h, d)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _dot_product_attention(q, k, v, implementation=None):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


ATTENTION_KERNELS: dict[str, Callable] = {
    "xla": _xla_attention,
    "dot_product": _dot_product_attention,
    "cudnn": lambda q, k, v: _dot_product_attention(q, k, v, implementation="cudnn"),
}


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                        kernel: str = "xla") -> jax.Array:
    """q (B, Nq, heads*d), k/v (B, Nk, heads*d) -> (B, Nq, heads*d)."""
    try:
        fn = ATTENTION_KERNELS[kernel]
    except KeyError:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of "
                         f"{sorted(ATTENTION_KERNELS)}") from None
    b, nq, c = q.shape
    out = fn(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return out.reshape(b, nq, c)
