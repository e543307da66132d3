"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph) as a Flax NNX module, NHWC.

One network, two input conventions, as the two FID packages the authors run:
- `pytorch_fid_features(images01)`: pytorch-fid `InceptionV3([3])` (resize_input, normalize_input):
  images in [0,1] -> torch bilinear resize to 299x299 (align_corners=False) -> 2x-1 -> pool3.
- `clean_fid_features(images255)`: clean-fid "clean" mode on images already resized to 299x299
  by `resize.clean_fid_resize` (PIL bicubic on float32, no re-quantisation): (x-128)/128 -> pool3.

Structure = pytorch-fid's `fid_inception_v3()` (torchvision Inception3 with FIDInceptionA/C/E_1/E_2:
average pools exclude padding; Mixed_7c's pool branch is a max pool). Module names mirror
pytorch-fid's state dict (`Mixed_5b.branch1x1.conv.weight` ...); `weights.py` also converts
clean-fid's TorchScript (`layers.mixed.tower.conv.weight` ...). Output (B, 2048) float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from leffa_jax.metrics import ops

BN_EPS = 1e-3
DIMS = (64, 192, 768, 2048)  # pytorch-fid's --dims (block outputs)


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm (eval, eps 1e-3) -> ReLU; (B,H,W,cin) -> (B,H',W',cout)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
        kh, kw = ops.pair(kernel)
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kh, kw, cin, cout), jnp.float32))
        self.scale = nnx.Param(jnp.ones((cout,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.var = nnx.Param(jnp.ones((cout,), jnp.float32))
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        y = ops.conv2d(x, self.kernel[...], self.stride, self.padding)
        y = (y - self.mean[...]) / jnp.sqrt(self.var[...] + BN_EPS) * self.scale[...] + self.bias[...]
        return jax.nn.relu(y)


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, *, rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(ops.avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], -1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, *, rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, ops.max_pool(x, 3, 2)], -1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, *, rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        bp = self.branch_pool(ops.avg_pool_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b7, d, bp], -1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, *, rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return jnp.concatenate([b3, b7, ops.max_pool(x, 3, 2)], -1)


class InceptionE(nnx.Module):
    """`max_pool_branch`: pytorch-fid's FIDInceptionE_2 (Mixed_7c) pools with max, E_1 with avg."""

    def __init__(self, cin: int, max_pool_branch: bool, *, rngs):
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.max_pool_branch = max_pool_branch

    def __call__(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (ops.max_pool(x, 3, 1, pad=1) if self.max_pool_branch
                  else ops.avg_pool_exclude_pad(x))
        return jnp.concatenate([
            self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], -1)


class FIDInceptionV3(nnx.Module):
    """(B, 299, 299, 3) in [-1, 1] -> pool3 features (B, 2048)."""

    def __init__(self, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)

    def __call__(self, x: jax.Array, dims: int = 2048) -> jax.Array:
        """Spatially averaged output of pytorch-fid's block for `dims` (64: first max pool,
        192: second max pool, 768: Mixed_6e, 2048: pool3); only the needed layers run."""
        if dims not in DIMS:
            raise ValueError(f"Inception feature dims must be one of {DIMS}, got {dims}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = ops.max_pool(x, 3, 2)
        if dims == 64:
            return jnp.mean(x, axis=(1, 2))
        x = ops.max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        if dims == 192:
            return jnp.mean(x, axis=(1, 2))
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"):
            x = getattr(self, f"Mixed_{name}")(x)
        if dims == 768:
            return jnp.mean(x, axis=(1, 2))
        for name in ("7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return jnp.mean(x, axis=(1, 2))

    def pytorch_fid_features(self, images01: jax.Array, dims: int = 2048) -> jax.Array:
        """pytorch-fid: (B,H,W,3) in [0,1] -> bilinear 299x299 -> 2x-1 -> (B, dims)."""
        x = ops.resize_bilinear_torch(images01.astype(jnp.float32), 299, 299)
        return self(2 * x - 1, dims)

    def clean_fid_features(self, images255: jax.Array) -> jax.Array:
        """clean-fid "clean": (B,299,299,3) in [0,255], already resized -> (x-128)/128 -> (B, 2048)."""
        if images255.shape[1:3] != (299, 299):
            raise ValueError(f"clean-fid features need 299x299 inputs (resize.clean_fid_resize), "
                             f"got {images255.shape[1:3]}")
        return self((images255.astype(jnp.float32) - 128) / 128)
