"""The SD-family UNet (SD1.5 / SDXL inpainting) in Flax NNX, NHWC, one class for both Leffa roles.

Module tree and attribute names mirror diffusers' `UNet2DConditionModel`
(`down_blocks[i].attentions[j].transformer_blocks[k].attn1.to_q`, ...), so a parameter path is the
same string on both sides (see `leffa_jax/convert.py`).

Roles (chosen by call arguments, never by hidden state):
- plain UNet:  `unet(x, t, context)` -> eps.
- reference:   `unet(x, t, collect_features=True)` records the post-`norm1` hidden states of every
               transformer block in call order (down, mid, up); `conv_norm_out`/`conv_out` are not
               applied (their weights exist, unused, as in the official checkpoint).
- generative:  `unet(x, t, reference_features=feats)`: self-attention of block i uses keys/values
               from `concat([norm1(h), feats[i]], tokens)`, queries from its own tokens only.

Cross-attention: with a `context` (B, L, cross_attention_dim) it is real cross-attention; with
none it follows the Leffa rule `h = h + norm2(h)` (the official code replaces it by a processor
that returns its input; `attn2` weights exist but are dead).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.attention import multihead_attention, split_heads
from leffa_jax.nn.config import UNetConfig
from leffa_jax.nn.layers import Conv2d, GroupNorm, Identity, LayerNorm, Linear, resize_nearest_torch

# probe(layer_index, q, k_ref, (h, w)) -> pytree | None, called in every generative self-attention
# layer: q (B, heads, N, d) of the generated tokens, k_ref (B, heads, M, d) of the reference
# tokens (unscaled projections). The Leffa loss reads attention through it (objectives.py).
Probe = Callable[[int, jax.Array, jax.Array, tuple[int, int]], Any]


class UNetOutput(NamedTuple):
    sample: jax.Array | None              # (B, H, W, out_channels); None in the reference role
    features: tuple[jax.Array, ...]       # reference role: post-norm1 states (B, N_i, C_i)
    probes: dict[int, Any]                # generative role with a probe: {layer index: value}


@dataclasses.dataclass
class _Pass:
    """Per-call bookkeeping while tracing (Python only: every array flows through arguments)."""
    context: jax.Array | None
    reference_features: Sequence[jax.Array] | None
    collect_features: bool
    kernel: str
    probe: Probe | None
    remat: bool = False  # gradient checkpointing of resnets, attention cores and feed-forwards
    features: list = dataclasses.field(default_factory=list)
    probes: dict = dataclasses.field(default_factory=dict)


def _call(module, p: _Pass, *args):
    """module(*args), under gradient checkpointing when the pass asks for it."""
    if p.remat:
        return nnx.remat(lambda m, *a: m(*a))(module, *args)
    return module(*args)


def _attention(q, k, v, heads: int, p: _Pass):
    if p.remat:
        return jax.checkpoint(multihead_attention, static_argnums=(3, 4))(q, k, v, heads, p.kernel)
    return multihead_attention(q, k, v, heads, p.kernel)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """diffusers `get_timestep_embedding`: (B,) -> (B, dim), float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_features: int, dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, dim, rngs=rngs)
        self.linear_2 = Linear(dim, dim, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, temb_channels: int | None, groups: int, eps: float, *,
                 rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, groups, eps)
        self.conv1 = Conv2d(cin, cout, 3, rngs=rngs)
        self.time_emb_proj = Linear(temb_channels, cout, rngs=rngs) if temb_channels else None
        self.norm2 = GroupNorm(cout, groups, eps)
        self.conv2 = Conv2d(cout, cout, 3, rngs=rngs)
        self.conv_shortcut = Conv2d(cin, cout, 1, padding=0, rngs=rngs) if cin != cout else None

    def __call__(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """diffusers `Attention` with q/k/v without bias and `to_out.0` with bias."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, *, rngs: nnx.Rngs):
        kv_dim = context_dim or dim
        self.heads = heads
        self.to_q = Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_k = Linear(kv_dim, dim, use_bias=False, rngs=rngs)
        self.to_v = Linear(kv_dim, dim, use_bias=False, rngs=rngs)
        self.to_out = nnx.List([Linear(dim, dim, rngs=rngs)])

    def __call__(self, x, kv, kernel: str = "xla"):
        """x (B, N, C) queries; kv (B, M, C') keys/values source."""
        out = multihead_attention(self.to_q(x), self.to_k(kv), self.to_v(kv), self.heads, kernel)
        return self.to_out[0](out)


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
    def __init__(self, dim: int, heads: int, context_dim: int, layer_index: int, *,
                 rngs: nnx.Rngs):
        self.layer_index = layer_index  # position in call order over the whole UNet
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, rngs=rngs)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, rngs=rngs)

    def __call__(self, h, hw: tuple[int, int], p: _Pass):
        n = self.norm1(h)
        if p.collect_features:
            p.features.append(n)
        if p.reference_features is not None:
            ref = p.reference_features[self.layer_index].astype(n.dtype)
            attn = self.attn1
            q = attn.to_q(n)
            kv = jnp.concatenate([n, ref], axis=1)
            k, v = attn.to_k(kv), attn.to_v(kv)
            if p.probe is not None:
                heads = lambda x: split_heads(x, attn.heads).transpose(0, 2, 1, 3)
                out = p.probe(self.layer_index, heads(q), heads(k[:, n.shape[1]:]), hw)
                if out is not None:
                    p.probes[self.layer_index] = out
            a = attn.to_out[0](_attention(q, k, v, attn.heads, p))
        else:
            attn1 = self.attn1
            a = attn1.to_out[0](_attention(attn1.to_q(n), attn1.to_k(n), attn1.to_v(n),
                                           attn1.heads, p))
        h = h + a
        n2 = self.norm2(h)
        if p.context is None:
            h = h + n2  # Leffa: cross-attention replaced by identity
        else:
            c = p.context.astype(n2.dtype)
            a2 = self.attn2
            h = h + a2.to_out[0](_attention(a2.to_q(n2), a2.to_k(c), a2.to_v(c), a2.heads, p))
        return h + _call(self.ff, p, self.norm3(h))


