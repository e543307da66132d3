"""CLIP-T (image-text) and CLIP-I (image-image) similarity with leffa_jax's CLIP encoders
(`leffa_jax.nn.clip`, the text-conditioning issue's modules).

Both are cosine similarities of the projected embeddings, as transformers' `CLIPModel` forms
them (`image_embeds`, `text_embeds` L2-normalised): CLIP-I = cos(image_embeds(a),
image_embeds(b)), CLIP-T = cos(image_embeds, text_embeds). `clip_score` is torchmetrics'
`CLIPScore` scale, 100 * max(cos, 0). Pixels are NHWC CLIP pixel values
(`leffa_jax.nn.clip_preprocess.clip_preprocess`); ids from `leffa_jax.text.tokenizer`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from leffa_jax.nn import clip


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_embeds(vision: clip.CLIPVisionModelWithProjection, pixels: jax.Array) -> jax.Array:
    """(B, H, W, 3) CLIP pixel values -> unit image embeddings (B, P)."""
    return _unit(vision(pixels).image_embeds)


def text_embeds(text: clip.CLIPTextModelWithProjection, input_ids: jax.Array,
                attention_mask: jax.Array | None = None) -> jax.Array:
    """(B, L) token ids -> unit text embeddings (B, P)."""
    return _unit(text(input_ids, attention_mask).text_embeds)


def clip_i(vision, pixels_a: jax.Array, pixels_b: jax.Array) -> jax.Array:
    """Per-pair CLIP-I: cosine of the two images' embeddings, (B,)."""
    return jnp.sum(image_embeds(vision, pixels_a) * image_embeds(vision, pixels_b), -1)


def clip_t(vision, text, pixels: jax.Array, input_ids: jax.Array,
           attention_mask: jax.Array | None = None) -> jax.Array:
    """Per-pair CLIP-T: cosine of image and prompt embeddings, (B,)."""
    return jnp.sum(image_embeds(vision, pixels) * text_embeds(text, input_ids, attention_mask), -1)


def clip_score(cos: jax.Array) -> jax.Array:
    """torchmetrics CLIPScore scale: 100 * max(cos, 0)."""
    return 100 * jnp.maximum(cos, 0)


def load_clip(folder: str):
    """(vision, text) encoders with projections from a transformers `CLIPModel` folder
    (config.json + model.safetensors / pytorch_model.bin), e.g. openai/clip-vit-large-patch14."""
    from leffa_jax.weights.tensor_io import CheckpointError, CheckpointNotFoundError

    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            break
    else:
        raise CheckpointNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin of a "
                                      "transformers CLIPModel (e.g. openai/clip-vit-large-patch14)")
    from leffa_jax.weights.pipeline_folders import is_clip_model, load_transformers_clip

    with open(os.path.join(folder, "config.json")) as f:
        if not is_clip_model(json.load(f)):
            raise CheckpointError(f"{folder}: not a transformers CLIPModel folder (both towers "
                                  "are needed), e.g. openai/clip-vit-large-patch14")
    vision = load_transformers_clip(folder, "vision")
    text = load_transformers_clip(folder, "text")
    return vision, text
