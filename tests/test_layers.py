"""Conv2d against torch.nn.functional.conv2d on both lowering paths (lax conv and the CPU
patches @ kernel matmul used for small maps)."""

import numpy as np
import pytest
from flax import nnx
from torch_reference import torch

from leffa_jax.nn import layers


@pytest.mark.parametrize("path", ["conv_general_dilated", "matmul"])
@pytest.mark.parametrize("kernel,stride,padding,hw", [
    (3, 1, 1, (2, 2)),                  # the SD UNet's lowest level at a 128x96 image
    (3, 1, 1, (5, 3)),
    (3, 2, 1, (7, 6)),                  # UNet Downsample2D
    (3, 2, ((0, 1), (0, 1)), (8, 6)),   # VAE Downsample2D (asymmetric pad, then stride 2)
    (1, 1, 0, (4, 3)),
    (3, 1, 0, (5, 4)),
])
def test_conv2d_matches_torch(monkeypatch, path, kernel, stride, padding, hw):
    monkeypatch.setattr(layers, "CPU_MATMUL_CONV_MAX_PIXELS", 0 if path != "matmul" else 10 ** 9)
    rng = np.random.default_rng(0)
    cin, cout = 6, 5
    conv = layers.Conv2d(cin, cout, kernel, stride=stride, padding=padding, rngs=nnx.Rngs(0))
    conv.bias[...] = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((2, *hw, cin)).astype(np.float32)
    got = np.asarray(conv(x))

    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    (pt, pb), (pl, pr) = conv.padding
    xt = torch.nn.functional.pad(xt, (pl, pr, pt, pb))
    wt = torch.from_numpy(np.array(conv.kernel[...])).permute(3, 2, 0, 1)
    want = torch.nn.functional.conv2d(xt, wt, torch.from_numpy(np.array(conv.bias[...])),
                                      stride=stride).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