class Transformer2DModel(nnx.Module):
    def __init__(self, dim: int, heads: int, num_layers: int, context_dim: int, groups: int,
                 linear_proj: bool, first_index: int, *, rngs: nnx.Rngs):
        self.norm = GroupNorm(dim, groups, 1e-6)
        make_proj = ((lambda: Linear(dim, dim, rngs=rngs)) if linear_proj
                     else (lambda: Conv2d(dim, dim, 1, padding=0, rngs=rngs)))
        self.proj_in = make_proj()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(dim, heads, context_dim, first_index + i, rngs=rngs)
            for i in range(num_layers)])
        self.proj_out = make_proj()

    def __call__(self, x, p: _Pass):
        b, hh, ww, c = x.shape
        h = self.proj_in(self.norm(x)).reshape(b, hh * ww, c)  # 1x1 conv == linear per token
        for blk in self.transformer_blocks:
            h = blk(h, (hh, ww), p)
        return self.proj_out(h.reshape(b, hh, ww, c)) + x


class Downsample2D(nnx.Module):
    def __init__(self, c: int, padding: int, *, rngs: nnx.Rngs):
        pad = ((padding, padding),) * 2 if padding else ((0, 1), (0, 1))  # diffusers pads (0,1,0,1)
        self.conv = Conv2d(c, c, 3, stride=2, padding=pad, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.conv = Conv2d(c, c, 3, rngs=rngs)

    def __call__(self, x, size: tuple[int, int] | None = None):
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(resize_nearest_torch(x, size))


class DownBlock(nnx.Module):
    """DownBlock2D, or CrossAttnDownBlock2D when `attentions` is built."""

    def __init__(self, cfg: UNetConfig, i: int, cin: int, cout: int, with_attn: bool,
                 add_downsample: bool, first_index: int, *, rngs: nnx.Rngs):
        n = cfg.layers_per_block[i]
        self.resnets = nnx.List([
            ResnetBlock2D(cin if j == 0 else cout, cout, cfg.time_embed_dim, cfg.norm_num_groups,
                          cfg.norm_eps, rngs=rngs) for j in range(n)])
        t = cfg.transformer_layers_per_block[i]
        self.attentions = nnx.List([
            Transformer2DModel(cout, cfg.num_heads[i], t, cfg.cross_attention_dim,
                               cfg.norm_num_groups, cfg.use_linear_projection,
                               first_index + j * t, rngs=rngs)
            for j in range(n)]) if with_attn else None
        self.downsamplers = (nnx.List([Downsample2D(cout, cfg.downsample_padding, rngs=rngs)])
                             if add_downsample else None)
        self.num_layers = n * t if with_attn else 0

    def __call__(self, x, temb, p: _Pass):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = _call(resnet, p, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, p)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, cfg: UNetConfig, first_index: int, *, rngs: nnx.Rngs):
        c = cfg.block_out_channels[-1]
        t = cfg.transformer_layers_per_block[-1]
        mk = lambda: ResnetBlock2D(c, c, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps,
                                   rngs=rngs)
        self.resnets = nnx.List([mk(), mk()])
        self.attentions = nnx.List([Transformer2DModel(
            c, cfg.num_heads[-1], t, cfg.cross_attention_dim, cfg.norm_num_groups,
            cfg.use_linear_projection, first_index, rngs=rngs)])
        self.num_layers = t

    def __call__(self, x, temb, p: _Pass):
        x = _call(self.resnets[0], p, x, temb)
        x = self.attentions[0](x, p)
        return _call(self.resnets[1], p, x, temb)


