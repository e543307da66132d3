"""CLIP text and vision encoders in Flax NNX, module tree mirroring transformers' checkpoints.

Parameter paths equal the checkpoint keys (`text_model.encoder.layers.3.self_attn.q_proj`,
`vision_model.embeddings.class_embedding`, `text_projection`, ...) up to the leaf rules in
`clip_torch_to_flax_leaf` (Linear/Conv `weight` -> `kernel` in Flax layout, LayerNorm `weight` ->
`scale`, Embedding `weight` -> `embedding`, `class_embedding` as is).

Models (configs: `leffa_jax.nn.clip_config`):
- `CLIPTextModel`, `CLIPTextModelWithProjection`: input_ids (B, L) int, L <= 77 ->
  `CLIPTextOutput`: last_hidden_state (B, L, D) after the final LayerNorm; hidden_states (with
  output_hidden_states) = (embeddings, layer 1, ..., layer N) as transformers (the last one is
  before the final LayerNorm; SDXL uses hidden_states[-2]); pooler_output (B, D) at the EOS token
  (legacy `eos_token_id == 2`: argmax of the ids; otherwise the first id == eos_token_id);
  text_embeds (B, P) = pooler_output @ text_projection. Causal self-attention, optional padding
  `attention_mask` (B, L) as in transformers.
- `CLIPVisionModel`, `CLIPVisionModelWithProjection`: pixel_values **NHWC (B, H, W, C)**, H = W
  = image_size, already normalised (see `clip_preprocess`) -> `CLIPVisionOutput`:
  last_hidden_state (B, 1 + patches, D) (no post LayerNorm, as transformers); hidden_states =
  (pre_layrnorm(embeddings), layer 1, ..., layer N); pooler_output = post_layernorm(class token);
  image_embeds (B, P) = pooler_output @ visual_projection.

Precision: activations in `dtype` (float32 default), parameters cast to it, LayerNorm statistics
and the attention softmax in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax.nn.abstract import abstract_init
from leffa_jax.nn.attention import multihead_attention, split_heads
from leffa_jax.nn.clip_config import CLIPTextConfig, CLIPVisionConfig
from leffa_jax.nn.config import ConfigError
from leffa_jax.nn.layers import LayerNorm, Linear

ACTIVATION_FNS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": partial(jax.nn.gelu, approximate=False),
}


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None


class Embedding(nnx.Module):
    """Lookup table `embedding` (num, dim) (torch nn.Embedding `weight`, same layout)."""

    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, dim), jnp.float32))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                     mask: jax.Array) -> jax.Array:
    """q/k/v (B, N, heads*d), mask broadcastable to (B, 1, Nq, Nk) bool (True = attend)
    -> (B, Nq, heads*d). Logits and softmax in float32; masked logits get float32 min."""
    b, nq, c = q.shape
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits / math.sqrt(qh.shape[-1]), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, vh).reshape(b, nq, c)


class CLIPAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj = Linear(dim, dim, rngs=rngs)
        self.k_proj = Linear(dim, dim, rngs=rngs)
        self.v_proj = Linear(dim, dim, rngs=rngs)
        self.out_proj = Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None, kernel: str) -> jax.Array:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if mask is None:
            out = multihead_attention(q, k, v, self.heads, kernel)
        else:
            out = masked_attention(q, k, v, self.heads, mask)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs):
        self.act = act
        self.fc1 = Linear(dim, hidden, rngs=rngs)
        self.fc2 = Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATION_FNS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, *, rngs: nnx.Rngs):
        dim = cfg.hidden_size
        self.self_attn = CLIPAttention(dim, cfg.num_attention_heads, rngs=rngs)
        self.layer_norm1 = LayerNorm(dim, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(dim, cfg.intermediate_size, cfg.hidden_act, rngs=rngs)
        self.layer_norm2 = LayerNorm(dim, cfg.layer_norm_eps)

    def __call__(self, x: jax.Array, mask: jax.Array | None, kernel: str) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask, kernel)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, mask, kernel: str, output_hidden_states: bool):
        """x (B, N, D) -> (last (B, N, D), (x, layer outputs...) or None)."""
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask, kernel)
            hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None)


# ----------------------------------------------------------------------------- text

def _check_activation(cfg) -> None:
    if cfg.hidden_act not in ACTIVATION_FNS:
        raise ConfigError(f"{cfg.source}: unsupported hidden_act={cfg.hidden_act!r} "
                          f"(supported: {sorted(ACTIVATION_FNS)})")


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
    """transformers' `CLIPTextTransformer` (the `text_model` of both text models)."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        _check_activation(cfg)
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def pool(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
        """Hidden state at the EOS token of each row, (B, L, D) -> (B, D)."""
        if self.config.eos_token_id == 2:  # transformers' legacy rule: the highest id
            index = jnp.argmax(input_ids.astype(jnp.int32), axis=-1)
        else:  # first occurrence of eos_token_id (0 when absent, as torch.argmax)
            index = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False,
                 dtype=jnp.float32, attention_kernel: str = "xla") -> CLIPTextOutput:
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} > max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = self.embeddings(input_ids).astype(dtype)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        x, hidden = self.encoder(x, mask, attention_kernel, output_hidden_states)
        last = self.final_layer_norm(x)
        return CLIPTextOutput(last_hidden_state=last, pooler_output=self.pool(last, input_ids),
                              hidden_states=hidden)


