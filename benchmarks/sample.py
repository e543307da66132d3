"""Sampling speed: leffa_jax.pipeline vs a PyTorch pipeline doing the same two-UNet computation.

Both sides run the full SD1.5-inpainting Leffa architecture (reference UNet + generative UNet +
VAE, random weights) over the same work per call: two VAE encodes, per step the reference UNet on
[zero latent (1); reference latents (B)] and the generative UNet on the 2B CFG batch with the
reference concatenation (keys/values = [own tokens; reference tokens], queries of own tokens),
guidance + rescale, an ancestral DDPM step, one decode.

- JAX: `leffa_jax.pipeline.generate` (one compiled program; first call = compile, not timed).
- PyTorch: diffusers `UNet2DConditionModel` x2 + `AutoencoderKL` + `DDPMScheduler`, attention
  processors that record norm1 outputs (reference UNet) and attend over the concatenation
  (generative UNet, `F.scaled_dot_product_attention`), cross-attention replaced by identity,
  eager, `torch.inference_mode`. (The official code computes queries for the reference tokens
  too and runs the reference UNet on a 2B batch; this baseline skips that wasted work.)

MFU: FLOPs from XLA's cost analysis of the pieces (VAE encode, reference pass, one guided UNet
step, decode; the scan body is counted once by XLA, so the total is assembled as
encode + steps * (reference + step) + decode), divided by time and by the peak: `--peak-tflops`,
else a known value for the GPU, else (CPU) the measured throughput of a large float32 matmul.

Each side runs in its own subprocess (memory is returned between them). Sizes are flags:
    python benchmarks/sample.py                              # CPU: 128x96, 1 step, fp32
    python benchmarks/sample.py --height 1024 --width 768 --steps 30   # GPU defaults anyway
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import counted_flops, has_gpu, measured_matmul_tflops, run_side  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}


def default_config() -> str:
    for c in (
        os.path.join(REPO, "..", "shared", "configs", "stable-diffusion-inpainting"),
        os.environ.get("LEFFA_SD15_CONFIG", ""),
    ):
        if c and os.path.isdir(os.path.join(c, "unet")):
            return os.path.abspath(c)
    raise SystemExit("no SD1.5-inpainting config folder found: pass --config")


# ----------------------------------------------------------------------------- JAX side


def random_model(config: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from leffa_jax.model import LeffaModel

    model = nnx.eval_shape(lambda: LeffaModel(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def init(path, v):
        name = [p.key for p in path if hasattr(p, "key")][-1]
        if name == "scale":
            return jnp.ones(v.shape, jnp.float32)
        if name == "bias":
            return jnp.zeros(v.shape, jnp.float32)
        fan_in = int(np.prod(v.shape[:-1]))
        arr = rng.standard_normal(v.shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        return jnp.asarray(arr)

    state = jax.tree_util.tree_map_with_path(init, nnx.state(model, nnx.Param))
    nnx.update(model, state)
    jax.block_until_ready(nnx.state(model))
    return model


def piece_flops(model, b: int, h: int, w: int, dtype: str, kernel: str) -> dict[str, float]:
    """XLA cost-analysis FLOPs of one call of each pipeline piece."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from leffa_jax import pipeline as pl

    cd = pl.DTYPES[dtype]
    gd, st = nnx.split(model)
    f = model.vae.downsample_factor
    lh, lw = h // f, w // f
    img = jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)
    m1 = jax.ShapeDtypeStruct((b, h, w, 1), jnp.float32)
    lat = jax.ShapeDtypeStruct((b, lh, lw, 4), jnp.float32)
    cond2 = jax.ShapeDtypeStruct((2 * b, lh, lw, 8), jnp.float32)

    def cost(fn, *args):
        return counted_flops(fn, st, *args) or 0.0

    cast = lambda s: pl.cast_params(s, cd, jnp.float32)
    enc = cost(
        lambda s, p, g, m, d, n1, n2: pl.encode_conditions(
            nnx.merge(gd, cast(s)), p, g, m, d, n1, n2
        ),
        img,
        img,
        m1,
        img,
        lat,
        lat,
    )
    ref = cost(
        lambda s, r: pl.reference_features_both(nnx.merge(gd, cast(s)), r, 500, cd, kernel), lat
    )

    def step(s, x, c2, r):
        eps_fn = pl.leffa_eps_fn(
            nnx.merge(gd, cast(s)), r, 2.5, 2.5, compute_dtype=cd, attention_kernel=kernel
        )
        return eps_fn(x, 500, c2)

    step_total = cost(step, lat, cond2, lat)
    dec = cost(lambda s, x: nnx.merge(gd, cast(s)).decode(x), lat)
    return {"encode": enc, "reference": ref, "generative_step": step_total - ref, "decode": dec}


