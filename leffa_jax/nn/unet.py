"""The SD-family UNet (SD1.5 / SDXL, inpainting or not) in Flax NNX, NHWC, one class for every role.

Module tree and attribute names mirror diffusers' `UNet2DConditionModel`
(`down_blocks[i].attentions[j].transformer_blocks[k].attn1.to_q`, ...), so a parameter path is the
same string on both sides (see `leffa_jax/weights/`). Shared conv blocks live in nn/blocks.py, the
transformer blocks in nn/transformer.py, the one attention module in nn/attention.py.

Roles and extension points (all call arguments, never hidden state):
- plain UNet:  `unet(x, t, context)` -> eps; SDXL adds `text_embeds=, time_ids=` (text_time).
- reference:   `unet(x, t, collect_features=True)` records the post-`norm1` hidden states of every
               transformer block in call order (down, mid, up); `conv_norm_out`/`conv_out` are not
               applied (their weights exist, unused, as in the official checkpoint).
- generative:  `unet(x, t, reference_features=feats)`: self-attention of block i uses keys/values
               from `concat([norm1(h), feats[i]], tokens)`, queries from its own tokens only
               (Leffa, Magic Clothing); with `config.decoupled_reference` the features go through
               attn1's to_k_ip/to_v_ip instead, times `reference_scale`.
- image prompt: `unet(x, t, context, image_prompt_tokens=tok, image_prompt_scale=s)` with
               `config.image_prompt_dim` set: every attn2 adds s * attn(q, to_k_ip(tok),
               to_v_ip(tok)) to its text attention (IP-Adapter, StoryMaker).
- probes:      `probe=` (Leffa flow: reference keys of attn1) and `attention_probe=` (every
               softmax, self and cross; nn/transformer.py) -> `UNetOutput.probes` /
               `.attention_probes`. LoRA: nn/lora.py, applied to the built module.

Cross-attention: with a `context` (B, L, cross_attention_dim) it is real cross-attention; with
none it follows the Leffa rule `h = h + norm2(h)` (the official code replaces it by a processor
that returns its input; `attn2` weights exist but are dead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.nn.blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    timestep_embedding,
)
from leffa_jax.nn.config import UNetConfig
from leffa_jax.nn.layers import Conv2d, GroupNorm
from leffa_jax.nn.transformer import (
    AttentionProbe,
    ForwardPass,
    Probe,
    ProbeSite,
    Transformer2DModel,
    maybe_remat,
)

__all__ = ["UNet", "UNetOutput", "Probe", "AttentionProbe", "ProbeSite"]


class UNetOutput(NamedTuple):
    sample: jax.Array | None              # (B, H, W, out_channels); None in the reference role
    features: tuple[jax.Array, ...]       # reference role: post-norm1 states (B, N_i, C_i)
    probes: dict[int, Any]                # generative role with a probe: {layer index: value}
    attention_probes: dict[tuple[int, str], Any] = {}  # {(layer index, branch): value}


def _transformer(cfg: UNetConfig, dim: int, heads: int, num_layers: int, first_index: int,
                 rngs: nnx.Rngs) -> Transformer2DModel:
    return Transformer2DModel(dim, heads, num_layers, cfg.cross_attention_dim, cfg.norm_num_groups,
                              cfg.use_linear_projection, first_index,
                              ip_dim=cfg.image_prompt_dim,
                              decoupled_reference=cfg.decoupled_reference, rngs=rngs)


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
            _transformer(cfg, cout, cfg.num_heads[i], t, first_index + j * t, rngs)
            for j in range(n)]) if with_attn else None
        self.downsamplers = (nnx.List([Downsample2D(cout, cfg.downsample_padding, rngs=rngs)])
                             if add_downsample else None)
        self.num_layers = n * t if with_attn else 0

    def __call__(self, x, temb, fp: ForwardPass):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = maybe_remat(resnet, fp, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, fp)
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
        self.attentions = nnx.List([_transformer(cfg, c, cfg.num_heads[-1], t, first_index, rngs)])
        self.num_layers = t

    def __call__(self, x, temb, fp: ForwardPass):
        x = maybe_remat(self.resnets[0], fp, x, temb)
        x = self.attentions[0](x, fp)
        return maybe_remat(self.resnets[1], fp, x, temb)


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
            _transformer(cfg, cout, heads, t, first_index + j * t, rngs)
            for j in range(n)]) if with_attn else None
        self.upsamplers = nnx.List([Upsample2D(cout, rngs=rngs)]) if add_upsample else None
        self.num_layers = n * t if with_attn else 0

    def __call__(self, x, skips, temb, fp: ForwardPass, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            x = maybe_remat(resnet, fp, jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, fp)
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
                 attention_kernel: str = "xla", remat: bool = False,
                 image_prompt_tokens: jax.Array | None = None,
                 image_prompt_scale: float | jax.Array = 1.0,
                 reference_scale: float | jax.Array = 1.0,
                 attention_probe: AttentionProbe | None = None,
                 text_embeds: jax.Array | None = None,
                 time_ids: jax.Array | None = None) -> UNetOutput:
        """sample (B, H, W, in_channels) in the compute dtype; timesteps scalar or (B,);
        context (B, L, cross_attention_dim) or None (the Leffa rule);
        reference_features: one (B, N_i, C_i) per transformer layer in call order (generative
        role; appended to attn1's keys/values, or through attn1's to_k_ip/to_v_ip times
        `reference_scale` when built with `decoupled_reference`);
        probe: the Leffa flow probe (see nn/transformer.py); attention_probe: a probe at every
        softmax, self and cross; remat: gradient checkpointing;
        image_prompt_tokens (B, L_ip, image_prompt_dim): decoupled cross-attention in every attn2,
        added times `image_prompt_scale`, scalar or (B,) (needs a context and
        `config.image_prompt_dim`);
        text_embeds (B, D_pooled), time_ids (B, n): SDXL's text_time added conditioning."""
        self._check_inputs(sample, context, reference_features, image_prompt_tokens, text_embeds,
                           time_ids)
        temb = self._embed_time(sample, timesteps, text_embeds, time_ids)
        fp = ForwardPass(context=context, reference_features=reference_features,
                         collect_features=collect_features, kernel=attention_kernel, probe=probe,
                         remat=remat, image_prompt_tokens=image_prompt_tokens,
                         image_prompt_scale=image_prompt_scale, reference_scale=reference_scale,
                         attention_probe=attention_probe)
        x = self.conv_in(sample)
        skips = [x]
        for blk in self.down_blocks:
            x, s = blk(x, temb, fp)
            skips += s
        x = self.mid_block(x, temb, fp)
        for blk in self.up_blocks:
            mine = skips[-len(blk.resnets):]
            del skips[-len(blk.resnets):]
            size = skips[-1].shape[1:3] if skips else None
            x = blk(x, mine, temb, fp, upsample_size=size)
        if collect_features:
            return UNetOutput(None, tuple(fp.features), fp.probes, fp.attention_probes)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return UNetOutput(x, tuple(fp.features), fp.probes, fp.attention_probes)

    def _check_inputs(self, sample, context, reference_features, image_prompt_tokens,
                      text_embeds, time_ids) -> None:
        cfg = self.config
        if (text_embeds is None) != (time_ids is None):
            raise ValueError("SDXL added conditioning needs both text_embeds and time_ids")
        if text_embeds is not None and (self.add_embedding is None
                                        or cfg.addition_time_embed_dim is None):
            raise ValueError("text_embeds/time_ids given, but this UNet has no text_time "
                             "add_embedding (addition_embed_type is not 'text_time')")
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet input must be NHWC with {cfg.in_channels} channels, got shape "
                             f"{sample.shape}")
        if reference_features is not None and len(reference_features) != self.num_transformer_layers:
            raise ValueError(f"reference_features has {len(reference_features)} entries; this UNet "
                             f"has {self.num_transformer_layers} transformer layers")
        if image_prompt_tokens is not None:
            if cfg.image_prompt_dim is None:
                raise ValueError("image_prompt_tokens given, but this UNet has no to_k_ip/to_v_ip "
                                 "(build it with UNetConfig.image_prompt_dim)")
            if context is None:
                raise ValueError("image_prompt_tokens need a text context (cross-attention is "
                                 "the identity without one)")
            if image_prompt_tokens.ndim != 3 or image_prompt_tokens.shape[-1] != cfg.image_prompt_dim:
                raise ValueError(f"image_prompt_tokens must be (B, L, {cfg.image_prompt_dim}), got "
                                 f"{image_prompt_tokens.shape}")

    def _embed_time(self, sample, timesteps, text_embeds, time_ids) -> jax.Array:
        """Time embedding (B, time_embed_dim) [+ SDXL's add_embedding(text_embeds, time_ids)]."""
        cfg = self.config
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.astype(sample.dtype))
        if text_embeds is None:
            return temb
        time_embeds = timestep_embedding(jnp.reshape(time_ids, (-1,)), cfg.addition_time_embed_dim,
                                         cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)
        added = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        return temb + self.add_embedding(added.astype(temb.dtype))
