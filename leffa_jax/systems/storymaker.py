"""StoryMaker (RedAIGC/StoryMaker @ a7ce766): SDXL with character tokens, the model half.

Image-prompt tokens (`ImageProjection` = the official `faceid_plus`, ip_adapter_faceid.py
L62-114), per character i of n, batched over B prompts:

    x    = norm(reshape(proj(id_i), [4, D]))                    4 ArcFace id tokens
    face = x + perceiver_resampler(x, CLIP(face crop)_-2)       shortcut "+ x"
    char = resample(CLIP(character crop)_-2)                    16 learned queries
    c_i  = concat([face, char]) + pos_embed[i]                  20 tokens, slot i
    r_i  = norm_out(proj_out(c_i)) + c_i                        zero-init Linear + LN residual
    tokens = [bg_embed (20) | r_0 | r_1 | ...]                  (B, 20 (n + 1), D)

The negative image branch feeds zero CLIP features and zero ids through the same model
(`negative_image_tokens`): not zero tokens; bg_embed stays the learned one.

UNet (`storymaker_unet`): the SDXL UNet built with `image_prompt_dim = D` (to_k_ip/to_v_ip on
every attn2) and a LoRA of `lora_rank` on q/k/v/out of every attn1 and attn2, scaled by
`lora_scale` alone (no alpha). The UNet context is the official `[77 text | 20 bg | 20 per
character]`; `unet_forward` splits it at the literal 77 as the processor does
(attention_processor_faceid.py L375): text through to_k/to_v (+ LoRA), the rest through
to_k_ip/to_v_ip (no LoRA), out = A_txt + ip_scale A_ip, then to_out (+ LoRA).

Processor indices of the released `mask.bin` (`ip_adapter.{idx}.*`) follow diffusers'
`unet.attn_processors` order: down blocks, up blocks, then the mid block, attn1 before attn2
(`processor_paths`); conversion is `leffa_jax.weights.storymaker`.

Loading (`load_storymaker`), prompt/character encoding and sampling (`generate`) reuse the
text-to-image system (`systems/text2image*.py`): SDXL dual encoders (hidden_states[-2], pooled
text_encoder_2 projection), micro-conditioning, the folder's scheduler config (UniPC by default,
as infer.py), CFG with rows [uncond, cond] per sample.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import components as components_lib
from leffa_jax.components import Component
from leffa_jax.imageio import to_uint8
from leffa_jax.nn import lora as lora_lib
from leffa_jax.nn.abstract import abstract_init
from leffa_jax.nn.config import ConfigError, UNetConfig
from leffa_jax.nn.layers import Identity, LayerNorm, Linear
from leffa_jax.nn.resampler import FacePerceiverResampler, Resampler, ResamplerConfig
from leffa_jax.nn.unet import UNet
from leffa_jax.sampling import guidance as guidance_lib
from leffa_jax.sampling.loop import denoise, progress_reporting
from leffa_jax.systems import text2image as t2i
from leffa_jax.systems.text2image_model import TextToImage, TextToImageModel, load_text2image
from leffa_jax.weights.modules import check_keys, flat_to_nested
from leffa_jax.weights.tensor_io import CheckpointError

__all__ = ["TEXT_TOKENS", "AdapterConfig", "ImageProjection", "storymaker_unet",
           "processor_paths", "processor_layout", "adapter_shapes",
           "attach_adapter", "unet_forward", "split_context", "negative_image_tokens",
           "StoryMakerModel", "load_storymaker", "build_storymaker", "init_storymaker", "encode_characters",
           "image_prompt_tokens", "clip_features", "generate", "StoryMakerOutput",
           "is_adapter_path", "adapter_state", "storymaker_eps_fn", "load_image_encoder"]

_F32 = jnp.float32
TEXT_TOKENS = 77  # the processor's hard-coded end_pos (attention_processor_faceid.py L375)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Widths of the StoryMaker adapter (`config/storymaker_adapter.json` of the fixtures has
    this layout; the official code hard-codes the real values, `AdapterConfig.official`)."""

    cross_attention_dim: int          # D: UNet context width
    clip_embeddings_dim: int          # C_v: CLIP vision width (ViT-H: 1280)
    perceiver: ResamplerConfig        # FacePerceiverResampler (face tokens)
    resampler: ResamplerConfig        # Resampler (character tokens)
    id_embeddings_dim: int = 512
    num_id_tokens: int = 4
    bg_tokens: int = 20
    max_characters: int = 3
    lora_rank: int = 128

    @property
    def tokens_per_character(self) -> int:
        return self.num_id_tokens + self.resampler.num_queries

    def num_tokens(self, characters: int) -> int:
        return self.bg_tokens + characters * self.tokens_per_character

    @classmethod
    def official(cls, cross_attention_dim: int = 2048, clip_embeddings_dim: int = 1280,
                 lora_rank: int = 128) -> AdapterConfig:
        """The released model's widths (ip_adapter_faceid.py L79-90, pipeline L147-160)."""
        d, c = cross_attention_dim, clip_embeddings_dim
        return cls(d, c, ResamplerConfig(d, 4, 64, d // 64, c, d, 4),
                   ResamplerConfig(1280, 4, 64, 20, c, d, 4, 16), lora_rank=lora_rank)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig:
        try:
            return cls(
                cross_attention_dim=int(d["cross_attention_dim"]),
                clip_embeddings_dim=int(d["clip_embeddings_dim"]),
                perceiver=ResamplerConfig.from_dict(d["perceiver_resampler"]),
                resampler=ResamplerConfig.from_dict(d["resample"]),
                **{k: int(d[k]) for k in ("id_embeddings_dim", "num_id_tokens", "bg_tokens",
                                          "max_characters", "lora_rank") if k in d})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"StoryMaker adapter config: missing or bad entry {e}; expected "
                              "cross_attention_dim, clip_embeddings_dim, perceiver_resampler "
                              "{dim, depth, dim_head, heads, embedding_dim, output_dim, "
                              "ff_mult}, resample {... num_queries}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"cross_attention_dim": self.cross_attention_dim,
                "clip_embeddings_dim": self.clip_embeddings_dim,
                "perceiver_resampler": dataclasses.asdict(self.perceiver),
                "resample": dataclasses.asdict(self.resampler),
                "id_embeddings_dim": self.id_embeddings_dim, "num_id_tokens": self.num_id_tokens,
                "bg_tokens": self.bg_tokens, "max_characters": self.max_characters,
                "lora_rank": self.lora_rank}

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AdapterConfig:
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the StoryMaker adapter config ({e})") from None