class CLIPTextModel(nnx.Module):
    """SD1.5 / SDXL `text_encoder`. __call__(input_ids (B, L), attention_mask=None, *,
    output_hidden_states=False, dtype=float32) -> CLIPTextOutput (text_embeds None)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.text_model = CLIPTextTransformer(config, rngs=rngs)

    @property
    def config(self) -> CLIPTextConfig:
        return self.text_model.config

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, **kwargs)


def _projection_dim(cfg) -> int:
    if not cfg.projection_dim:
        raise ConfigError(f"{cfg.source}: projection_dim is required for a projection model")
    return cfg.projection_dim


class CLIPTextModelWithProjection(nnx.Module):
    """SDXL `text_encoder_2`: CLIPTextModel + `text_projection` (no bias) -> text_embeds."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.text_model = CLIPTextTransformer(config, rngs=rngs)
        self.text_projection = Linear(config.hidden_size, _projection_dim(config), use_bias=False,
                                      rngs=rngs)

    @property
    def config(self) -> CLIPTextConfig:
        return self.text_model.config

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask, **kwargs)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))


# ----------------------------------------------------------------------------- vision

class PatchEmbedding(nnx.Module):
    """Conv2d(C, D, kernel = stride = patch, no bias) as patchify + matmul. kernel (p, p, C, D)."""

    def __init__(self, channels: int, dim: int, patch: int, *, rngs: nnx.Rngs):
        self.patch = patch
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(
            rngs.params(), (patch, patch, channels, dim), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, H, W, C) -> (B, (H/p)*(W/p), D), patches in row-major order."""
        b, h, w, c = x.shape
        p = self.patch
        patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c)
        return jnp.dot(patches, self.kernel[...].astype(x.dtype).reshape(p * p * c, -1))


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.hidden_size,)))
        self.patch_embedding = PatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                              rngs=rngs)
        self.position_embedding = Embedding(cfg.num_positions, cfg.hidden_size, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, h, w, c = pixel_values.shape
        size = self.config.image_size
        if (h, w, c) != (size, size, self.config.num_channels):
            raise ValueError(f"CLIP vision input must be NHWC (B, {size}, {size}, "
                             f"{self.config.num_channels}), got {pixel_values.shape}")
        patches = self.patch_embedding(pixel_values)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPVisionTransformer(nnx.Module):
    """transformers' `CLIPVisionTransformer` (the `vision_model` of both vision models)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        _check_activation(cfg)
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, pixel_values, *, output_hidden_states: bool = False, dtype=jnp.float32,
                 attention_kernel: str = "xla") -> CLIPVisionOutput:
        x = self.pre_layrnorm(self.embeddings(pixel_values.astype(dtype)))
        last, hidden = self.encoder(x, None, attention_kernel, output_hidden_states)
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=self.post_layernorm(last[:, 0]),
                                hidden_states=hidden)


class CLIPVisionModel(nnx.Module):
    """__call__(pixel_values NHWC (B, H, W, 3), *, output_hidden_states=False, dtype=float32,
    attention_kernel="xla") -> CLIPVisionOutput (image_embeds None)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs)

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_model.config

    def __call__(self, pixel_values, **kwargs) -> CLIPVisionOutput:
        return self.vision_model(pixel_values, **kwargs)


class CLIPVisionModelWithProjection(nnx.Module):
    """IP-Adapter `image_encoder`: CLIPVisionModel + `visual_projection` -> image_embeds."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs)
        self.visual_projection = Linear(config.hidden_size, _projection_dim(config), use_bias=False,
                                        rngs=rngs)

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_model.config

    def __call__(self, pixel_values, **kwargs) -> CLIPVisionOutput:
        out = self.vision_model(pixel_values, **kwargs)
        return out.replace(image_embeds=self.visual_projection(out.pooler_output))


