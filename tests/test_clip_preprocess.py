"""CLIP image preprocessing vs Pillow's resize and transformers' CLIPImageProcessor (bit-exact)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from leffa_jax.nn.clip_preprocess import (
    BICUBIC,
    BILINEAR,
    CLIPImageProcessorConfig,
    clip_preprocess,
    resize_uint8,
    vertical_pass_first,
)
from leffa_jax.nn.config import ConfigError

# (H, W) -> (h, w): up, down, mixed, odd, one side unchanged, both pass orders of Pillow 13.
SIZES = [((50, 70), (224, 313)), ((300, 400), (224, 298)), ((17, 33), (5, 64)),
         ((1000, 37), (611, 23)), ((13, 7), (13, 29)), ((40, 20), (4, 15)), ((20, 20), (5, 10)),
         ((9, 41), (30, 2)), ((257, 259), (224, 225)), ((23, 3), (2, 1))]


def _image(rng, h, w, channels=3):
    """Noise on a ramp: exercises both clipping ends and smooth regions."""
    ramp = np.linspace(0, 200, w)[None, :, None]
    noise = rng.integers(-60, 60, (h, w, channels))
    return np.clip(ramp + noise + 30, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resample", [BICUBIC, BILINEAR])
def test_resize_matches_pillow_exactly(resample):
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in SIZES:
        img = _image(rng, h, w)
        want = np.asarray(Image.fromarray(img).resize((ow, oh), resample=resample))
        got = np.asarray(resize_uint8(jnp.asarray(img)[None], (oh, ow), resample))[0]
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff == 0, f"{(h, w)} -> {(oh, ow)}: max {diff} uint8 levels"


def test_random_sizes_match_pillow():
    """Random size pairs, both pass orders (the order rule is fitted to Pillow 13)."""
    rng = np.random.default_rng(1)
    orders = set()
    for _ in range(20):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 48, 4))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(img).resize((ow, oh), resample=BICUBIC))
        got = np.asarray(resize_uint8(jnp.asarray(img)[None], (oh, ow)))[0]
        np.testing.assert_array_equal(got, want, err_msg=f"{(h, w)} -> {(oh, ow)}")
        orders.add(vertical_pass_first(h, w, oh, ow))
    assert orders == {True, False}


@pytest.fixture(scope="module")
def processor():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPImageProcessor()


def test_preprocess_matches_transformers_bitwise(processor):
    rng = np.random.default_rng(2)
    arrays = [_image(rng, h, w) for h, w in [(50, 70), (300, 400), (640, 480), (224, 224),
                                             (230, 1000), (225, 224)]]
    for img in arrays:
        want = processor(images=img, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
        got = np.asarray(clip_preprocess(img))
        assert got.dtype == np.float32 and got.shape == (1, 224, 224, 3)
        np.testing.assert_array_equal(got, want)
    batch = np.stack([_image(rng, 120, 90) for _ in range(3)])
    want = processor(images=list(batch), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(clip_preprocess(batch)), want)


def test_pil_inputs_and_alpha_match_transformers(processor):
    rng = np.random.default_rng(3)
    images = [Image.fromarray(_image(rng, 100, 80, 4), "RGBA"),
              Image.fromarray(_image(rng, 64, 200)), Image.fromarray(_image(rng, 50, 50)[..., 0])]
    want = processor(images=images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(clip_preprocess(images)), want)


def test_config_from_json(tmp_path, processor):
    cfg = {"crop_size": {"height": 196, "width": 196}, "size": {"shortest_edge": 200},
           "do_center_crop": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "resample": 3, "image_processor_type": "CLIPImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    config = CLIPImageProcessorConfig.from_json(tmp_path)
    img = _image(np.random.default_rng(4), 333, 250)
    want = type(processor)(**{k: v for k, v in cfg.items() if k != "image_processor_type"})(
        images=img, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(clip_preprocess(img, config)), want)
    with pytest.raises(ConfigError, match="do_pad"):
        CLIPImageProcessorConfig.from_dict({"do_pad": True})
    with pytest.raises(ConfigError, match="resample"):
        clip_preprocess(img, CLIPImageProcessorConfig(resample=1))
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(img.astype(np.float32))
