"""The UNet's spatial transformer (diffusers `Transformer2DModel` / `BasicTransformerBlock`) and the
per-call record its blocks read and write.

Every block runs the same two `Attention` calls (nn/attention.py):

    n  = norm1(h); h = h + attn1(n, extra_tokens=ref_i)            (or ip_tokens=ref_i, decoupled)
    n2 = norm2(h); h = h + attn2(n2, context, ip_tokens=image_prompt, ip_scale=s)
                   (no context: the Leffa rule h = h + n2, attn2's weights unused)
    h  = h + ff(norm3(h))

Probes (both see per-head, unscaled projections q (B, heads, N, d), k (B, heads, M, d)):
- `Probe` probe(layer_index, q, k_ref, (h, w)): the Leffa flow probe, called in every block that
  gets reference features, with the keys of the reference tokens only.
- `AttentionProbe` attention_probe(site, q, k, (h, w)): called at every softmax of every block,
  with all the keys that softmax runs over. `site.branch` names the softmax: "self" (attn1; own
  tokens, then the last `site.num_extra_keys` keys are appended reference tokens), "reference"
  (attn1's decoupled reference attention), "text" (attn2 over the context), "image_prompt"
  (attn2's decoupled image-prompt attention). Non-None results land in
  `UNetOutput.attention_probes[(layer_index, branch)]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.attention import Attention
from leffa_jax.nn.layers import Conv2d, GroupNorm, Identity, LayerNorm, Linear

Probe = Callable[[int, jax.Array, jax.Array, tuple[int, int]], Any]


class ProbeSite(NamedTuple):
    layer_index: int      # transformer layer in call order over the whole UNet
    branch: str           # "self" | "reference" | "text" | "image_prompt"
    num_extra_keys: int   # "self" only: trailing keys that are reference tokens (0 otherwise)


AttentionProbe = Callable[[ProbeSite, jax.Array, jax.Array, tuple[int, int]], Any]

# Attention-level branch names ("main" / "decoupled") -> site branch, per attention of a block.
_BRANCHES = {("attn1", "main"): "self", ("attn1", "decoupled"): "reference",
             ("attn2", "main"): "text", ("attn2", "decoupled"): "image_prompt"}


@dataclasses.dataclass
class ForwardPass:
    """What one UNet call asks of its transformer blocks and what they record. Python-side only
    while tracing: every array arrives through the call's arguments and leaves in UNetOutput."""
    context: jax.Array | None = None
    reference_features: Sequence[jax.Array] | None = None
    collect_features: bool = False
    kernel: str = "xla"
    probe: Probe | None = None
    remat: bool = False  # gradient checkpointing of resnets, attention cores and feed-forwards
    image_prompt_tokens: jax.Array | None = None
    image_prompt_scale: float | jax.Array = 1.0
    reference_scale: float | jax.Array = 1.0
    attention_probe: AttentionProbe | None = None
    features: list = dataclasses.field(default_factory=list)
    probes: dict = dataclasses.field(default_factory=dict)
    attention_probes: dict = dataclasses.field(default_factory=dict)