# --------------------------------------------------------------------------------------------
# Image-prompt tokens
# --------------------------------------------------------------------------------------------


class ImageProjection(nnx.Module):
    """The official `faceid_plus` (keys `image_proj_model.*` of mask.bin); see the module
    docstring. proj = [Linear(I, 1024), GELU, Linear(1024, 4 D)]."""

    def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        d = cfg.cross_attention_dim
        self.config = cfg
        self.proj = nnx.List([Linear(cfg.id_embeddings_dim, 1024, rngs=rngs), Identity(),
                              Linear(1024, d * cfg.num_id_tokens, rngs=rngs)])
        self.norm = LayerNorm(d)
        self.pos_embed = nnx.Param(jnp.zeros((cfg.max_characters, cfg.tokens_per_character, d)))
        self.bg_embed = nnx.Param(jnp.zeros((1, cfg.bg_tokens, d)))
        self.proj_out = Linear(d, d, rngs=rngs)  # zero-initialised (official L78)
        self.proj_out.kernel[...] = jnp.zeros((d, d))
        self.norm_out = LayerNorm(d)
        self.perceiver_resampler = FacePerceiverResampler(cfg.perceiver, rngs=rngs)
        self.resample = Resampler(cfg.resampler, rngs=rngs)

    def __call__(self, id_embeds: jax.Array, clip_embeds: jax.Array, face_embeds: jax.Array, *,
                 drop_face: jax.Array | None = None, drop_clip: jax.Array | None = None
                 ) -> jax.Array:
        """id_embeds (B, n, I); clip_embeds / face_embeds (B, n, L, C_v) (CLIP hidden_states[-2]
        of the character crops / aligned faces) -> tokens (B, bg + n T, D) = [bg | char 0 | ...].
        drop_face / drop_clip (B,) bool: training's token-group drops (L99-103), zeroing the
        face / character tokens of every character of that sample."""
        cfg = self.config
        b, n = id_embeds.shape[:2]
        if n < 1 or n > cfg.max_characters:
            raise ValueError(f"{n} characters: this adapter has {cfg.max_characters} character "
                             "slots (pos_embed); give 1 to "
                             f"{cfg.max_characters}")
        if clip_embeds.shape[:2] != (b, n) or face_embeds.shape[:2] != (b, n):
            raise ValueError(f"id {id_embeds.shape}, clip {clip_embeds.shape} and face "
                             f"{face_embeds.shape} features must share (batch, characters)")
        d, dtype = cfg.cross_attention_dim, clip_embeds.dtype
        ids = id_embeds.reshape(b * n, -1).astype(dtype)
        h = self.proj[2](jax.nn.gelu(self.proj[0](ids), approximate=False))
        x = self.norm(h.reshape(b * n, cfg.num_id_tokens, d))
        face = x + self.perceiver_resampler(x, face_embeds.reshape(b * n, *face_embeds.shape[2:]))
        clip = self.resample(clip_embeds.reshape(b * n, *clip_embeds.shape[2:]))
        if drop_face is not None:
            face = face * _keep(drop_face, n, dtype)
        if drop_clip is not None:
            clip = clip * _keep(drop_clip, n, dtype)
        cat = jnp.concatenate([face, clip], axis=1).reshape(b, n, cfg.tokens_per_character, d)
        cat = cat + self.pos_embed[...][:n].astype(dtype)
        res = self.norm_out(self.proj_out(cat)) + cat
        bg = jnp.broadcast_to(self.bg_embed[...].astype(dtype), (b, cfg.bg_tokens, d))
        return jnp.concatenate([bg, res.reshape(b, n * cfg.tokens_per_character, d)], axis=1)


