"""3x3 convolution, forward and gradient: XLA (jax.lax.conv_general_dilated, NHWC) vs PyTorch
(F.conv2d, NCHW), same shapes, same process, float32. Explains the CPU ratios of the UNet,
sampling and training benchmarks (XLA:CPU convolutions vs PyTorch's oneDNN); on GPU both sides
call cuDNN.

    python benchmarks/conv.py                 # SD UNet / VAE shapes at small images
    python benchmarks/conv.py --shapes 64x48x320 32x24x640
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import time_fn  # noqa: E402

# (h, w, channels): the SD1.5 UNet's levels at 16x12 and 32x24 latents (128x96 and 256x192
# images), and VAE levels
DEFAULT_SHAPES = ("2x2x1280", "4x3x1280", "8x6x1280", "8x6x640", "16x12x320", "32x24x320",
                  "64x48x128", "128x96x64")


def measure(shape: str, iters: int) -> list[float]:
    """Median seconds: [fwd XLA conv, fwd XLA patches@kernel, fwd torch, grad x the same 3]."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from leffa_jax.nn.layers import conv_as_matmul

    def conv(a, b):
        return jax.lax.conv_general_dilated(a, b, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def matmul(a, b):
        return conv_as_matmul(a, b, 1, ((1, 1), (1, 1)))

    h, w, c = (int(v) for v in shape.lower().split("x"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, h, w, c), np.float32)
    k = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)
    xj, kj = jnp.asarray(x), jnp.asarray(k)
    xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    kt = torch.tensor(k).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
    want = F.conv2d(xt, kt, padding=1).detach().permute(0, 2, 3, 1).numpy()
    fwd, grad = {}, {}
    for name, f in (("conv", conv), ("matmul", matmul)):
        fwd[name] = jax.jit(f)
        grad[name] = jax.jit(jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) ** 2), argnums=(0, 1)))
        # same function on every side, so the timings compare like with like
        np.testing.assert_allclose(np.asarray(fwd[name](xj, kj)), want, atol=1e-3)

    def torch_fwd():
        with torch.no_grad():
            return F.conv2d(xt, kt, padding=1)

    def torch_grad():
        xt.grad = kt.grad = None
        (F.conv2d(xt, kt, padding=1) ** 2).sum().backward()
        return xt.grad

    done = lambda r: r  # noqa: E731  (torch CPU calls return when the work is done)
    return [time_fn(lambda: fwd["conv"](xj, kj), iters=iters),
            time_fn(lambda: fwd["matmul"](xj, kj), iters=iters),
            time_fn(torch_fwd, iters=iters, sync=done),
            time_fn(lambda: grad["conv"](xj, kj), iters=iters),
            time_fn(lambda: grad["matmul"](xj, kj), iters=iters),
            time_fn(torch_grad, iters=iters, sync=done)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="HxWxC, batch 1")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)

    import jax
    import torch

    print(f"JAX {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); median ms of {args.iters}\n")
    print("| h x w x c | fwd: XLA conv / XLA patches@kernel / torch ms | fwd ratio conv, matmul |"
          " grad: XLA conv / XLA patches@kernel / torch ms | grad ratio conv, matmul |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        t = measure(shape, args.iters)
        f, g = t[:3], t[3:]
        print(f"| {shape} | {' / '.join(f'{v * 1e3:.2f}' for v in f)} | "
              f"{f[0] / f[2]:.2f}x, {f[1] / f[2]:.2f}x | "
              f"{' / '.join(f'{v * 1e3:.2f}' for v in g)} | {g[0] / g[2]:.2f}x, {g[1] / g[2]:.2f}x |")
    print("\nratio = XLA time / torch time (> 1: XLA slower). leffa_jax's Conv2d takes the patches"
          " @ kernel path on the CPU backend when the output has <= "
          "leffa_jax.nn.layers.CPU_MATMUL_CONV_MAX_PIXELS pixels.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
