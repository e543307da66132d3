"""LPIPS with the SqueezeNet-1.1 backbone, as torchmetrics
`LearnedPerceptualImagePatchSimilarity(net_type="squeeze")` (= `lpips.LPIPS(net="squeeze")`).

Inputs NHWC in [-1, 1] (VtonEval maps [0,1] images with 2x-1). Steps: ScalingLayer
((x - shift) / scale), SqueezeNet `features` cut after modules 1, 4, 7, 9, 10, 11, 12 (7 maps:
64, 128, 256, 384, 384, 512, 512 channels), each map unit-normalised over channels
(x / sqrt(1e-8 + sum x^2)), squared difference, the learned 1x1 `lin{k}` (no bias, one output),
spatial mean, summed over the 7 layers -> (B,). Max pools use ceil_mode like torchvision.
Module names: `net.conv0` = features.0, `net.fire{i}` = features.{i}, `lins[k]` = lin{k}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.metrics import ops

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
# (in, squeeze, expand) of the Fire modules at torchvision `features` indices 3..12.
FIRES = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128),
         9: (256, 48, 192), 10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}


class Conv(nnx.Module):
    """torch Conv2d with bias (or none): kernel (kh, kw, I, O)."""

    def __init__(self, cin: int, cout: int, k: int, *, stride=1, padding=0, use_bias=True,
                 rngs: nnx.Rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (k, k, cin, cout)))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32)) if use_bias else None
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        y = ops.conv2d(x, self.kernel[...], self.stride, self.padding)
        return y if self.bias is None else y + self.bias[...]


class Fire(nnx.Module):
    def __init__(self, cin: int, squeeze: int, expand: int, *, rngs):
        self.squeeze = Conv(cin, squeeze, 1, rngs=rngs)
        self.expand1x1 = Conv(squeeze, expand, 1, rngs=rngs)
        self.expand3x3 = Conv(squeeze, expand, 3, padding=1, rngs=rngs)

    def __call__(self, x):
        s = jax.nn.relu(self.squeeze(x))
        return jnp.concatenate([jax.nn.relu(self.expand1x1(s)), jax.nn.relu(self.expand3x3(s))], -1)


class SqueezeFeatures(nnx.Module):
    """torchvision squeezenet1_1().features, returning LPIPS's 7 relu maps."""

    def __init__(self, *, rngs):
        self.conv0 = Conv(3, 64, 3, stride=2, rngs=rngs)
        for i, cfg in FIRES.items():
            setattr(self, f"fire{i}", Fire(*cfg, rngs=rngs))

    def __call__(self, x) -> list[jax.Array]:
        h1 = jax.nn.relu(self.conv0(x))
        h2 = self.fire4(self.fire3(ops.max_pool(h1, 3, 2, ceil_mode=True)))
        h3 = self.fire7(self.fire6(ops.max_pool(h2, 3, 2, ceil_mode=True)))
        h4 = self.fire9(ops.max_pool(h3, 3, 2, ceil_mode=True))
        h5 = self.fire10(h4)
        h6 = self.fire11(h5)
        h7 = self.fire12(h6)
        return [h1, h2, h3, h4, h5, h6, h7]


def _unit(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    return x / jnp.sqrt(eps + jnp.sum(x ** 2, axis=-1, keepdims=True))


class LPIPSSqueeze(nnx.Module):
    """lpips(img0, img1): (B,H,W,3) in [-1,1] twice -> (B,) distances."""

    def __init__(self, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.net = SqueezeFeatures(rngs=rngs)
        self.lins = nnx.List([Conv(c, 1, 1, use_bias=False, rngs=rngs) for c in CHANNELS])

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The 7 unit-normalised SqueezeNet maps of (B,H,W,3) images in [-1, 1]."""
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        return [_unit(h) for h in self.net((x.astype(jnp.float32) - shift) / scale)]

    def distance(self, feats0: list[jax.Array], feats1: list[jax.Array]) -> jax.Array:
        total = 0.0
        for lin, a, b in zip(self.lins, feats0, feats1, strict=True):
            total = total + jnp.mean(lin((a - b) ** 2), axis=(1, 2, 3))
        return total

    def __call__(self, img0: jax.Array, img1: jax.Array) -> jax.Array:
        if img0.shape != img1.shape:
            raise ValueError(f"LPIPS needs images of one shape, got {img0.shape} and {img1.shape}")
        return self.distance(self.features(img0), self.features(img1))