def _keep(drop: jax.Array, n: int, dtype) -> jax.Array:
    """(B,) drop flags -> (B n, 1, 1) multipliers 0 (dropped) / 1."""
    keep = 1.0 - jnp.asarray(drop).astype(dtype)
    return jnp.repeat(keep, n)[:, None, None]


def negative_image_tokens(projection: ImageProjection, id_embeds, clip_embeds, face_embeds):
    """The negative image branch: zero ids and zero CLIP FEATURES through the full projection
    (pipeline L242), same shapes as the positive one."""
    return projection(jnp.zeros_like(id_embeds), jnp.zeros_like(clip_embeds),
                      jnp.zeros_like(face_embeds))


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------


def storymaker_unet(config: UNetConfig, adapter: AdapterConfig, *, lora_scale: float = 1.0,
                    rngs: nnx.Rngs) -> UNet:
    """The SDXL UNet with to_k_ip/to_v_ip on every attn2 (D -> hidden, bias-free) and a
    rank-`adapter.lora_rank` LoRA (scale = lora_scale, no alpha) on q/k/v/out of every attn1
    and attn2 (diffusers' LoRALinearLayer init: down N(0, 1/rank^2), up 0)."""
    if config.cross_attention_dim != adapter.cross_attention_dim:
        raise ConfigError(f"the UNet's cross_attention_dim is {config.cross_attention_dim}, the "
                          f"adapter's tokens are {adapter.cross_attention_dim} wide: adapter and "
                          "base model do not belong together")
    unet = UNet(dataclasses.replace(config, image_prompt_dim=adapter.cross_attention_dim),
                rngs=rngs)
    lora_lib.apply_lora(unet, lora_lib.ATTENTION_PROJECTIONS, adapter.lora_rank,
                        lora_scale=lora_scale, rngs=rngs)
    return unet


def processor_layout(config: UNetConfig) -> list[tuple[str, int]]:
    """(dotted attention path, hidden width) in diffusers' `unet.attn_processors` order (down
    blocks, up blocks, mid block; attn1 then attn2 per transformer block), from the config alone:
    entry i is the module of `ip_adapter.{i}.*` in mask.bin (reference section 4.1)."""
    boc, lpb, tlpb = (config.block_out_channels, config.layers_per_block,
                      config.transformer_layers_per_block)
    last = len(boc) - 1
    groups = [(f"down_blocks.{i}", lpb[i], tlpb[i], boc[i])
              for i, kind in enumerate(config.down_block_types) if kind == "CrossAttnDownBlock2D"]
    groups += [(f"up_blocks.{i}", lpb[last - i] + 1, tlpb[last - i], boc[last - i])
               for i, kind in enumerate(config.up_block_types) if kind == "CrossAttnUpBlock2D"]
    groups += [("mid_block", 1, tlpb[-1], boc[-1])]
    return [(f"{name}.attentions.{j}.transformer_blocks.{k}.{attn}", hidden)
            for name, attentions, layers, hidden in groups for j in range(attentions)
            for k in range(layers) for attn in ("attn1", "attn2")]


