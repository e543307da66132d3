"""The Leffa loss through the model (probe in the generative UNet) vs the official loss fixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path
from torch_reference import nchw, nhwc

from leffa_jax import flow as flow_lib
from leffa_jax.model import LeffaModel
from leffa_jax.objectives import LeffaLossConfig, flow_probe, leffa_loss_from_flows, selected_layers


@pytest.fixture(scope="module")
def setup():
    base = shared_path("fixtures", "leffa_official", "sd15_tiny")
    model = LeffaModel.from_pretrained(base / "weights.safetensors",
                                       base / "config" / "stable-diffusion-inpainting-tiny")
    return model, np.load(base / "loss_fixture.npz")


@pytest.mark.parametrize("fused", [True, False])
def test_loss_fixture_through_model(setup, fused):
    model, d = setup
    t = jnp.asarray(d["timesteps"])
    feats = model.reference_features(nhwc(d["ref_latent"]), t)
    layers = tuple(range(model.unet.num_transformer_layers))  # fixture: every layer selected
    n_fix = len([k for k in d if k.startswith("flow_")])
    assert len(layers) == n_fix
    eps, flows = model.predict_noise(nhwc(d["gen_input"]), t, feats, return_probes=True,
                                     probe=flow_probe(layers, 2.0, fused=fused))
    if "noise_pred" in d:
        assert np.abs(nchw(eps) - d["noise_pred"]).max() <= 1e-4
    image, ref, mask = nhwc(d["image"]), nhwc(d["ref_image"]), nhwc(d["mask"])
    hh, ww = image.shape[1:3]
    for i in layers:
        up = flow_lib.flow_to_image_size(flows[i], hh, ww)
        err = np.abs(np.asarray(up) - d[f"flow_{i:02d}"]).max()
        assert err <= 1e-4, f"layer {i} flow error {err}"
    for kind, key in (("smooth_l1", "leffa_loss"), ("l2", "leffa_loss_mse")):
        cfg = LeffaLossConfig(kind=kind, lam=1e-3, tau=2.0, t_threshold=500)
        got = float(leffa_loss_from_flows(flows, ref, image, mask, t, cfg))
        want = float(d[key])
        assert abs(got - want) <= 1e-4 * abs(want), f"{kind}: {got} vs {want}"


def test_loss_gradients_fused_equal_materialised(setup):
    """d loss / d (generative UNet params) is the same with the fused and materialised flows."""
    from flax import nnx

    model, d = setup
    t = jnp.asarray(d["timesteps"]).at[1].set(100)  # both samples inside the gate
    feats = model.reference_features(nhwc(d["ref_latent"]), t)
    image, ref, mask = nhwc(d["image"]), nhwc(d["ref_image"]), nhwc(d["mask"])
    layers = selected_layers(model.unet, (16, 12), (32, 24), LeffaLossConfig())
    graphdef, params = nnx.split(model.unet)

    def loss(params, fused):
        unet = nnx.merge(graphdef, params)
        out = unet(jnp.asarray(nhwc(d["gen_input"])), t, reference_features=feats,
                   probe=flow_probe(layers, 2.0, fused=fused))
        return leffa_loss_from_flows(out.probes, ref, image, mask, t, LeffaLossConfig())

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g1 = grad(params, True)
    g2 = grad(params, False)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g2))
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True))
    assert scale > 0 and diff <= 1e-5 * max(1.0, scale)


def test_layer_selection_sd15_full_size():
    """SD1.5 at 1024x768 (latent 128x96): the 15 layers of down 0-2 and up 1-3, mid excluded."""
    from flax import nnx

    from leffa_jax.nn.config import UNetConfig
    from leffa_jax.nn.unet import UNet

    cfg_dir = shared_path("configs", "stable-diffusion-inpainting")
    unet = nnx.eval_shape(lambda: UNet(UNetConfig.from_json(cfg_dir / "unet", in_channels=12),
                                       rngs=nnx.Rngs(0)))
    layers = selected_layers(unet, (128, 96), (1024, 768), LeffaLossConfig())
    assert unet.num_transformer_layers == 16
    assert layers == tuple(range(6)) + tuple(range(7, 16))