CLIP_MODELS = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection,
                                             CLIPVisionModel, CLIPVisionModelWithProjection)}


# ----------------------------------------------------------------------------- leaf rules

_EMBEDDINGS = ("token_embedding", "position_embedding")
# Non-parameter buffers some checkpoints carry (transformers recomputes them).
_BUFFERS = ("embeddings.position_ids",)


def clip_torch_to_flax_leaf(key: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
    """transformers CLIP key + tensor -> Flax path + array (layout only, dtype kept)."""
    base, leaf = key.rsplit(".", 1)
    if leaf == "class_embedding" or leaf == "bias":
        return key, arr
    if leaf == "weight" and base.rsplit(".", 1)[-1] in _EMBEDDINGS:
        return f"{base}.embedding", arr
    if leaf == "weight" and arr.ndim == 4:
        return f"{base}.kernel", arr.transpose(2, 3, 1, 0)
    if leaf == "weight" and arr.ndim == 2:
        return f"{base}.kernel", arr.T
    if leaf == "weight" and arr.ndim == 1:
        return f"{base}.scale", arr
    raise ConfigError(f"unexpected CLIP tensor {key!r} with shape {arr.shape}")


def clip_flax_to_torch_leaf(path: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
    """Inverse of `clip_torch_to_flax_leaf`."""
    base, leaf = path.rsplit(".", 1)
    if leaf in ("class_embedding", "bias"):
        return path, arr
    if leaf in ("embedding", "scale"):
        return f"{base}.weight", arr
    if leaf == "kernel" and arr.ndim == 4:
        return f"{base}.weight", arr.transpose(3, 2, 0, 1)
    if leaf == "kernel" and arr.ndim == 2:
        return f"{base}.weight", arr.T
    raise ConfigError(f"unexpected CLIP parameter {path!r} with shape {arr.shape}")


def clip_params_from_torch(state: Mapping[str, np.ndarray], model_cls: type) -> dict[str, np.ndarray]:
    """A transformers state dict -> flat {flax path: array} for `model_cls`. Drops position_ids
    buffers; adds the `text_model.` / `vision_model.` prefix that transformers 5 omits for a
    plain CLIPTextModel / CLIPVisionModel (4.x checkpoints and diffusers folders have it)."""
    keys = [k for k in state if not k.endswith(_BUFFERS)]
    tower = {CLIPTextModel: "text_model.", CLIPVisionModel: "vision_model."}.get(model_cls, "")
    prefix = tower if keys and not any(k.startswith(tower) for k in keys) else ""
    return dict(clip_torch_to_flax_leaf(prefix + k, np.asarray(state[k])) for k in keys)


def clip_params_to_torch(model: nnx.Module) -> dict[str, np.ndarray]:
    """A CLIP module -> transformers state dict (numpy), checkpoint key names (with the
    `text_model.` / `vision_model.` prefix, as diffusers folders), layouts and dtypes."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return dict(clip_flax_to_torch_leaf(".".join(map(str, p)), np.asarray(v[...])) for p, v in flat)


def clip_from_params(model_cls: type, config, params: Mapping[str, np.ndarray]) -> nnx.Module:
    """Build `model_cls(config)` holding exactly `params` (flat Flax paths), without random init.
    Missing, unexpected or mis-shaped parameters raise a ConfigError listing them."""
    abstract = abstract_init(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    want = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    shapes = sorted(f"{k}: {tuple(params[k].shape)} != {want[k]}" for k in set(want) & set(params)
                    if tuple(params[k].shape) != want[k])
    if missing or extra or shapes:
        raise ConfigError(f"{model_cls.__name__} parameters do not fit ({config.source}): "
                          f"missing {missing[:10]}, unexpected {extra[:10]}, shapes {shapes[:10]}")
    nested: dict = {}
    for path, value in params.items():
        node = nested
        *parents, leaf = path.split(".")
        for name in parents:
            node = node.setdefault(int(name) if name.isdigit() else name, {})
        node[leaf] = jnp.asarray(value)
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)
