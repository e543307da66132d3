"""Face-diffuser speed: the SNF sampling loop of leffa_jax (`systems.face_diffuser.sample_latents`:
PNDM/PLMS over N + 1 loop steps, TDM alone, both fused by saliency, SDM alone) vs the same
computation in PyTorch (two diffusers `UNet2DConditionModel`s, diffusers' PNDMScheduler and the
official SNF operations: AvgPool2d(4, 1, 1), bilinear resize back, channel mean, per-model
softmax, argmax, gather), and the stage-2 batching choice of the JAX side: the two guided UNet
calls as two batch-2n calls ("two_calls", the official way) or one call vmapped over the stacked
parameters of both models ("stacked").

Stage 2 costs four UNet evaluations per step (two models x two guidance branches). Text
encoding, subject encoding and decoding run once per call and are left out on both sides (the
loop dominates: 2 x (N + 1) UNet evaluations plus 2 per stage-2 step). Weights are random (no
downloads), independently initialised on each side, same architecture, size, steps, dtype.
Each side runs in its own subprocess.

    python benchmarks/face_diffuser.py --dry-run     # seconds: tiny fixture UNets, 8x8 latents
    python benchmarks/face_diffuser.py               # CPU: tiny fixture UNets, 64x64, 8 steps
    python benchmarks/face_diffuser.py --sd15 --steps 20 --dtype bfloat16   # GPU: SD1.5 UNets

`gpu_stage(budget_s)` runs the GPU setting and returns the rows for benchmarks/gpu_suite.py:
[benchmark, setting, jax s, baseline s, baseline / jax, MFU (None)].
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
TINY_UNET = os.path.join(SHARED, "fixtures", "face_diffuser", "config", "base_sd15", "unet")
SD15_UNET = os.path.join(SHARED, "configs", "stable-diffusion-inpainting", "unet")
SCHEDULER = os.path.join(SHARED, "fixtures", "face_diffuser", "config", "base_sd15",
                         "scheduler", "scheduler_config.json")


def unet_config(sd15: bool) -> dict:
    with open(os.path.join(SD15_UNET if sd15 else TINY_UNET, "config.json")) as f:
        return {**json.load(f), "in_channels": 4}


def stages(steps: int) -> tuple[int, int]:
    """merge_start, merge_end at the official 15/50, 30/50 proportions."""
    return max(0, round(steps * 0.3)), max(0, round(steps * 0.6))


# ----------------------------------------------------------------------------- JAX side

def run_jax(args) -> dict:
    import tempfile

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from leffa_jax.nn.config import UNetConfig
    from leffa_jax.nn.unet import UNet
    from leffa_jax.systems import face_diffuser as fd

    config = unet_config(args.sd15)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        cfg = UNetConfig.from_json(folder)

    class Pair(nnx.Module):
        def __init__(self):
            self.tdm_unet = UNet(cfg, rngs=nnx.Rngs(0))
            self.sdm_unet = UNet(cfg, rngs=nnx.Rngs(1))

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    graphdef, state = nnx.split(Pair())
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                         else x, state)
    with open(SCHEDULER) as f:
        stepper = fd.stepper_from_config(json.load(f), "pndm", args.steps)
    n, h = args.batch, args.latent
    d = config["cross_attention_dim"]
    key = jax.random.key(0)
    conditions = (jax.random.normal(key, (2 * n, 77, d)),
                  jax.random.normal(jax.random.fold_in(key, 1), (2 * n, 77, d)))
    noise = jax.random.normal(jax.random.fold_in(key, 2), (n, h, h, 4))
    s1, s2 = stages(args.steps)
    out = {}
    for mode in args.modes:
        opts = fd.LoopOptions(s1, s2, dtype, args.attention_kernel, mode)

        def call(opts=opts):
            return fd.sample_latents(graphdef, state, conditions, noise, stepper,
                                     jnp.float32(5.0), None, opts=opts)[0]

        t0 = time.perf_counter()
        jax.block_until_ready(call())
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
        out[mode] = {"seconds": sorted(times)[len(times) // 2], "first_call_s": compile_s}
    out["device"] = jax.devices()[0].device_kind
    out["unet_calls"] = int(2 * stepper.num_steps + 2 * (s2 - s1))
    return out


# ----------------------------------------------------------------------------- PyTorch side

def run_torch(args) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import PNDMScheduler, UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.float16}[args.dtype]
    config = {k: v for k, v in unet_config(args.sd15).items() if not k.startswith("_")}
    torch.manual_seed(0)
    tdm = UNet2DConditionModel(**config).to(device, dtype).eval()
    sdm = UNet2DConditionModel(**config).to(device, dtype).eval()
    with open(SCHEDULER) as f:
        scheduler = PNDMScheduler.from_config(json.load(f))
    n, h, w_scale = args.batch, args.latent, 5.0
    d = config["cross_attention_dim"]
    e_t = torch.randn(2 * n, 77, d, device=device, dtype=dtype)
    e_s = torch.randn(2 * n, 77, d, device=device, dtype=dtype)
    s1, s2 = stages(args.steps)
    pool = torch.nn.AvgPool2d(4, stride=1, padding=1)

    def snf(eps_t, eps_s, delta_t, delta_s):
        a = torch.abs(torch.stack([delta_t, delta_s])).reshape(-1, 4, h, h)
        q = F.interpolate(pool(a), (h, h), mode="bilinear", align_corners=False)
        sal = q.reshape(2, -1, 4, h, h).mean(2, keepdim=True).repeat(1, 1, 4, 1, 1)
        sal = torch.softmax(sal.reshape(2, -1, 4, h * h), -1).reshape(2, -1, 4, h, h)
        mask = torch.argmax(sal, 0, keepdim=True)
        return torch.gather(torch.stack([eps_t, eps_s]), 0, mask)[0]

    @torch.no_grad()
    def loop():
        scheduler.set_timesteps(args.steps)
        z = torch.randn(n, 4, h, h, device=device, dtype=dtype)
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([z, z])
            if i <= s2:
                u, c = tdm(x, t, e_t).sample.chunk(2)
                eps_t, delta_t = u + w_scale * (c - u), w_scale * (c - u)
            if i > s1:
                u, c = sdm(x, t, e_s).sample.chunk(2)
                eps_s, delta_s = u + w_scale * (c - u), w_scale * (c - u)
            eps = eps_t if i <= s1 else eps_s if i > s2 else snf(eps_t, eps_s, delta_t, delta_s)
            z = scheduler.step(eps, t, z).prev_sample
        return z

    def timed():
        t0 = time.perf_counter()
        loop()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed()
    times = sorted(timed() for _ in range(args.iters))
    return {"seconds": times[len(times) // 2], "device": device}


# ----------------------------------------------------------------------------- driver

def side(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", name, "--steps", str(args.steps),
           "--latent", str(args.latent), "--batch", str(args.batch), "--iters", str(args.iters),
           "--dtype", args.dtype, "--attention-kernel", args.attention_kernel,
           "--modes", *args.modes] + (["--sd15"] if args.sd15 else [])
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=args.timeout)
    if r.returncode:
        raise RuntimeError(f"{name} side failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rows(args, jax_res: dict, torch_res: dict) -> list[list]:
    evals = jax_res["unet_calls"]
    setting = (f"{'SD1.5' if args.sd15 else 'tiny'} UNets, latent {args.latent}^2, batch "
               f"{args.batch}, PNDM {args.steps} steps ({evals} UNet evaluations), "
               f"{args.dtype}, JAX attention {args.attention_kernel}")
    out = []
    base = torch_res["seconds"]
    for mode in args.modes:
        t = jax_res[mode]["seconds"]
        out.append([f"Face-diffuser SNF loop ({mode})", setting, round(t, 4), round(base, 4),
                    round(base / t, 2), None])
    return out


def gpu_stage(budget_s: float = 300.0) -> list[list]:
    """The GPU-suite stage: SD1.5-size UNets, 512 px (64x64 latents), 20 steps, bfloat16 (JAX)
    vs float16 (PyTorch), both stage-2 batching choices."""
    args = parse(["--sd15", "--steps", "20", "--latent", "64", "--dtype", "bfloat16",
                  "--iters", "3"])
    args.timeout = budget_s
    return rows(args, side("jax", args), side("torch", args))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny UNets, 8x8 latents, 3 steps")
    ap.add_argument("--sd15", action="store_true", help="SD1.5-size UNets (GPU)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="images per call (n)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="JAX compute dtype (PyTorch: float32 / float16)")
    ap.add_argument("--modes", nargs="+", default=["two_calls", "stacked"],
                    choices=("two_calls", "stacked"))
    ap.add_argument("--attention-kernel", default="xla",
                    help="the JAX side's kernel (leffa_jax.nn.attention.ATTENTION_KERNELS)")
    ap.add_argument("--json", default=None, help="write {args, rows} here")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.steps, args.latent, args.iters = 3, 8, 1
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.side:
        result = run_jax(args) if args.side == "jax" else run_torch(args)
        print(json.dumps(result))
        return 0
    jax_res, torch_res = side("jax", args), side("torch", args)
    table = rows(args, jax_res, torch_res)
    print("| benchmark | setting | JAX s | PyTorch s | PyTorch / JAX |")
    print("|---|---|---|---|---|")
    for r in table:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")
    print(f"JAX device {jax_res['device']}, first call (compile) "
          + ", ".join(f"{m} {jax_res[m]['first_call_s']:.1f} s" for m in args.modes)
          + f"; PyTorch device {torch_res['device']}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"args": vars(args), "rows": table,
                       "results": {"jax": jax_res, "torch": torch_res}}, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
