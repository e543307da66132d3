"""Perceiver resamplers of IP-Adapter-Plus / FaceID-PlusV2 (open_flamingo style), as StoryMaker
uses them (official `ip_adapter/resampler.py`, `ip_adapter/ip_adapter_faceid.py` L26-60).

Module tree and names mirror the official state dicts (`layers.{i}.0.to_kv`, `layers.{i}.1.3`,
`latents`, ...), so a parameter path equals the checkpoint key up to the leaf rule (Linear
`weight` (O, I) -> `kernel` (I, O), LayerNorm `weight` -> `scale`, `latents` as is).

PerceiverAttention(x (B, N1, dim) features, latents (B, N2, dim)):
    x, l = norm1(x), norm2(latents)                      LayerNorm eps 1e-5
    q = l @ Wq;  k, v = split(concat([x, l], tokens) @ Wkv)    bias-free, inner = heads*dim_head
    w = softmax((q dh^-1/4) (k dh^-1/4)^T)  (float32)    out = to_out(w v)   (bias-free)
FeedForward: LayerNorm -> Linear(dim, mult*dim, no bias) -> GELU (erf) -> Linear(no bias).
Layer stack: latents = attn(x, latents) + latents; latents = ff(latents) + latents.

- `FacePerceiverResampler(latents, x)`: x = proj_in(x); layers; norm_out(proj_out(latents)).
  Its queries come from the caller (StoryMaker: the 4 ArcFace id tokens); the caller adds the
  shortcut `latents + ...`.
- `Resampler(x)`: the same with learned queries `latents` (1, num_queries, dim), no shortcut.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.layers import Identity, LayerNorm, Linear

_gelu = partial(jax.nn.gelu, approximate=False)


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """Widths of one resampler (the official code hard-codes them; the fixtures use tiny ones).
    num_queries: learned queries of `Resampler` (unused by `FacePerceiverResampler`)."""

    dim: int
    depth: int
    dim_head: int
    heads: int
    embedding_dim: int
    output_dim: int
    ff_mult: int = 4
    num_queries: int = 16

    @classmethod
    def from_dict(cls, d: dict) -> ResamplerConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in fields})


class PerceiverAttention(nnx.Module):
    def __init__(self, dim: int, dim_head: int, heads: int, *, rngs: nnx.Rngs):
        inner = dim_head * heads
        self.dim_head, self.heads = dim_head, heads
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.to_q = Linear(dim, inner, use_bias=False, rngs=rngs)
        self.to_kv = Linear(dim, 2 * inner, use_bias=False, rngs=rngs)
        self.to_out = Linear(inner, dim, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        """x (B, N1, dim), latents (B, N2, dim) -> (B, N2, dim)."""
        x, latents = self.norm1(x), self.norm2(latents)
        b, n2, _ = latents.shape
        q = self.to_q(latents)
        k, v = jnp.split(self.to_kv(jnp.concatenate([x, latents], axis=1)), 2, axis=-1)
        heads = lambda t: t.reshape(b, t.shape[1], self.heads, self.dim_head)
        scale = jnp.asarray(self.dim_head ** -0.25, q.dtype)
        w = jnp.einsum("bqhd,bkhd->bhqk", heads(q) * scale, heads(k) * scale,
                       preferred_element_type=jnp.float32)
        w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", w, heads(v)).reshape(b, n2, -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int, rngs: nnx.Rngs) -> nnx.List:
    """[LayerNorm, Linear(dim, mult*dim), GELU slot, Linear(mult*dim, dim)] (keys .0 .1 .3)."""
    return nnx.List([LayerNorm(dim), Linear(dim, dim * mult, use_bias=False, rngs=rngs),
                     Identity(), Linear(dim * mult, dim, use_bias=False, rngs=rngs)])


def _ff(ff: nnx.List, x: jax.Array) -> jax.Array:
    return ff[3](_gelu(ff[1](ff[0](x))))


class _Perceiver(nnx.Module):
    """proj_in, `depth` x [attention, feed-forward], proj_out, norm_out."""

    def __init__(self, cfg: ResamplerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.proj_in = Linear(cfg.embedding_dim, cfg.dim, rngs=rngs)
        self.layers = nnx.List([
            nnx.List([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads, rngs=rngs),
                      feed_forward(cfg.dim, cfg.ff_mult, rngs)])
            for _ in range(cfg.depth)])
        self.proj_out = Linear(cfg.dim, cfg.output_dim, rngs=rngs)
        self.norm_out = LayerNorm(cfg.output_dim)

    def _run(self, latents: jax.Array, x: jax.Array) -> jax.Array:
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = _ff(ff, latents) + latents
        return self.norm_out(self.proj_out(latents))


class FacePerceiverResampler(_Perceiver):
    """FaceID-PlusV2's perceiver: caller-given queries (B, N, dim) over features x (B, L,
    embedding_dim) -> (B, N, output_dim) (the shortcut is the caller's)."""

    def __call__(self, latents: jax.Array, x: jax.Array) -> jax.Array:
        return self._run(latents, x)


class Resampler(_Perceiver):
    """IP-Adapter-Plus resampler: learned queries `latents` (1, num_queries, dim) over features
    x (B, L, embedding_dim) -> (B, num_queries, output_dim)."""

    def __init__(self, cfg: ResamplerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.latents = nnx.Param(jax.random.normal(rngs.params(), (1, cfg.num_queries, cfg.dim),
                                                   jnp.float32) / cfg.dim ** 0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        latents = jnp.broadcast_to(self.latents[...].astype(x.dtype),
                                   (x.shape[0], *self.latents.shape[1:]))
        return self._run(latents, x)
