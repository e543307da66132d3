"""LeffaModel through its public API against the official fixtures (unet_fwd.npz)."""

import numpy as np
import pytest
from conftest import shared_path
from torch_reference import nchw, nhwc

from leffa_jax.model import LeffaModel
from leffa_jax.nn import layers

FIXTURES = {"sd15_tiny": "stable-diffusion-inpainting-tiny",
            "sdxl_tiny": "stable-diffusion-xl-1.0-inpainting-0.1-tiny"}


def load(name, tmp_path=None, via_flax=False):
    base = shared_path("fixtures", "leffa_official", name)
    model = LeffaModel.from_pretrained(base / "weights.safetensors", base / "config" / FIXTURES[name])
    if via_flax:  # through our own checkpoint format
        model.save_pretrained(str(tmp_path / "ckpt"))
        model = LeffaModel.from_pretrained(str(tmp_path / "ckpt"))
    return model, np.load(base / "unet_fwd.npz")


@pytest.mark.parametrize("conv_path", ["default", "conv_general_dilated"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_official_forward(tmp_path, monkeypatch, name, conv_path):
    """`default` on CPU runs the small convolutions as matmuls (nn/layers.py); the other path is
    the one GPUs and TPUs take."""
    if conv_path != "default":
        monkeypatch.setattr(layers, "CPU_MATMUL_CONV_MAX_PIXELS", 0)
    model, d = load(name, tmp_path, via_flax=name == "sd15_tiny")
    feats = model.reference_features(nhwc(d["ref_latent"]), d["timestep"])
    n = len([k for k in d if k.startswith("ref_feat_")])
    assert len(feats) == n
    for i, f in enumerate(feats):
        err = np.abs(np.asarray(f) - d[f"ref_feat_{i:02d}"]).max()
        assert err <= 1e-4, f"reference feature {i}: {err}"
    eps = model.predict_noise(nhwc(d["gen_input"]), d["timestep"], feats)
    err = np.abs(nchw(eps) - d["noise_pred"]).max()
    assert err <= 1e-4, f"noise prediction: {err}"
    # per-sample timesteps broadcast the same way
    eps2 = model.predict_noise(nhwc(d["gen_input"]), np.full((2,), d["timestep"]), feats)
    assert np.abs(np.asarray(eps2) - np.asarray(eps)).max() <= 1e-6


def test_not_a_leffa_checkpoint(tmp_path):
    from leffa_jax.weights import CheckpointError

    with pytest.raises(CheckpointError, match="leffa_jax.json"):
        LeffaModel.from_pretrained(str(tmp_path))


def test_random_init_has_the_papers_structure():
    """`model.init = "random"`: both UNets start from the same random SD-inpainting UNet, as from
    SD-inpainting weights: every reference-UNet tensor equals the generative one, the reference
    conv_in keeps the 4 noisy-latent channels, the generative conv_in's 3 densepose channels are
    zero."""
    import ml_collections

    from leffa_jax.systems.leffa import init_model
    from leffa_jax.weights.modules import module_to_flat

    model = init_model(ml_collections.ConfigDict(
        {"model": {"init": "random", "base": "tiny"}, "train": {"seed": 3}}))
    gen, ref = module_to_flat(model.unet), module_to_flat(model.unet_encoder)
    assert set(ref) <= set(gen)
    kernel = gen.pop("conv_in.kernel")
    assert kernel.shape[2] == 12 and not kernel[:, :, 9:].any() and kernel[:, :, :9].std() > 0
    np.testing.assert_array_equal(ref.pop("conv_in.kernel"), kernel[:, :, :4])
    for key, value in ref.items():
        np.testing.assert_array_equal(value, gen[key], err_msg=key)