def run_jax(args) -> dict:
    import jax
    import numpy as np

    from leffa_jax import pipeline as pl

    t0 = time.perf_counter()
    model = random_model(args.config)
    init_s = time.perf_counter() - t0
    dev = jax.devices()[0]
    out = {
        "side": "jax",
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "dtype": args.dtype,
        "init_s": init_s,
        "runs": [],
    }
    on_gpu = jax.default_backend() == "gpu"
    kernel = "cudnn" if on_gpu and args.dtype != "float32" else "xla"
    peak = args.peak_tflops
    if peak is None:
        for k, v in PEAK_TFLOPS.items():
            if k in dev.device_kind:
                peak = v[args.dtype]
        if peak is None:
            peak = measured_matmul_tflops()
            out["peak_note"] = "measured float32 2048^3 matmul throughput"
    out["peak_tflops"] = peak
    h, w = args.height, args.width
    rng = np.random.default_rng(0)
    for b in args.batch:
        person = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
        garment = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
        mask = (rng.uniform(size=(b, h, w, 1)) > 0.5).astype(np.float32)
        dp = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
        kw = dict(
            steps=args.steps,
            guidance=2.5,
            ref_acceleration=args.ref_acceleration,
            dtype=args.dtype,
            attention_kernel=kernel,
            seed=0,
        )
        t = time.perf_counter()
        pl.generate(model, person, garment, mask, dp, **kw)
        first = time.perf_counter() - t
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            pl.generate(model, person, garment, mask, dp, **kw)
            times.append(time.perf_counter() - t)
        fl = piece_flops(model, b, h, w, args.dtype, kernel)
        n_ref = 1 if args.ref_acceleration else args.steps
        total = (
            fl["encode"]
            + n_ref * fl["reference"]
            + args.steps * fl["generative_step"]
            + fl["decode"]
        )
        best = min(times)
        out["runs"].append(
            {
                "batch": b,
                "compile_and_first_s": first,
                "times_s": times,
                "s_per_image": best / b,
                "tflop_per_call": total / 1e12,
                "flops_pieces": fl,
                "mfu": total / best / (peak * 1e12),
            }
        )
    return out


# ----------------------------------------------------------------------------- PyTorch side


