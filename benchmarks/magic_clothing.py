"""Magic Clothing speed: one sampling call of leffa_jax (`systems.magic_clothing.generate`:
garment VAE encode, the extractor once, N steps x 3 joint-guidance branches, decode) vs the
official pipeline's computation in PyTorch: two diffusers `UNet2DConditionModel`s whose attn1
processors do what the official `REFAttnProcessor2_0` does (the extractor stores norm1(h); the
denoiser computes attention over [norm1(h); garment] for ALL queries and keeps the first half),
diffusers' UniPC, the 3-branch batch [neg|0, neg|g, pos|g] and the official guidance formula.

Both sides: SD1.5 architecture with random weights (no downloads; the config folder of
benchmarks/text2image.py), same size, steps, dtype, batch. The JAX side computes queries of the
generated tokens only (exact, MAGIC_CLOTHING_REFERENCE.md 2.4): fewer attn1 FLOPs than PyTorch.
MFU (JAX): XLA-counted FLOPs of text encoding + garment encode + extractor + K 3-branch steps +
decode, over the time and the peak (the GPU's table value, else a measured float32 matmul).
Each side runs in its own subprocess.

    python benchmarks/magic_clothing.py                 # CPU: 128x96, 2 steps, float32
    python benchmarks/magic_clothing.py --dry-run       # seconds: the tiny fixture model, 32x24
    python benchmarks/magic_clothing.py --json out.json # GPU: 768x576, 20 steps, bfloat16

--json writes {"args": {...}, "rows": [[benchmark, setting, jax, baseline, ratio, MFU], ...]}
(the GPU suite's stage format) plus the raw results under "results".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import counted_flops, has_gpu, measured_matmul_tflops, run_side, torch_sd_components  # noqa: E402
from text2image import PEAK_TFLOPS, write_config_folder  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
TINY = os.path.join(SHARED, "fixtures", "magic_clothing", "model")
PROMPT = "a photography of a model, best quality, high quality"
NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
SG, ST = 2.5, 7.5


def garment_image(h: int, w: int):
    import numpy as np

    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 250, np.uint8)
    img[h // 6:5 * h // 6, w // 5:4 * w // 5] = rng.integers(0, 200, 3, dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 6:5 * h // 6, w // 5:4 * w // 5] = 255
    return img, mask


# ----------------------------------------------------------------------------- JAX side

def jax_system(folder: str, tiny: bool):
    from flax import nnx

    from leffa_jax import components
    from leffa_jax.systems import magic_clothing as mc_lib
    from leffa_jax.systems import text2image_model as tm

    if tiny:
        return mc_lib.load_magic_clothing(folder)
    modules = {c.name: components.build(c, folder, rngs=nnx.Rngs(0))
               for c in tm.TEXT2IMAGE if c.name in ("unet", "vae", "text_encoder")}
    modules["extractor"] = nnx.clone(modules["unet"])
    model = mc_lib.MagicClothingModel(modules, folder)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    tokenizers = {"text_encoder": tm.load_tokenizer(os.path.join(folder, "tokenizer"))}
    return mc_lib.MagicClothing(tm.TextToImage(model, tokenizers, scheduler, False, 64, folder),
                                None)


def jax_flops(mc, args, steps: int) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from leffa_jax.pipeline import cast_params
    from leffa_jax.systems import magic_clothing as mc_lib

    dtype = mc_lib.DTYPES[args.dtype]
    graphdef, state = nnx.split(mc.model)
    merge = lambda s: nnx.merge(graphdef, cast_params(s, dtype, dtype, mc_lib.MAGIC_CLOTHING))
    b, f = args.batch, mc.model.vae_factor
    h, w = args.height // f, args.width // f
    d = mc.model.unet.config.cross_attention_dim
    ids = jax.ShapeDtypeStruct((2 * b + 1, 77), jnp.int32)
    pixels = jax.ShapeDtypeStruct((b, args.height, args.width, 3), jnp.float32)
    null = jax.ShapeDtypeStruct((1, 77, d), jnp.float32)
    encode = counted_flops(lambda s, i, p, n: (
        mc_lib.encode_prompts(merge(s), i, dtype),
        mc_lib.garment_features(merge(s), p, n, dtype, dtype)), state, ids, pixels, null) or 0.0
    x = jax.ShapeDtypeStruct((b, h, w, 4), jnp.float32)
    ctx = jax.ShapeDtypeStruct((b, 77, d), jnp.float32)
    feats = [jax.ShapeDtypeStruct((b, hh * ww, c), jnp.float32) for (hh, ww), c in zip(
        mc.model.unet.layer_resolutions((h, w)), _layer_channels(mc.model.unet), strict=True)]

    def step(s, x, neg, pos, feats):
        fn = mc_lib.magic_clothing_eps_fn(merge(s), "joint", True, SG, ST, dtype)
        return fn(x, 500, (neg, pos, feats))

    per_step = counted_flops(step, state, x, ctx, ctx, feats) or 0.0
    decode = counted_flops(lambda s, x: merge(s).vae.decode(x.astype(dtype)), state, x) or 0.0
    return encode + steps * per_step + decode


def _layer_channels(unet) -> list[int]:
    out = []
    for blk in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for t in (blk.attentions or []):
            out += [t.proj_in.kernel.shape[-1]] * len(t.transformer_blocks)
    return out


def run_jax(args) -> dict:
    import jax

    from leffa_jax.systems import magic_clothing as mc_lib

    mc = jax_system(args.folder, args.dry_run)
    kernel = "cudnn" if jax.default_backend() == "gpu" and args.dtype != "float32" else "xla"
    img, mask = garment_image(args.height, args.width)
    kwargs = dict(garment_mask_image=mask, negative_prompt=NEGATIVE, a_prompt=None,
                  garment_scale=SG, guidance=ST, steps=args.steps, height=args.height,
                  width=args.width, num_images_per_prompt=args.batch, scheduler="unipc",
                  dtype=args.dtype, vae_dtype=args.dtype, attention_kernel=kernel)
    t0 = time.perf_counter()
    out = mc_lib.generate(mc, img, PROMPT, **kwargs)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        mc_lib.generate(mc, img, PROMPT, **kwargs)
        times.append(time.perf_counter() - t0)
    total = jax_flops(mc, args, len(out.timesteps))
    device = jax.devices()[0].device_kind
    peak, note = args.peak_tflops, None
    for name, table in PEAK_TFLOPS.items():
        if peak is None and name in device:
            peak = table[args.dtype]
    if peak is None:
        peak, note = measured_matmul_tflops(), "measured float32 2048^3 matmul"
    best = min(times)
    return {"side": "jax", "device": device, "backend": jax.default_backend(),
            "generate_s": best, "generate_times_s": times, "compile_and_first_s": first,
            "tflop_per_call": total / 1e12, "peak_tflops": peak, "peak_note": note,
            "mfu": total / best / (peak * 1e12)}


# ----------------------------------------------------------------------------- PyTorch side

class RefProcessor:
    """The official REFAttnProcessor2_0 ("read": store norm1(h); "write": attention over
    [norm1(h); garment rows] for all queries, keep the first half) with SDPA."""

    def __init__(self, name: str, store: dict, mode: str):
        self.name, self.store, self.mode = name, store, mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        import torch
        import torch.nn.functional as F

        if self.mode == "read":
            self.store[self.name] = hidden_states
            x = hidden_states
        else:
            x = torch.cat([hidden_states, self.store["rows:" + self.name]], dim=1)
        b, n, _ = x.shape
        heads = attn.heads
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q, k, v = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        if self.mode == "write":
            o = o.chunk(2, dim=1)[0]
        return attn.to_out[1](attn.to_out[0](o))


def run_torch(args) -> dict:
    import copy

    import diffusers
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    unet, vae, text_encoder, tokenizer, config = torch_sd_components(args.folder)
    extractor = copy.deepcopy(unet)
    store: dict = {}
    for model, mode in ((unet, "write"), (extractor, "read")):
        model.set_attn_processor({name: RefProcessor(name, store, mode) if "attn1" in name
                                  else AttnProcessor2_0() for name in model.attn_processors})
    for m in (unet, extractor, vae, text_encoder):
        m.to(device, dtype).eval()
    scheduler = diffusers.UniPCMultistepScheduler.from_config(config)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    img, mask = garment_image(args.height, args.width)
    b = args.batch
    sf = vae.config.scaling_factor

    @torch.inference_mode()
    def generate():
        ids = tokenizer([NEGATIVE, PROMPT, ""], padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        neg, pos, null = text_encoder(ids)[0].chunk(3)
        cloth = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        cloth = (cloth * torch.from_numpy(mask > 127)[None, None]).half().to(device, dtype)
        z_g = vae.encode(torch.cat([cloth] * b)).latent_dist.mode() * sf
        extractor(z_g, 0, torch.cat([null] * b))
        for name in list(store):
            if not name.startswith("rows:"):
                r = store[name]
                store["rows:" + name] = torch.cat([torch.zeros_like(r), r, r])
        context = torch.cat([neg] * b + [neg] * b + [pos] * b)
        generator = torch.Generator(device).manual_seed(0)
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        latents = torch.randn((b, 4, args.height // f, args.width // f), generator=generator,
                              device=device, dtype=dtype)
        scheduler.set_timesteps(args.steps, device=device)
        for t in scheduler.timesteps:
            eps = unet(torch.cat([latents] * 3), t, context).sample
            u, c, txt = eps.chunk(3)
            guided = u + ST * (txt - c) + SG * (c - u)
            latents = scheduler.step(guided, t, latents).prev_sample
        image = vae.decode(latents / sf).sample
        return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

    generate()
    sync()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        generate()
        sync()
        times.append(time.perf_counter() - t0)
    return {"side": "torch", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "generate_s": min(times),
            "generate_times_s": times, "diffusers": diffusers.__version__}


# ----------------------------------------------------------------------------- driver

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=int, default=None, help="768 GPU, 128 CPU, 32 dry run")
    ap.add_argument("--width", type=int, default=None, help="576 GPU, 96 CPU, 24 dry run")
    ap.add_argument("--steps", type=int, default=None, help="20 GPU, 2 CPU / dry run")
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--dtype", default=None, help="both sides (bfloat16 GPU, float32 CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (3 GPU, 1 CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="the tiny fixture model at 32x24, 2 steps: checks the script in seconds")
    ap.add_argument("--json", help="write the GPU-suite rows and the results here")
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    return ap


def rows(res: dict) -> list[list[str]]:
    a, j, t = res["args"], res["jax"], res.get("torch")
    setting = (f"{a['height']}x{a['width']}, batch {a['batch']}, {a['steps']} UniPC steps x 3 "
               f"branches, {a['dtype']}")
    return [["Magic Clothing sampling call", setting, f"{j['generate_s']:.3f} s",
             f"{t['generate_s']:.3f} s" if t else "-",
             f"{t['generate_s'] / j['generate_s']:.2f}x" if t else "",
             f"{100 * j['mfu']:.1f} %"]]


def table(res: dict) -> str:
    j, t = res["jax"], res.get("torch")
    head = (f"JAX on {j['device']}" + (f", PyTorch (diffusers {t['diffusers']}) on {t['device']} "
                                       f"({t['threads']} threads)" if t else ""))
    body = ["| benchmark | setting | JAX | PyTorch | PyTorch / JAX | JAX MFU |",
            "|---|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows(res)]
    return "\n".join([head, "", *body, "",
                      f"JAX compile + first call {j['compile_and_first_s']:.1f} s; "
                      f"{j['tflop_per_call']:.4f} TFLOP per call; peak {j['peak_tflops']:.1f} "
                      f"TFLOP/s{' (' + j['peak_note'] + ')' if j.get('peak_note') else ''}"])


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.side:
        result = run_jax(args) if args.side == "jax" else run_torch(args)
        print("RESULT " + json.dumps(result))
        return 0
    gpu = has_gpu() and not args.dry_run
    args.height = args.height or (32 if args.dry_run else 768 if gpu else 128)
    args.width = args.width or (24 if args.dry_run else 576 if gpu else 96)
    args.steps = args.steps or (20 if gpu else 2)
    args.reps = args.reps or (3 if gpu else 1)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    results = {"args": {k: v for k, v in vars(args).items() if k not in ("side", "folder")}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = TINY if args.dry_run else write_config_folder(os.path.join(tmp, "sd15"))
        for side in ("jax",) + (() if args.skip_torch else ("torch",)):
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--folder", folder]
            for key in ("height", "width", "steps", "batch", "dtype", "reps"):
                cmd += [f"--{key}", str(getattr(args, key))]
            if args.dry_run:
                cmd.append("--dry-run")
            if args.peak_tflops:
                cmd += ["--peak-tflops", str(args.peak_tflops)]
            results[side] = run_side(cmd, side, REPO)
    print(table(results))
    if args.json:
        out = {"args": results["args"], "rows": rows(results), "results": results}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