class UpBlock(nnx.Module):
    """UpBlock2D, or CrossAttnUpBlock2D when `attentions` is built."""

    def __init__(self, cfg: UNetConfig, i: int, prev_out: int, cout: int, cin: int,
                 with_attn: bool, add_upsample: bool, first_index: int, *, rngs: nnx.Rngs):
        rev = len(cfg.block_out_channels) - 1 - i
        n = cfg.layers_per_block[rev] + 1
        t = cfg.transformer_layers_per_block[rev]
        heads = cfg.num_heads[rev]
        self.resnets = nnx.List([
            ResnetBlock2D((prev_out if j == 0 else cout) + (cin if j == n - 1 else cout), cout,
                          cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, rngs=rngs)
            for j in range(n)])
        self.attentions = nnx.List([
            Transformer2DModel(cout, heads, t, cfg.cross_attention_dim, cfg.norm_num_groups,
                               cfg.use_linear_projection, first_index + j * t, rngs=rngs)
            for j in range(n)]) if with_attn else None
        self.upsamplers = nnx.List([Upsample2D(cout, rngs=rngs)]) if add_upsample else None
        self.num_layers = n * t if with_attn else 0

    def __call__(self, x, skips, temb, p: _Pass, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            x = _call(resnet, p, jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, p)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet(nnx.Module):
    """UNet2DConditionModel (SD1.5 / SDXL families), NHWC."""

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config
        boc = cfg.block_out_channels
        c0 = boc[0]
        self.conv_in = Conv2d(cfg.in_channels, c0, 3, rngs=rngs)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, rngs=rngs)
        self.add_embedding = (
            TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim,
                              rngs=rngs)
            if cfg.projection_class_embeddings_input_dim else None)  # SDXL, dead in Leffa
        index = 0
        down, out = [], c0
        for i, kind in enumerate(cfg.down_block_types):
            cin, out = out, boc[i]
            blk = DownBlock(cfg, i, cin, out, kind == "CrossAttnDownBlock2D", i < len(boc) - 1,
                            index, rngs=rngs)
            index += blk.num_layers
            down.append(blk)
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlock(cfg, index, rngs=rngs)
        index += self.mid_block.num_layers
        rboc = list(reversed(boc))
        up, out = [], rboc[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, out = out, rboc[i]
            cin = rboc[min(i + 1, len(boc) - 1)]
            blk = UpBlock(cfg, i, prev, out, cin, kind == "CrossAttnUpBlock2D", i < len(boc) - 1,
                          index, rngs=rngs)
            index += blk.num_layers
            up.append(blk)
        self.up_blocks = nnx.List(up)
        self.num_transformer_layers = index
        self.conv_norm_out = GroupNorm(c0, cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = Conv2d(c0, cfg.out_channels, 3, rngs=rngs)

    def layer_resolutions(self, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """(h, w) of every transformer layer's token grid, in call order, for a latent size."""
        h, w = latent_hw
        sizes = [(h, w)]
        for _ in range(len(self.config.block_out_channels) - 1):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # 3x3 conv, stride 2, pad 1
            sizes.append((h, w))
        res = []
        for i, blk in enumerate(self.down_blocks):
            res += [sizes[i]] * blk.num_layers
        res += [sizes[-1]] * self.mid_block.num_layers
        for i, blk in enumerate(self.up_blocks):
            res += [sizes[len(sizes) - 1 - i]] * blk.num_layers
        return res

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float,
                 context: jax.Array | None = None, *,
                 reference_features: Sequence[jax.Array] | None = None,
                 collect_features: bool = False, probe: Probe | None = None,
                 attention_kernel: str = "xla", remat: bool = False) -> UNetOutput:
        """sample (B, H, W, in_channels) in the compute dtype; timesteps scalar or (B,);
        context (B, L, cross_attention_dim) or None; reference_features: one (B, N_i, C_i) per
        transformer layer in call order (generative role); remat: gradient checkpointing."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet input must be NHWC with {cfg.in_channels} channels, got shape "
                             f"{sample.shape}")
        if reference_features is not None and len(reference_features) != self.num_transformer_layers:
            raise ValueError(f"reference_features has {len(reference_features)} entries; this UNet "
                             f"has {self.num_transformer_layers} transformer layers")
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.astype(sample.dtype))
        p = _Pass(context, reference_features, collect_features, attention_kernel, probe, remat)

        x = self.conv_in(sample)
        skips = [x]
        for blk in self.down_blocks:
            x, s = blk(x, temb, p)
            skips += s
        x = self.mid_block(x, temb, p)
        for blk in self.up_blocks:
            mine = skips[-len(blk.resnets):]
            del skips[-len(blk.resnets):]
            size = skips[-1].shape[1:3] if skips else None
            x = blk(x, mine, temb, p, upsample_size=size)
        if collect_features:
            return UNetOutput(None, tuple(p.features), p.probes)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return UNetOutput(x, tuple(p.features), p.probes)