def run_torch(args) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.torch_dtype
    ]
    torch.manual_seed(0)

    class Record:
        def __init__(self, store):
            self.store = store

        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            attention_mask=None,
            temb=None,
            **kw,
        ):
            self.store.append(hidden_states)
            return _attend(attn, hidden_states, hidden_states)

    class Concat:
        def __init__(self, store):
            self.store = store

        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            attention_mask=None,
            temb=None,
            **kw,
        ):
            ref = self.store.pop(0)
            return _attend(attn, hidden_states, torch.cat([hidden_states, ref], dim=1))

    class Identity:
        def __call__(self, attn, hidden_states, *a, **kw):
            return hidden_states

    def _attend(attn, x, kv):
        b, n, c = x.shape
        hd = c // attn.heads
        q = attn.to_q(x).view(b, n, attn.heads, hd).transpose(1, 2)
        k = attn.to_k(kv).view(b, -1, attn.heads, hd).transpose(1, 2)
        v = attn.to_v(kv).view(b, -1, attn.heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return attn.to_out[0](o)

    def set_procs(unet, attn1):
        unet.set_attn_processor(
            {
                k: (attn1 if k.endswith("attn1.processor") else Identity())
                for k in unet.attn_processors
            }
        )

    cfg = UNet2DConditionModel.load_config(os.path.join(args.config, "unet"))
    ref_unet = UNet2DConditionModel.from_config({**cfg, "in_channels": 4})
    gen_unet = UNet2DConditionModel.from_config({**cfg, "in_channels": 12})
    ref_unet.conv_norm_out, ref_unet.conv_out = torch.nn.Identity(), torch.nn.Identity()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(args.config, "vae")))
    for m in (ref_unet, gen_unet, vae):
        m.to(dev, dtype).eval()
    store: list = []
    set_procs(ref_unet, Record(store))
    set_procs(gen_unet, Concat(store))
    sched = DDPMScheduler.from_config(
        json.load(open(os.path.join(args.config, "scheduler", "scheduler_config.json")))
    )
    sf = vae.config.scaling_factor
    ctx = torch.zeros(1, 1, cfg["cross_attention_dim"], device=dev, dtype=dtype)

    @torch.inference_mode()
    def pipeline(person, garment, mask, dp, steps, g):
        b = person.shape[0]
        masked = person * (mask < 0.5)
        lat = vae.encode(torch.cat([masked, garment])).latent_dist.sample() * sf
        ml, rl = lat[:b], lat[b:]
        size = ml.shape[-2:]
        cond = torch.cat(
            [
                F.interpolate(mask, size=size, mode="nearest"),
                ml,
                F.interpolate(dp, size=size, mode="nearest"),
            ],
            1,
        )
        cond2 = torch.cat([cond, cond])
        ref_in = torch.cat([torch.zeros_like(rl[:1]), rl])
        sched.set_timesteps(steps, device=dev)
        x = torch.randn_like(ml)
        n = len(sched.timesteps)
        for i, t in enumerate(sched.timesteps):
            if i == 0 or not args.ref_acceleration:
                store.clear()
                tr = sched.timesteps[n // 2] if args.ref_acceleration else t
                ref_unet(ref_in, tr, encoder_hidden_states=ctx)
                feats = [torch.cat([f[:1].expand(b, -1, -1), f[1:]]) for f in store]
            store[:] = list(feats)
            eps = gen_unet(
                torch.cat([torch.cat([x, x]), cond2], 1), t, encoder_hidden_states=ctx
            ).sample.float()
            u, c = eps.chunk(2)
            e = u + g * (c - u)
            dims = list(range(1, e.ndim))
            e = (
                g * e * (c.std(dim=dims, keepdim=True) / e.std(dim=dims, keepdim=True))
                + (1 - g) * e
            )
            x = sched.step(e, t, x.float()).prev_sample.to(dtype)
        img = vae.decode(x / sf).sample
        out = ((img.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return out

    out = {
        "side": "torch",
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "dtype": args.torch_dtype,
        "threads": torch.get_num_threads(),
        "runs": [],
    }
    h, w = args.height, args.width
    for b in args.batch:
        mk = lambda c, b=b: torch.rand(b, c, h, w, device=dev, dtype=dtype) * 2 - 1
        person, garment, dp = mk(3), mk(3), mk(3)
        mask = (torch.rand(b, 1, h, w, device=dev) > 0.5).to(dtype)
        t = time.perf_counter()
        pipeline(person, garment, mask, dp, args.steps, 2.5)
        first = time.perf_counter() - t
        times = []
        for _ in range(args.reps):
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            pipeline(person, garment, mask, dp, args.steps, 2.5)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out["runs"].append(
            {"batch": b, "first_s": first, "times_s": times, "s_per_image": min(times) / b}
        )
    return out


# ----------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="SD1.5-inpainting base config folder")
    ap.add_argument("--height", type=int, default=None, help="default 1024 on GPU, 128 on CPU")
    ap.add_argument("--width", type=int, default=None, help="default 768 on GPU, 96 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="default 30 on GPU, 1 on CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=None, help="timed calls (default 3 GPU, 1 CPU)")
    ap.add_argument(
        "--dtype", default=None, help="JAX UNet dtype (default bfloat16 GPU, float32 CPU)"
    )
    ap.add_argument("--torch-dtype", default=None, help="default float16 GPU, float32 CPU")
    ap.add_argument("--ref-acceleration", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        res = run_jax(args) if args.side == "jax" else run_torch(args)
        print("RESULT " + json.dumps(res))
        return 0
    gpu = has_gpu()
    args.config = args.config or default_config()
    args.height = args.height or (1024 if gpu else 128)
    args.width = args.width or (768 if gpu else 96)
    args.steps = args.steps or (30 if gpu else 1)
    args.reps = args.reps or (3 if gpu else 1)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.torch_dtype = args.torch_dtype or ("float16" if gpu else "float32")
    results = {"args": {k: v for k, v in vars(args).items() if k != "side"}}
    for side in ("jax",) + (() if args.skip_torch else ("torch",)):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--side",
            side,
            "--config",
            args.config,
            "--height",
            str(args.height),
            "--width",
            str(args.width),
            "--steps",
            str(args.steps),
            "--reps",
            str(args.reps),
            "--dtype",
            args.dtype,
            "--torch-dtype",
            args.torch_dtype,
            "--batch",
            *map(str, args.batch),
        ]
        if args.ref_acceleration:
            cmd.append("--ref-acceleration")
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        results[side] = run_side(cmd, side, REPO)
    print(json.dumps(results, indent=1))
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def table(res: dict) -> str:
    a = res["args"]
    j = res["jax"]
    rows = [
        f"{a['height']}x{a['width']}, {a['steps']} steps, CFG, ref_acceleration="
        f"{a['ref_acceleration']}; JAX {j['dtype']} on {j['device']}"
        + (f", PyTorch {res['torch']['dtype']}" if "torch" in res else ""),
        "",
        "| batch | JAX s/image | PyTorch s/image | speed-up | JAX TFLOP/call | MFU | "
        "JAX compile+first call s |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(j["runs"]):
        t = res["torch"]["runs"][i]["s_per_image"] if "torch" in res else None
        tcol = "" if t is None else f"{t:.3f}"
        speed = "" if t is None else f"{t / r['s_per_image']:.2f}x"
        rows.append(
            f"| {r['batch']} | {r['s_per_image']:.3f} | {tcol} | {speed} | "
            f"{r['tflop_per_call']:.3f} | {100 * r['mfu']:.1f}% | "
            f"{r['compile_and_first_s']:.1f} |"
        )
    rows.append(f"\nMFU peak: {j['peak_tflops']:.3f} TFLOP/s ({j.get('peak_note', 'datasheet')})")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