def maybe_remat(module, fp: ForwardPass, *args):
    """module(*args), under gradient checkpointing when the pass asks for it."""
    if fp.remat:
        return nnx.remat(lambda m, *a: m(*a))(module, *args)
    return module(*args)


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, *, rngs: nnx.Rngs):
        self.proj = Linear(dim, inner * 2, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs):
        self.net = nnx.List([GEGLU(dim, dim * mult, rngs=rngs), Identity(),
                             Linear(dim * mult, dim, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """`ip_dim`: build attn2's to_k_ip/to_v_ip; `decoupled_reference`: build attn1's, and take
    reference features through them instead of appending them to the keys/values."""

    def __init__(self, dim: int, heads: int, context_dim: int, layer_index: int, *,
                 ip_dim: int | None = None, decoupled_reference: bool = False, rngs: nnx.Rngs):
        self.layer_index = layer_index  # position in call order over the whole UNet
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, ip_dim=dim if decoupled_reference else None, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, ip_dim=ip_dim, rngs=rngs)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, rngs=rngs)

    def _hook(self, fp: ForwardPass, attention: str, hw, reference_branch: str | None = None,
              num_reference: int = 0):
        """The Attention-level probe of attn1/attn2 in this call (None when nothing probes).
        `reference_branch`: the Attention branch whose keys end with the `num_reference`
        reference tokens ("main" when appended, "decoupled" when decoupled)."""
        flow = fp.probe if reference_branch is not None else None
        if fp.attention_probe is None and flow is None:
            return None

        def hook(branch, q, k):
            if flow is not None and branch == reference_branch:
                out = flow(self.layer_index, q, k[:, :, k.shape[2] - num_reference:], hw)
                if out is not None:
                    fp.probes[self.layer_index] = out
            if fp.attention_probe is not None:
                site_branch = _BRANCHES[attention, branch]
                extra = num_reference if (site_branch, reference_branch) == ("self", "main") else 0
                out = fp.attention_probe(ProbeSite(self.layer_index, site_branch, extra), q, k, hw)
                if out is not None:
                    fp.attention_probes[self.layer_index, site_branch] = out
        return hook

    def __call__(self, h, hw: tuple[int, int], fp: ForwardPass):
        n = self.norm1(h)
        if fp.collect_features:
            fp.features.append(n)
        options = dict(kernel=fp.kernel, remat=fp.remat)
        if fp.reference_features is None:
            h = h + self.attn1(n, probe=self._hook(fp, "attn1", hw), **options)
        else:
            ref = fp.reference_features[self.layer_index]
            if self.attn1.to_k_ip is not None:  # decoupled reference attention
                probe = self._hook(fp, "attn1", hw, "decoupled", ref.shape[1])
                h = h + self.attn1(n, ip_tokens=ref, ip_scale=fp.reference_scale, probe=probe,
                                   **options)
            else:  # keys/values over [own tokens; reference tokens]
                probe = self._hook(fp, "attn1", hw, "main", ref.shape[1])
                h = h + self.attn1(n, extra_tokens=ref, probe=probe, **options)
        n2 = self.norm2(h)
        if fp.context is None:
            h = h + n2  # Leffa: cross-attention replaced by identity
        else:
            h = h + self.attn2(n2, fp.context, ip_tokens=fp.image_prompt_tokens,
                               ip_scale=fp.image_prompt_scale, probe=self._hook(fp, "attn2", hw),
                               **options)
        return h + maybe_remat(self.ff, fp, self.norm3(h))


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in (1x1 conv or Linear), transformer blocks over the h*w tokens, proj_out,
    residual. (B, h, w, dim) -> (B, h, w, dim)."""

    def __init__(self, dim: int, heads: int, num_layers: int, context_dim: int, groups: int,
                 linear_proj: bool, first_index: int, *, ip_dim: int | None = None,
                 decoupled_reference: bool = False, rngs: nnx.Rngs):
        self.norm = GroupNorm(dim, groups, 1e-6)
        make_proj = ((lambda: Linear(dim, dim, rngs=rngs)) if linear_proj
                     else (lambda: Conv2d(dim, dim, 1, padding=0, rngs=rngs)))
        self.proj_in = make_proj()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(dim, heads, context_dim, first_index + i, ip_dim=ip_dim,
                                  decoupled_reference=decoupled_reference, rngs=rngs)
            for i in range(num_layers)])
        self.proj_out = make_proj()

    def __call__(self, x, fp: ForwardPass):
        b, hh, ww, c = x.shape
        h = self.proj_in(self.norm(x)).reshape(b, hh * ww, c)  # 1x1 conv == linear per token
        for blk in self.transformer_blocks:
            h = blk(h, (hh, ww), fp)
        return self.proj_out(h.reshape(b, hh, ww, c)) + x
