"""Multi-head attention kernels, chosen by name.

Tokens are (B, N, heads * d). Scale 1/sqrt(d). Softmax statistics in float32 for every kernel.

Kernels (`ATTENTION_KERNELS`):
- "xla":     einsum -> float32 softmax -> einsum. Reference semantics, runs everywhere.
- "dot_product": `jax.nn.dot_product_attention` with the implementation left to XLA.
- "cudnn":   `jax.nn.dot_product_attention(implementation="cudnn")` (fused flash kernel on
             NVIDIA GPUs, bf16/fp16 only).
- "chunked": "xla" over blocks of `QUERY_CHUNK` queries in a `lax.map` (each query row's softmax
             still over all keys: the same sums, results equal to "xla"): score memory
             (B, h, chunk, Nk) instead of (B, h, Nq, Nk), and on XLA:CPU, which fuses no
             attention, faster at thousands of tokens (BENCHMARKS.md, Face-diffuser).

`Attention` is the one attention module of the transformer blocks: reference tokens appended to
the keys/values (Leffa, Magic Clothing) and decoupled image-prompt attention (IP-Adapter,
StoryMaker) are inputs of its single code path, never special kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.layers import Linear


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


QUERY_CHUNK = 512  # queries per block of the "chunked" kernel (the largest divisor of Nq <= this)


def query_chunk(num_queries: int, limit: int = QUERY_CHUNK) -> int:
    """The block size of the "chunked" kernel: the largest divisor of `num_queries` <= limit."""
    for size in range(min(limit, num_queries), 0, -1):
        if num_queries % size == 0:
            return size
    return num_queries


def _chunked_attention(q, k, v):
    """`_xla_attention` over query blocks of `query_chunk(Nq)` rows (exact: each row's softmax
    is over all keys)."""
    b, nq, h, d = q.shape
    chunk = query_chunk(nq)
    if chunk == nq or chunk < 64:  # one block, or blocks too small to pay for the loop
        return _xla_attention(q, k, v)
    blocks = q.reshape(b, nq // chunk, chunk, h, d).swapaxes(0, 1)
    out = jax.lax.map(lambda block: _xla_attention(block, k, v), blocks)
    return out.swapaxes(0, 1).reshape(b, nq, h, v.shape[-1])


ATTENTION_KERNELS: dict[str, Callable] = {
    "xla": _xla_attention,
    "dot_product": _dot_product_attention,
    "cudnn": lambda q, k, v: _dot_product_attention(q, k, v, implementation="cudnn"),
    "chunked": _chunked_attention,
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


def heads_first(x: jax.Array, heads: int) -> jax.Array:
    """(B, N, heads*d) -> (B, heads, N, d): the layout probes receive."""
    return split_heads(x, heads).transpose(0, 2, 1, 3)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, kernel: str = "xla",
                   remat: bool = False) -> jax.Array:
    """`multihead_attention`, under gradient checkpointing when `remat`."""
    if remat:
        return jax.checkpoint(multihead_attention, static_argnums=(3, 4))(q, k, v, heads, kernel)
    return multihead_attention(q, k, v, heads, kernel)


# probe(branch, q, k) -> None, called once per softmax of an `Attention` call with per-head,
# unscaled projections q (B, heads, N, d) and k (B, heads, M, d). branch "main": the keys of
# `context` (or of the queries' own tokens) followed by `extra_tokens`; "decoupled": the keys of
# `ip_tokens` through `to_k_ip`.
AttentionHook = Callable[[str, jax.Array, jax.Array], None]


class Attention(nnx.Module):
    """diffusers `Attention` (to_q/to_k/to_v without bias, `to_out.0` with bias), one code path
    for every use of it in a transformer block:

        out = to_out.0( attn(q, K(src), V(src)) + ip_scale * attn(q, K_ip(ip), V_ip(ip)) )
        q = to_q(x);  src = concat([context or x, extra_tokens], tokens)

    - `extra_tokens` (B, M, C): reference features appended to the keys/values and projected by
      the same to_k/to_v (Leffa's generative UNet, Magic Clothing's garment fusion).
    - `ip_tokens` (B, L, ip_dim): decoupled attention through `to_k_ip`/`to_v_ip` (bias-free
      Linear(ip_dim, dim), built only when `ip_dim` is given), IP-Adapter / StoryMaker.
    LoRA, when attached (nn/lora.py), lives inside the Linear layers and so applies to every path.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, *,
                 ip_dim: int | None = None, rngs: nnx.Rngs):
        kv_dim = context_dim or dim
        self.heads = heads
        self.to_q = Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_k = Linear(kv_dim, dim, use_bias=False, rngs=rngs)
        self.to_v = Linear(kv_dim, dim, use_bias=False, rngs=rngs)
        self.to_out = nnx.List([Linear(dim, dim, rngs=rngs)])
        self.to_k_ip = Linear(ip_dim, dim, use_bias=False, rngs=rngs) if ip_dim else None
        self.to_v_ip = Linear(ip_dim, dim, use_bias=False, rngs=rngs) if ip_dim else None

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
                 extra_tokens: jax.Array | None = None, ip_tokens: jax.Array | None = None,
                 ip_scale: float | jax.Array = 1.0, kernel: str = "xla", remat: bool = False,
                 probe: AttentionHook | None = None) -> jax.Array:
        """x (B, N, dim) queries; context (B, L, context_dim) or None (self-attention);
        extra_tokens (B, M, dim); ip_tokens (B, L_ip, ip_dim); ip_scale scalar or (B,)
        (e.g. per guidance branch). -> (B, N, dim)."""
        source = x if context is None else context.astype(x.dtype)
        if extra_tokens is not None:
            source = jnp.concatenate([source, extra_tokens.astype(x.dtype)], axis=1)
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        if probe is not None:
            probe("main", heads_first(q, self.heads), heads_first(k, self.heads))
        out = attention_core(q, k, v, self.heads, kernel, remat)
        if ip_tokens is not None:
            if self.to_k_ip is None:
                raise ValueError("decoupled tokens given, but this attention has no to_k_ip/"
                                 "to_v_ip (UNetConfig.image_prompt_dim / decoupled_reference)")
            ip_tokens = ip_tokens.astype(x.dtype)
            k_ip, v_ip = self.to_k_ip(ip_tokens), self.to_v_ip(ip_tokens)
            if probe is not None:
                probe("decoupled", heads_first(q, self.heads), heads_first(k_ip, self.heads))
            out_ip = attention_core(q, k_ip, v_ip, self.heads, kernel, remat)
            scale = jnp.asarray(ip_scale, out.dtype)
            out = out + (scale[:, None, None] if scale.ndim == 1 else scale) * out_ip
        return self.to_out[0](out)