def processor_paths(unet: UNet) -> list[str]:
    """`processor_layout` paths of a UNet."""
    return [path for path, _ in processor_layout(unet.config)]


def adapter_shapes(config: UNetConfig, adapter: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """{UNet flax path: shape} of the adapter's UNet parameters (LoRA factors on q/k/v/out of
    every attention, to_k_ip/to_v_ip kernels on every attn2)."""
    r, d = adapter.lora_rank, config.cross_attention_dim
    out = {}
    for path, hidden in processor_layout(config):
        cross = path.endswith("attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            fan_in = d if cross and proj in ("to_k", "to_v") else hidden
            out[f"{path}.{proj}.lora_layer.down.kernel"] = (fan_in, r)
            out[f"{path}.{proj}.lora_layer.up.kernel"] = (r, hidden)
        if cross:
            out[f"{path}.to_k_ip.kernel"] = (adapter.cross_attention_dim, hidden)
            out[f"{path}.to_v_ip.kernel"] = (adapter.cross_attention_dim, hidden)
    return out


def _module_at(root: nnx.Module, path: str):
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _fixed_linear(kernel) -> Linear:
    """A bias-free Linear holding `kernel` (in, out)."""
    linear = Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
    linear.kernel = nnx.Param(jnp.asarray(kernel))
    return linear


def attach_adapter(unet: UNet, adapter: AdapterConfig, params: Mapping[str, Any], *,
                   lora_scale: float = 1.0, where: str = "adapter") -> UNet:
    """Turn a loaded base UNet into the StoryMaker UNet in place (what `storymaker_unet` builds,
    without building a second UNet): to_k_ip/to_v_ip on every attn2 and the LoRA factors, all
    from `params` {UNet flax path: array} (strictly checked, `adapter_shapes`)."""
    config = unet.config
    if config.cross_attention_dim != adapter.cross_attention_dim:
        raise CheckpointError(f"{where}: the UNet's cross_attention_dim is "
                              f"{config.cross_attention_dim}, the adapter's tokens are "
                              f"{adapter.cross_attention_dim} wide: adapter and base model do not "
                              "belong together")
    if config.image_prompt_dim is not None or lora_lib.lora_layers(unet):
        raise ValueError("attach_adapter: this UNet already has image-prompt projections / LoRA")
    check_keys({k: tuple(np.shape(v)) for k, v in params.items()},
               adapter_shapes(config, adapter), f"{where} [ip_adapter]")
    for path, _ in processor_layout(config):
        if path.endswith("attn2"):
            attn = _module_at(unet, path)
            attn.to_k_ip = nnx.data(_fixed_linear(params[f"{path}.to_k_ip.kernel"]))
            attn.to_v_ip = nnx.data(_fixed_linear(params[f"{path}.to_v_ip.kernel"]))
    unet.config = dataclasses.replace(config, image_prompt_dim=adapter.cross_attention_dim)
    for path, layer in _lora_layers_with_factors(unet, adapter, lora_scale):
        layer.down.kernel = lora_lib.LoRAParam(jnp.asarray(params[f"{path}.lora_layer.down.kernel"]))
        layer.up.kernel = lora_lib.LoRAParam(jnp.asarray(params[f"{path}.lora_layer.up.kernel"]))
    return unet


def _lora_layers_with_factors(unet: UNet, adapter: AdapterConfig, lora_scale: float):
    """apply_lora with rank-1 placeholder factors (replaced by the caller), -> (path, layer)."""
    lora_lib.apply_lora(unet, lora_lib.ATTENTION_PROJECTIONS, 1, lora_scale=lora_scale,
                        rngs=nnx.Rngs(0))
    layers = lora_lib.lora_layers(unet)
    for _, layer in layers:
        layer.rank = adapter.lora_rank
    return layers


def split_context(context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, 77 + L_ip, D) -> (text (B, 77, D), image-prompt tokens (B, L_ip, D)), split at the
    literal 77 as the official processor does."""
    if context.ndim != 3 or context.shape[1] <= TEXT_TOKENS:
        raise ValueError(f"StoryMaker context must be (B, 77 + image tokens, D), got "
                         f"{context.shape}: the text part is always 77 tokens (max_length padding)")
    return context[:, :TEXT_TOKENS], context[:, TEXT_TOKENS:]


def unet_forward(unet: UNet, x: jax.Array, t, context: jax.Array, *, text_embeds: jax.Array,
                 time_ids: jax.Array, ip_scale: float | jax.Array = 1.0, **unet_kwargs):
    """eps-prediction UNetOutput for the official context layout [77 text | image tokens]:
    x (B, h, w, 4) NHWC, t scalar or (B,), context (B, 77 + L_ip, D), SDXL text_embeds (B, P)
    and time_ids (B, 6); ip_scale scalar or (B,); other keywords go to the UNet (e.g.
    attention_probe: the image-prompt softmax is the site with branch "image_prompt")."""
    text, tokens = split_context(context)
    return unet(x, t, text, image_prompt_tokens=tokens, image_prompt_scale=ip_scale,
                text_embeds=text_embeds, time_ids=time_ids, **unet_kwargs)


def is_adapter_path(path) -> bool:
    """True for a parameter the StoryMaker adapter owns (trains, ships in mask.bin): a path
    (tuple of keys or dotted string) of a StoryMakerModel under image_proj_model, or a UNet
    LoRA factor / to_k_ip / to_v_ip."""
    parts = path.split(".") if isinstance(path, str) else [str(getattr(p, "key", p)) for p in path]
    return (parts[:1] == ["image_proj_model"] or "lora_layer" in parts
            or "to_k_ip" in parts or "to_v_ip" in parts)


def adapter_state(model: nnx.Module) -> nnx.State:
    """The adapter's parameters of a StoryMakerModel (or of its UNet): nnx.State filtered by
    `is_adapter_path`."""
    return nnx.state(model, lambda path, value: isinstance(value, nnx.Param)
                     and is_adapter_path(path))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class StoryMakerModel(TextToImageModel):
    """unet (with IP + LoRA), vae, text_encoder, text_encoder_2, image_encoder (CLIP vision,
    penultimate features), image_proj_model (`ImageProjection`)."""

    def __init__(self, modules: dict[str, nnx.Module], config_dir: str, adapter: AdapterConfig):
        super().__init__(modules, config_dir)
        self.adapter_config = adapter


def clip_features(model: StoryMakerModel, pixels: jax.Array, dtype=_F32) -> jax.Array:
    """CLIP-normalised pixels (N, 224, 224, 3) NHWC -> hidden_states[-2] (N, 257, C_v), the
    output of the penultimate encoder layer (no post_layernorm)."""
    out = model.image_encoder(pixels.astype(dtype), output_hidden_states=True, dtype=dtype)
    return out.hidden_states[-2]


def image_prompt_tokens(model: StoryMakerModel, image_pixels: jax.Array, face_pixels: jax.Array,
                        id_embeds: jax.Array, dtype=_F32) -> tuple[jax.Array, jax.Array]:
    """Characters (n, 224, 224, 3) crop pixels, (n, 224, 224, 3) aligned-face pixels, (n, I) ids
    -> (negative, positive) tokens, each (1, 20 (n + 1), D)."""
    clip = clip_features(model, image_pixels, dtype)[None]
    face = clip_features(model, face_pixels, dtype)[None]
    ids = jnp.asarray(id_embeds, dtype)[None]
    proj = model.image_proj_model
    return negative_image_tokens(proj, ids, clip, face), proj(ids, clip, face)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _fill(abstract: nnx.Module, flat: Mapping[str, Any], where: str) -> nnx.Module:
    """The abstract module holding exactly `flat` {flax path: array} (strict key/shape check)."""
    graphdef, state = nnx.split(abstract)
    params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    want = {".".join(map(str, p)): tuple(v.shape) for p, v in params}
    check_keys({k: tuple(v.shape) for k, v in flat.items()}, want, where)
    nnx.replace_by_pure_dict(state, flat_to_nested({k: jnp.asarray(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def build_storymaker(base: TextToImage, image_encoder: nnx.Module, adapter: AdapterConfig,
                     image_proj: Mapping[str, Any], unet_adapter: Mapping[str, Any], *,
                     lora_scale: float = 1.0) -> TextToImage:
    """A StoryMaker system from a loaded SDXL text-to-image system (its UNet is extended in
    place, `attach_adapter`), a CLIP vision encoder and the adapter's flat Flax parameters
    ({path: array} of the ImageProjection, and of the UNet's LoRA factors + to_k_ip/to_v_ip)."""
    old = base.model
    if not old.sdxl:
        raise CheckpointError(f"{base.path}: StoryMaker needs an SDXL base (UNet with the "
                              "text_time added embedding, two text encoders)")
    if image_encoder.config.hidden_size != adapter.clip_embeddings_dim:
        raise CheckpointError(f"the image encoder is {image_encoder.config.hidden_size} wide, the "
                              f"adapter expects CLIP features of width {adapter.clip_embeddings_dim}"
                              " (StoryMaker uses CLIP ViT-H/14: 1280)")
    unet = attach_adapter(old.unet, adapter, unet_adapter, lora_scale=lora_scale)
    proj = _fill(abstract_init(lambda: ImageProjection(adapter, rngs=nnx.Rngs(0))), image_proj,
                 "StoryMaker image_proj_model")
    modules = {name: getattr(old, name) for name in ("vae", *old.encoder_names)}
    modules.update(unet=unet, image_encoder=image_encoder, image_proj_model=proj)
    model = StoryMakerModel(modules, old.config_dir, adapter)
    return dataclasses.replace(base, model=model)


def init_storymaker(config_dir: str | os.PathLike, adapter: AdapterConfig, *,
                    lora_scale: float = 1.0, rngs: nnx.Rngs) -> StoryMakerModel:
    """A randomly initialised StoryMakerModel from a config folder (unet/, vae/, text_encoder/,
    text_encoder_2/, image_encoder/ config.json; e.g. the fixture's `config/`): the official
    inits where they matter (LoRA up = 0, proj_out = 0, pos_embed / bg_embed = 0)."""
    config_dir = os.fspath(config_dir)
    modules = {}
    for name, kind in (("vae", "vae"), ("text_encoder", "clip_text"),
                       ("text_encoder_2", "clip_text_projection"),
                       ("image_encoder", "clip_vision_projection")):
        modules[name] = components_lib.build(Component(name, kind), config_dir, rngs=rngs)
    unet_config = UNetConfig.from_json(os.path.join(config_dir, "unet"))
    modules["unet"] = storymaker_unet(unet_config, adapter, lora_scale=lora_scale, rngs=rngs)
    modules["image_proj_model"] = ImageProjection(adapter, rngs=rngs)
    return StoryMakerModel(modules, config_dir, adapter)


def load_image_encoder(path: str) -> nnx.Module:
    """CLIP vision encoder from a transformers folder (CLIPVisionModel[WithProjection] or a whole
    CLIPModel, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K), a leffa_jax checkpoint with an
    image_encoder, or a diffusers folder with image_encoder/ (`weights.pipeline_folders`)."""
    from leffa_jax.weights import pipeline_folders

    return pipeline_folders.load_image_encoder(
        path, example="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


def load_storymaker(base: str | os.PathLike, adapter: str | os.PathLike,
                    image_encoder: str | os.PathLike | None = None, *,
                    adapter_config: str | os.PathLike | None = None,
                    lora_scale: float = 1.0) -> TextToImage:
    """SDXL base (diffusers folder or its leffa_jax conversion) + adapter (the released mask.bin,
    a .safetensors with its keys, or a leffa_jax adapter file from `convert`) + CLIP vision
    encoder (a folder; default: the base folder's image_encoder/) -> TextToImage whose model is
    a StoryMakerModel. adapter_config: a storymaker_adapter.json for non-standard widths (an
    official file's widths are read from its tensor shapes, with dim_head 64)."""
    from leffa_jax.weights import storymaker as sm_weights

    base, adapter = os.fspath(base), os.fspath(adapter)
    config = AdapterConfig.from_json(adapter_config) if adapter_config else None
    cfg, image_proj, unet_flat = sm_weights.read_adapter(adapter, config)
    system = load_text2image(base)
    path = os.fspath(image_encoder) if image_encoder is not None else base
    encoder = load_image_encoder(path)
    proc = processor_paths(system.model.unet)
    unet_params = sm_weights.processor_params_to_unet(unet_flat, proc, adapter) \
        if sm_weights.is_processor_layout(unet_flat) else unet_flat
    return build_storymaker(system, encoder, cfg, image_proj, unet_params, lora_scale=lora_scale)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


class StoryMakerOutput(NamedTuple):
    """images (B, H, W, 3) uint8; latents (K, B, h, w, 4) after each step or None; decoded
    (B, H, W, 3) float32; timesteps (K,); image_tokens (2, L_ip, D) [negative, positive]."""

    images: np.ndarray
    latents: np.ndarray | None
    decoded: np.ndarray
    timesteps: np.ndarray
    image_tokens: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Options:
    zero_negative: bool
    compute_dtype: Any
    attention_kernel: str


def _merge(graphdef, state, dtype, vae_dtype=_F32) -> StoryMakerModel:
    from leffa_jax.pipeline import cast_params

    return nnx.merge(graphdef, cast_params(state, dtype, vae_dtype, _CAST))


_CAST = (Component("vae", "vae"),)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _encode(graphdef, state, ids, negative_ids, image_pixels, face_pixels, id_embeds,
            opts: _Options):
    """-> (text context (2B, 77, D) [neg, pos] per sample, pooled (2B, P), tokens (2, L, D))."""
    model = _merge(graphdef, state, opts.compute_dtype)
    dtype = opts.compute_dtype
    context, pooled = t2i.encode_text(model, ids, dtype)
    if opts.zero_negative:
        negative = jnp.zeros_like(context), jnp.zeros_like(pooled)
    else:
        negative = t2i.encode_text(model, negative_ids, dtype)
    negative_tokens, tokens = image_prompt_tokens(model, image_pixels, face_pixels, id_embeds,
                                                  dtype)
    inter = guidance_lib.interleave_branches
    return (inter(negative[0], context), inter(negative[1], pooled),
            jnp.concatenate([negative_tokens, tokens]))


def storymaker_eps_fn(model: StoryMakerModel, guidance_scale, ip_scale, *, compute_dtype=_F32,
                      attention_kernel: str = "xla"):
    """eps_fn(x (B, h, w, 4), t, (context (2B, 77 + L, D), pooled (2B, P), time_ids (2B, 6)))
    -> guided eps (B, h, w, 4): one UNet call on [uncond, cond] rows per sample."""

    def eps_fn(x, t, conditions):
        context, pooled, time_ids = conditions
        x_in = guidance_lib.repeat_branches(x, 2).astype(compute_dtype)
        eps = unet_forward(model.unet, x_in, t, context.astype(compute_dtype),
                           text_embeds=pooled.astype(compute_dtype), time_ids=time_ids,
                           ip_scale=ip_scale, attention_kernel=attention_kernel).sample
        uncond, cond = guidance_lib.split_branches(eps.astype(_F32), 2)
        return guidance_lib.classifier_free_guidance(uncond, cond, guidance_scale)

    return eps_fn


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _sample(graphdef, state, conditions, noise, stepper, guidance_scale, ip_scale, progress,
            opts: _Options):
    model = _merge(graphdef, state, opts.compute_dtype)
    eps_fn = storymaker_eps_fn(model, guidance_scale, ip_scale, compute_dtype=opts.compute_dtype,
                               attention_kernel=opts.attention_kernel)
    x, latents = denoise(stepper, eps_fn, noise, conditions, return_latents=True,
                         progress=progress)
    decoded = model.vae.decode((x / model.scaling_factor).astype(_F32)).astype(_F32)
    return x, latents, to_uint8(decoded), decoded


def encode_characters(characters: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Characters (`storymaker_inputs.CharacterInputs`, or tuples (crop pixels, face pixels, id)
    with CLIP-normalised (224, 224, 3) pixels) -> stacked (n, 224, 224, 3) x2, (n, I)."""
    if not characters:
        raise ValueError("StoryMaker needs at least one character")
    crops, faces, ids = zip(*[(c.image_pixels, c.face_pixels, c.id_embedding)
                              if hasattr(c, "image_pixels") else tuple(c) for c in characters],
                            strict=True)
    crops, faces = np.stack(crops).astype(np.float32), np.stack(faces).astype(np.float32)
    ids = np.stack(ids).astype(np.float32)
    if crops.ndim != 4 or crops.shape[-1] != 3 or faces.shape != crops.shape:
        raise ValueError(f"character pixels must be NHWC (224, 224, 3) each, got crops "
                         f"{crops.shape[1:]} and faces {faces.shape[1:]}")
    return crops, faces, ids


def generate(system: TextToImage, prompt: str | Sequence[str], characters: Sequence[Any], *,
             negative_prompt: str | Sequence[str] | None = None, steps: int = 25,
             guidance: float = 7.5, ip_scale: float = 0.8, height: int | None = None,
             width: int | None = None, num_images_per_prompt: int = 1,
             scheduler: str | None = "unipc", seed: int = 0, init_noise=None, dtype="float32",
             attention_kernel: str = "xla", return_latents: bool = False,
             progress: Callable[[int], None] | None = None) -> StoryMakerOutput:
    """Sample `prompt` (one or a list; B = len * num_images_per_prompt) with the same
    characters (1..max_characters) in every image. The LoRA scale is the model's (set it with
    `nn.lora.set_lora_scale` or at load time); ip_scale is the image-prompt attention scale.
    guidance must be > 1 (the official pipeline has no path without CFG). scheduler: a stepper
    name (default unipc with the folder's scheduler config, as infer.py) or None (the folder's
    class). init_noise (B, h, w, 4) NHWC replays a run."""
    if not isinstance(system.model, StoryMakerModel):
        raise TypeError("generate needs a StoryMaker system (load_storymaker)")
    if float(guidance) <= 1.0:
        raise ValueError(f"guidance {guidance}: StoryMaker samples with classifier-free guidance "
                         "(> 1; the official pipeline fails without it)")
    steps = int(steps)
    if steps < 1 or num_images_per_prompt < 1:
        raise ValueError("steps and num_images_per_prompt must be >= 1")
    crops, faces, ids = encode_characters(characters)
    adapter = system.model.adapter_config
    if not 1 <= len(ids) <= adapter.max_characters:
        raise ValueError(f"{len(ids)} characters: this adapter has {adapter.max_characters} "
                         "character slots")
    if ids.shape[1] != adapter.id_embeddings_dim:
        raise ValueError(f"face embeddings have {ids.shape[1]} values, the adapter expects "
                         f"{adapter.id_embeddings_dim} (insightface normed_embedding)")
    height = int(height or system.default_size)
    width = int(width or system.default_size)
    t2i._check_size(system, height, width)
    prompts = t2i._as_list(prompt, "prompt")
    count, repeat = len(prompts), int(num_images_per_prompt)
    zero_negative = system.force_zeros_for_empty_prompt and negative_prompt is None
    negatives = t2i._as_list(negative_prompt or "", "negative_prompt", count)
    token_ids = t2i._token_ids(system, prompts, prompts, repeat)
    negative_ids = t2i._token_ids(system, negatives, negatives, repeat)
    b = count * repeat
    factor = system.model.vae_factor
    noise = t2i._init_noise(init_noise, seed, (b, height // factor, width // factor,
                                              system.model.unet.config.in_channels))
    stepper = t2i.stepper_for(system, scheduler, steps)
    if stepper.needs_noise:
        raise ValueError(f"scheduler {stepper.name!r} draws noise at every step; StoryMaker "
                         "sampling supports the deterministic ones (unipc, ddim, dpmpp_2m, ...)")
    opts = _Options(zero_negative, t2i._dtype(dtype), attention_kernel)
    graphdef, state = nnx.split(system.model)
    context, pooled, tokens = _encode(graphdef, state, token_ids, negative_ids, crops, faces, ids,
                                      opts=opts)
    ip = jnp.tile(tokens, (b, 1, 1)).astype(context.dtype)  # rows [neg, pos] per sample
    conditions = (jnp.concatenate([context, ip], axis=1), pooled,
                  jnp.asarray(np.tile(t2i.time_ids_for(height, width), (b, 1))))
    with progress_reporting(progress) as progress_id:
        _, latents, images, decoded = _sample(graphdef, state, conditions, noise, stepper,
                                              jnp.float32(guidance), jnp.float32(ip_scale),
                                              progress_id, opts=opts)
        images, decoded = np.asarray(images), np.asarray(decoded)
        latents = np.asarray(latents) if return_latents else None
    return StoryMakerOutput(images, latents, decoded, np.asarray(stepper.timesteps, np.int64),
                            np.asarray(tokens[:, :], np.float32))
