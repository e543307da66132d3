"""Full-size SD1.5(-inpainting) UNet forward: jitted JAX vs PyTorch, same weights, same process.

    .venv/bin/python benchmarks/unet_forward.py                 # CPU: 32x24 latent, fp32
    python benchmarks/unet_forward.py --latent 128x96 --dtype bfloat16 --batch 2   # GPU

Prints seconds per call for both, the ratio (PyTorch / JAX, > 1 means JAX is faster), XLA's
counted FLOPs and, on a known accelerator, MFU. Weights are random (perturbed), built once in
torch and converted, so both sides compute exactly the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from benchlib import counted_flops, device_peak_flops, machine, time_fn  # noqa: E402

from leffa_jax.weights.leaf_rules import torch_to_flax_leaf  # noqa: E402
from leffa_jax.weights.modules import module_from_flat  # noqa: E402

CFG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "configs",
                   "stable-diffusion-inpainting")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.environ.get("LEFFA_SD15_CONFIG", CFG))
    ap.add_argument("--latent", default="32x24", help="latent HxW (image / 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--kernel", default="xla", help="attention kernel (xla|dot_product|cudnn)")
    ap.add_argument("--json", help="also write the figures here (JSON)")
    args = ap.parse_args()
    import diffusers
    import torch

    h, w = map(int, args.latent.split("x"))
    cfg = json.load(open(os.path.join(args.config, "unet", "config.json")))
    torch.manual_seed(0)
    tu = diffusers.UNet2DConditionModel.from_config(cfg).eval()
    flat = dict(torch_to_flax_leaf(k, v.numpy()) for k, v in tu.state_dict().items())
    fu = module_from_flat("unet", args.config, flat, cfg["in_channels"])
    del flat
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, args.dtype)
    tu = tu.to(dev, tdtype)
    jdtype = jnp.dtype(args.dtype)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, h, w, cfg["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((args.batch, 77, cfg["cross_attention_dim"])).astype(np.float32)
    t = np.full((args.batch,), 500)

    graphdef, state = nnx.split(fu)
    state = jax.tree.map(lambda a: a.astype(jdtype), state)

    def forward(state, x, t, ctx):
        return nnx.merge(graphdef, state)(x.astype(jdtype), t, ctx.astype(jdtype),
                                          attention_kernel=args.kernel).sample

    jax_fwd = jax.jit(forward)
    xj, tj, cj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)
    flops = counted_flops(forward, state, xj, tj, cj)
    tj_s = time_fn(lambda: jax_fwd(state, xj, tj, cj), iters=args.iters)

    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dev, tdtype)
    ct = torch.from_numpy(ctx).to(dev, tdtype)
    tt = torch.from_numpy(t).to(dev)
    sync = (lambda r: torch.cuda.synchronize()) if dev == "cuda" else (lambda r: r)
    with torch.no_grad():
        tt_s = time_fn(lambda: tu(xt, tt, encoder_hidden_states=ct).sample, iters=args.iters,
                       sync=sync)
        err = float(np.abs(tu(xt, tt, encoder_hidden_states=ct).sample.float().cpu().numpy()
                           .transpose(0, 2, 3, 1)
                           - np.asarray(jax_fwd(state, xj, tj, cj), np.float32)).max())

    print(f"machine: {machine()}; torch {torch.__version__} on {dev}, "
          f"threads {torch.get_num_threads()}")
    print(f"SD1.5 UNet forward, batch {args.batch}, latent {h}x{w}, {args.dtype}, "
          f"attention kernel {args.kernel}")
    print(f"  JAX (jit)  : {tj_s * 1e3:9.1f} ms/call")
    print(f"  PyTorch    : {tt_s * 1e3:9.1f} ms/call")
    print(f"  ratio      : {tt_s / tj_s:9.2f}x (PyTorch time / JAX time)")
    print(f"  max |JAX - PyTorch| = {err:.2e}")
    peak = device_peak_flops()
    mfu = flops / tj_s / peak if flops and peak else None
    if flops:
        print(f"  XLA FLOPs  : {flops / 1e12:.3f} TFLOP/call -> {flops / tj_s / 1e12:.2f} TFLOP/s")
        if mfu is not None:
            print(f"  MFU        : {100 * mfu:.1f} % of {peak / 1e12:.0f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "latent": [h, w], "batch": args.batch,
                       "dtype": args.dtype, "kernel": args.kernel, "jax_s": tj_s,
                       "torch_s": tt_s, "flops": flops, "mfu": mfu, "max_abs_diff": err}, f)


if __name__ == "__main__":
    main()
