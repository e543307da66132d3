"""StoryMaker model parity with the official code's recorded runs
(`../shared/fixtures/storymaker/infer_{1,2}char.npz`, RedAIGC/StoryMaker @ a7ce766 on tiny random
models): CLIP ViT penultimate features, the image-prompt tokens of both CFG branches (positive
and the zero-feature negative), both text encoders' context and pooled embedding, and the UNet's
noise prediction of both CFG branches at every recorded step (ip / LoRA scale 0.8). The system is
loaded the way a user does it: a diffusers SDXL folder + the released mask.bin layout.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from storymaker_fixture import cached_system, load_npz

from leffa_jax.systems import storymaker as sm
from leffa_jax.systems import text2image as t2i

FIXTURES = ("infer_1char.npz", "infer_2char.npz")


@pytest.fixture(scope="module")
def system():
    return cached_system(0.8)[0]


def _nhwc(x):
    return jnp.asarray(np.moveaxis(x, -3, -1))


@pytest.mark.parametrize("name", FIXTURES)
def test_image_prompt_tokens(system, name):
    f = load_npz(name)
    model = system.model
    pixels, faces = _nhwc(f["clip_image_pixels"]), _nhwc(f["clip_face_pixels"])
    np.testing.assert_allclose(sm.clip_features(model, pixels), f["clip_image_hidden_m2"],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(sm.clip_features(model, faces), f["clip_face_hidden_m2"],
                               atol=1e-4, rtol=0)
    negative, positive = sm.image_prompt_tokens(model, pixels, faces, f["proj_in_id_embeds"])
    n = f["proj_in_id_embeds"].shape[0]
    assert positive.shape == (1, 20 * (n + 1), 40)
    # rows [uncond, cond]; token layout [bg 20 | char 0 (4 face | 16 crop) | char 1 ...]
    np.testing.assert_allclose(negative[0], f["prompt_image_emb"][0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(positive[0], f["prompt_image_emb"][1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(positive[0].reshape(n + 1, 20, 40), f["proj_out_cond"],
                               atol=1e-4, rtol=0)
    # the negative branch is not zero tokens, and keeps the learned background
    assert np.abs(np.asarray(negative)).max() > 0.1
    np.testing.assert_array_equal(negative[0, :20], positive[0, :20])


@pytest.mark.parametrize("name", FIXTURES)
def test_text_context(system, name):
    f = load_npz(name)
    ids = {"text_encoder": jnp.asarray(f["input_ids_1"]),
           "text_encoder_2": jnp.asarray(f["input_ids_2"])}
    context, pooled = t2i.encode_text(system.model, ids)  # rows [prompt, negative]
    np.testing.assert_allclose(np.asarray(context)[::-1], f["encoder_hidden_states"][:, :77],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled)[::-1], f["add_text_embeds"], atol=1e-4, rtol=0)


@functools.partial(jax.jit, static_argnums=0)
def _eps(graphdef, state, x, t, context, pooled, time_ids):
    return sm.unet_forward(nnx.merge(graphdef, state), x, t, context, text_embeds=pooled,
                           time_ids=time_ids, ip_scale=0.8).sample


def _check_noise_prediction(unet, name):
    """Both CFG rows of all 4 recorded steps in one UNet call (8 rows) from the recorded context
    against the official noise predictions (<= 1e-4)."""
    f = load_npz(name)
    steps = f["unet_in"].shape[0]
    x = _nhwc(f["unet_in"].reshape(-1, *f["unet_in"].shape[2:]))
    t = jnp.repeat(jnp.asarray(f["timesteps"], jnp.float32), 2)
    tile = lambda a: jnp.asarray(np.tile(a, (steps,) + (1,) * (a.ndim - 1)))
    graphdef, state = nnx.split(unet)
    eps = np.asarray(_eps(graphdef, state, x, t, tile(f["encoder_hidden_states"]),
                          tile(f["add_text_embeds"]), tile(f["add_time_ids"])))
    eps = np.moveaxis(eps, -1, 1).reshape(steps, 2, 4, *eps.shape[1:3])
    np.testing.assert_allclose(eps[:, 0], f["noise_pred_uncond"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(eps[:, 1], f["noise_pred_text"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FIXTURES)
def test_noise_prediction_every_step(system, name):
    _check_noise_prediction(system.model.unet, name)


def test_merged_lora_matches_the_official_unmerged_run(system):
    """LoRA merged into the base kernels (`nn/lora.merge_lora`, the fast sampling path) still
    gives the official noise predictions (computed with the LoRA beside the base weights), and
    unmerging restores every kernel bit for bit."""
    from leffa_jax.nn import lora

    unet = system.model.unet
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(unet, nnx.Param)))
    merged = lora.merge_lora(unet)
    try:
        assert merged == len(lora.lora_layers(unet)) > 0
        _check_noise_prediction(unet, "infer_2char.npz")
    finally:
        assert lora.unmerge_lora(unet) == merged
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(unet, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, after, before)


def test_processor_order_matches_the_release(system):
    """Processor i of mask.bin is the attention diffusers enumerates i-th (fixture table)."""
    import json

    from storymaker_fixture import fixture_dir

    table = json.loads((fixture_dir() / "config" / "storymaker_adapter.json").read_text())
    want = [p["processor"].removesuffix(".processor") for p in table["processors"]]
    assert sm.processor_paths(system.model.unet) == want


def test_literal_77_split():
    with pytest.raises(ValueError, match="77"):
        sm.split_context(jnp.zeros((1, 77, 8)))
    text, tokens = sm.split_context(jnp.arange(2 * 97 * 3.0).reshape(2, 97, 3))
    assert text.shape == (2, 77, 3) and tokens.shape == (2, 20, 3)


def test_batched_projection_rows_are_the_official_branches(system):
    """One batched call (B = 2: the recorded features, then zeros) gives the official cond and
    uncond tokens row by row; drop_face zeroes the 4 face tokens of that sample only (before
    pos_embed and the residual, as the official token drop)."""
    f = load_npz("infer_2char.npz")
    ids, clip, face = (f["proj_in_id_embeds"], f["clip_image_hidden_m2"], f["clip_face_hidden_m2"])
    stack = lambda a: jnp.asarray(np.stack([a, np.zeros_like(a)]))
    proj = system.model.image_proj_model
    tokens = proj(stack(ids), stack(clip), stack(face))
    np.testing.assert_allclose(tokens[0], f["prompt_image_emb"][1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(tokens[1], f["prompt_image_emb"][0], atol=1e-4, rtol=0)
    dropped = proj(stack(ids), stack(clip), stack(face), drop_face=jnp.array([True, False]))
    np.testing.assert_array_equal(dropped[1], tokens[1])
    assert not np.allclose(dropped[0, 20:24], tokens[0, 20:24])
    np.testing.assert_array_equal(dropped[0, :20], tokens[0, :20])
