"""Feature extraction throughput of the evaluation networks: JAX (jitted, batch sharded over all
local devices) vs the PyTorch references (pytorch-fid `InceptionV3([3])`, torchmetrics
`LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`), same random weights.

    .venv/bin/python benchmarks/metrics.py                      # CPU: batch 4, 256x192 images
    .venv/bin/python benchmarks/metrics.py --dry-run            # seconds: stem only, batch 1
    python benchmarks/metrics.py --batch 64 --size 1024x768 --json out.json   # GPU

Images/s of: Inception-v3 pool3 features (pytorch-fid convention: bilinear resize to 299 inside
the jitted function, 2x-1) and LPIPS-squeeze distances of image pairs at the given size. The
PyTorch side runs on CUDA when available, else CPU. Needs the reference packages
(`pip install --no-deps -r requirements-metrics.txt -c constraints.txt`); torchvision is
replaced by tests/torchvision_shim.py. `--json` writes {"args", "rows"} for benchmarks/gpu_suite.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from benchlib import machine, time_fn  # noqa: E402


def build_models(seed: int = 0):
    """(torch pytorch-fid InceptionV3, torch LPIPS metric, JAX Inception, JAX LPIPS), one
    random weight set per network."""
    import metrics_reference as ref
    import torch
    import torchvision_shim

    torchvision_shim.install()
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from leffa_jax.metrics import weights

    state = ref.random_inception_state(seed)
    t_inc = ref.build_pytorch_fid(state).eval()
    j_inc = weights.build(__import__("leffa_jax.metrics.inception", fromlist=["x"]).FIDInceptionV3,
                          weights.inception_flat({k: v.numpy() for k, v in state.items()}, "random"),
                          "random")
    sq = ref.random_squeezenet_state(seed + 1)
    t_lp = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    t_lp.net.net.load_state_dict(ref.torchmetrics_squeeze_keys(sq))
    import torchmetrics.functional.image.lpips as tm

    lins = torch.load(os.path.join(os.path.dirname(tm.__file__), "lpips_models", "squeeze.pth"),
                      map_location="cpu",
                      weights_only=True)
    from leffa_jax.metrics.lpips import LPIPSSqueeze

    flat = {**weights.squeezenet_flat({k: v.numpy() for k, v in sq.items()}, "random"),
            **weights.lins_flat({k: v.numpy() for k, v in lins.items()}, "squeeze.pth")}
    j_lp = weights.build(LPIPSSqueeze, flat, "random")
    return t_inc, t_lp, j_inc, j_lp


def run(args) -> list[list[str]]:
    import torch

    from leffa_jax.metrics import extract

    h, w = map(int, args.size.split("x"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = (lambda r: torch.cuda.synchronize()) if dev == "cuda" else (lambda r: r)
    t_inc, t_lp, j_inc, j_lp = build_models()
    t_inc, t_lp = t_inc.to(dev), t_lp.to(dev)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (args.batch, h, w, 3)).astype(np.float32)
    y = rng.uniform(0, 1, (args.batch, h, w, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dev)
    yt = torch.from_numpy(y.transpose(0, 3, 1, 2)).to(dev)
    rows = []

    # Inception (pytorch-fid convention), features for `dims`
    if args.dims != 2048:
        from pytorch_fid.inception import InceptionV3

        t_inc.blocks = t_inc.blocks[:InceptionV3.BLOCK_INDEX_BY_DIM[args.dims] + 1]
        t_inc.output_blocks = [InceptionV3.BLOCK_INDEX_BY_DIM[args.dims]]
        t_inc.last_needed_block = t_inc.output_blocks[0]
    inc = extract.Runner(j_inc, lambda m, a: m.pytorch_fid_features(a, args.dims))
    xs = inc.state, *extract.shard_batch((x,), extract.batch_mesh(args.batch))
    j_s = time_fn(lambda: inc._run(*xs), iters=args.iters)
    with torch.no_grad():
        def torch_features():  # pytorch-fid get_activations: pooled if not 1x1
            return torch.nn.functional.adaptive_avg_pool2d(t_inc(xt)[0], 1).flatten(1)

        t_s = time_fn(torch_features, iters=args.iters, sync=sync)
        ref_feats = torch_features().cpu().numpy()
    err = float(np.abs(np.asarray(inc(x)) - ref_feats).max() / np.abs(ref_feats).max())
    rows.append([f"Inception-v3 features ({args.dims}-d, pytorch-fid)",
                 f"batch {args.batch}, {h}x{w} -> 299x299", f"{args.batch / j_s:.1f} img/s",
                 f"{args.batch / t_s:.1f} img/s", f"{t_s / j_s:.2f}x", ""])
    print(f"  Inception rel. max error vs pytorch-fid: {err:.1e}")

    # LPIPS squeeze (pairs)
    lp = extract.Runner(j_lp, lambda m, a, b: m(a * 2 - 1, b * 2 - 1))
    ls = lp.state, *extract.shard_batch((x, y), extract.batch_mesh(args.batch))
    j_s = time_fn(lambda: lp._run(*ls), iters=args.iters)
    net = t_lp.net
    with torch.no_grad():
        t_s = time_fn(lambda: net(xt * 2 - 1, yt * 2 - 1), iters=args.iters, sync=sync)
        ref_d = net(xt * 2 - 1, yt * 2 - 1).flatten().cpu().numpy()
    err = float(np.abs(np.asarray(lp(x, y)) - ref_d).max())
    rows.append(["LPIPS-squeeze distance", f"batch {args.batch} pairs, {h}x{w}",
                 f"{args.batch / j_s:.1f} pairs/s", f"{args.batch / t_s:.1f} pairs/s",
                 f"{t_s / j_s:.2f}x", ""])
    print(f"  LPIPS max abs error vs torchmetrics: {err:.1e}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", default="256x192", help="image HxW")
    ap.add_argument("--dims", type=int, default=2048, choices=(64, 192, 768, 2048),
                    help="Inception block (pytorch-fid --dims)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true",
                    help="seconds-long smoke run: batch 1, 64x48, 192-d block, 1 iteration")
    ap.add_argument("--json", help="write {'args', 'rows'} here (GPU suite)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.batch, args.size, args.dims, args.iters = 1, "64x48", 192, 1
    import torch

    print(f"machine: {machine()}; jax devices: {jax.device_count()} x {jax.devices()[0].platform}; "
          f"torch {torch.__version__} threads {torch.get_num_threads()}")
    rows = run(args)
    print("| benchmark | setting | JAX | PyTorch | JAX speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r[:5]) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
