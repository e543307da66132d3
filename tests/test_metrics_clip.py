"""CLIP-T / CLIP-I against transformers' `CLIPModel` (its normalised `image_embeds` and
`text_embeds`) on a tiny random CLIP saved as a transformers folder and loaded by
`leffa_jax.metrics.clip_score.load_clip`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_module

torch = require_module("torch")
transformers = require_module("transformers")

import jax.numpy as jnp  # noqa: E402

from leffa_jax.metrics import clip_score  # noqa: E402

TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_clip_t_and_clip_i_match_transformers(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config={**TINY, "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={**TINY, "image_size": 32, "patch_size": 8}, projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    vision, text = clip_score.load_clip(str(tmp_path))

    g = torch.Generator().manual_seed(1)
    px_a = torch.randn(3, 3, 32, 32, generator=g)
    px_b = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(0, 98, (3, 16), generator=g)
    ids[:, -1] = 98  # the EOS token pools the text (highest id: legacy argmax pooling too)
    with torch.no_grad():
        out_a = model(input_ids=ids, pixel_values=px_a)
        out_b = model(input_ids=ids, pixel_values=px_b)
    want_t = (out_a.image_embeds * out_a.text_embeds).sum(-1).numpy()
    want_i = (out_a.image_embeds * out_b.image_embeds).sum(-1).numpy()

    nhwc = lambda t: jnp.asarray(t.permute(0, 2, 3, 1).numpy())
    got_t = clip_score.clip_t(vision, text, nhwc(px_a), jnp.asarray(ids.numpy()))
    got_i = clip_score.clip_i(vision, nhwc(px_a), nhwc(px_b))
    np.testing.assert_allclose(np.asarray(got_t), want_t, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_i), want_i, atol=1e-5)
    np.testing.assert_allclose(np.asarray(clip_score.clip_score(got_t)),
                               100 * np.maximum(want_t, 0), atol=1e-3)


def test_load_clip_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIPModel"):
        clip_score.load_clip(str(tmp_path))
