"""Text-to-image speed: leffa_jax (text encoder forward, one generate call) vs transformers /
diffusers' StableDiffusionPipeline at the same settings, on the SD1.5 architecture with random
weights (no downloads: the UNet/VAE/scheduler configs of ../shared/configs/stable-diffusion-
inpainting with 4 input channels, CLIP ViT-L/14 text, the real CLIP tokenizer of the Magic
Clothing fixture).

- text encoder: one forward of the CFG batch (2B prompts of 77 tokens); JAX jitted
  (`systems.text2image.encode_text`), transformers `CLIPTextModel` under `torch.inference_mode`.
- text-to-image: `systems.text2image.generate` vs `StableDiffusionPipeline.__call__` (B prompts,
  negative prompts, CFG 7.5, the same stepper / scheduler, output_type="np"). The first JAX call
  compiles and is not timed. The VAE runs in the compute dtype on both sides.
MFU (JAX): FLOPs from XLA's cost analysis of text encoding + K guided UNet steps + decode, over
the time and the peak (`--peak-tflops`, else the GPU's table value, else (CPU) a measured
float32 matmul). Each side runs in its own subprocess.

    python benchmarks/text2image.py                    # CPU: 128x128, 2 steps, float32, batch 1
    python benchmarks/text2image.py --json out.json    # GPU: 512x512, 30 steps, bfloat16, batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    counted_flops,
    has_gpu,
    measured_matmul_tflops,
    run_side,
    time_fn,
    torch_sd_components,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
               "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
               "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}}
# CLIP ViT-L/14 text (SD1.5's text_encoder/config.json).
TEXT_ENCODER = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "hidden_act": "quick_gelu", "vocab_size": 49408,
                "max_position_embeddings": 77, "projection_dim": 768, "bos_token_id": 0,
                "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-5}
PROMPT = "a photo of a cat sitting on a red chair, studio lighting"
NEGATIVE = "blurry, low quality"


def write_config_folder(folder: str) -> str:
    """An SD1.5 text-to-image config folder (configs and tokenizer only, no weights)."""
    base = os.path.join(SHARED, "configs", "stable-diffusion-inpainting")
    for part in ("vae", "scheduler"):
        shutil.copytree(os.path.join(base, part), os.path.join(folder, part))
    with open(os.path.join(base, "unet", "config.json")) as f:
        unet = {**json.load(f), "in_channels": 4}
    os.makedirs(os.path.join(folder, "unet"))
    os.makedirs(os.path.join(folder, "text_encoder"))
    with open(os.path.join(folder, "unet", "config.json"), "w") as f:
        json.dump(unet, f)
    with open(os.path.join(folder, "text_encoder", "config.json"), "w") as f:
        json.dump(TEXT_ENCODER, f)
    shutil.copytree(os.path.join(SHARED, "fixtures", "magic_clothing", "model", "tokenizer"),
                    os.path.join(folder, "tokenizer"))
    return folder


# ----------------------------------------------------------------------------- JAX side

def jax_system(folder: str):
    """A TextToImage with random weights built from the config folder."""
    import json as json_lib

    from flax import nnx

    from leffa_jax import components
    from leffa_jax.systems import text2image_model as tm

    modules = {c.name: components.build(c, folder, rngs=nnx.Rngs(0))
               for c in tm.TEXT2IMAGE if c.name in ("unet", "vae", "text_encoder")}
    model = tm.TextToImageModel(modules, folder)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        scheduler = json_lib.load(f)
    tokenizers = {"text_encoder": tm.load_tokenizer(os.path.join(folder, "tokenizer"))}
    return tm.TextToImage(model, tokenizers, scheduler, False, 64, folder)


def jax_flops(system, args, steps: int) -> tuple[float, float]:
    """XLA-counted FLOPs (one call: text encoding (2B) + `steps` guided UNet steps + decode;
    the text encoding alone)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from leffa_jax.pipeline import cast_params
    from leffa_jax.systems import text2image as t2i

    dtype = t2i.DTYPES[args.dtype]
    graphdef, state = nnx.split(system.model)
    merge = lambda s: nnx.merge(graphdef, cast_params(s, dtype, dtype, t2i.TEXT2IMAGE))
    b, h, w = args.batch, args.height // 8, args.width // 8
    ids = jax.ShapeDtypeStruct((2 * b, 77), jnp.int32)
    x = jax.ShapeDtypeStruct((b, h, w, 4), jnp.float32)
    context = jax.ShapeDtypeStruct((2 * b, 77, 768), jnp.float32)
    encode = counted_flops(lambda s, i: t2i.encode_text(merge(s), {"text_encoder": i}, dtype),
                           state, ids) or 0.0
    step = counted_flops(lambda s, x, c: t2i.text2image_eps_fn(merge(s), 7.5, compute_dtype=dtype)(
        x, 500, (c, None, None)), state, x, context) or 0.0
    decode = counted_flops(lambda s, x: merge(s).vae.decode(x.astype(dtype)), state, x) or 0.0
    return encode + steps * step + decode, encode


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from leffa_jax.pipeline import cast_params
    from leffa_jax.systems import text2image as t2i

    system = jax_system(args.folder)
    dtype = t2i.DTYPES[args.dtype]
    kernel = "cudnn" if jax.default_backend() == "gpu" and args.dtype != "float32" else "xla"
    graphdef, state = nnx.split(system.model)
    ids = jnp.asarray(np.concatenate([
        system.tokenizers["text_encoder"]([NEGATIVE] * args.batch)["input_ids"],
        system.tokenizers["text_encoder"]([PROMPT] * args.batch)["input_ids"]]), jnp.int32)
    encode = jax.jit(lambda s, i: t2i.encode_text(
        nnx.merge(graphdef, cast_params(s, dtype, dtype, t2i.TEXT2IMAGE)),
        {"text_encoder": i}, dtype)[0])
    encode_s = time_fn(lambda: encode(state, ids), iters=args.reps * 3)
    kwargs = dict(negative_prompt=NEGATIVE, steps=args.steps, guidance=7.5, height=args.height,
                  width=args.width, scheduler=args.scheduler, dtype=args.dtype,
                  vae_dtype=args.dtype, attention_kernel=kernel)
    t0 = time.perf_counter()
    out = t2i.generate(system, [PROMPT] * args.batch, **kwargs)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        t2i.generate(system, [PROMPT] * args.batch, **kwargs)
        times.append(time.perf_counter() - t0)
    total, encode_flops = jax_flops(system, args, len(out.timesteps))
    peak = args.peak_tflops
    device = jax.devices()[0].device_kind
    for name, table in PEAK_TFLOPS.items():
        if peak is None and name in device:
            peak = table[args.dtype]
    note = None
    if peak is None:
        peak, note = measured_matmul_tflops(), "measured float32 2048^3 matmul"
    best = min(times)
    return {"side": "jax", "device": device, "backend": jax.default_backend(),
            "text_encoder_s": encode_s, "generate_s": best, "generate_times_s": times,
            "compile_and_first_s": first, "tflop_per_call": total / 1e12,
            "text_encoder_tflop": encode_flops / 1e12, "peak_tflops": peak, "peak_note": note,
            "mfu": total / best / (peak * 1e12),
            "text_encoder_mfu": encode_flops / encode_s / (peak * 1e12)}


# ----------------------------------------------------------------------------- PyTorch side

def run_torch(args) -> dict:
    import diffusers
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    unet, vae, text_encoder, tokenizer, config = torch_sd_components(args.folder)
    classes = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
               "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler"}
    scheduler = getattr(diffusers, classes[args.scheduler]).from_config(config)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    ids = tokenizer([NEGATIVE] * args.batch + [PROMPT] * args.batch, padding="max_length",
                    max_length=77, return_tensors="pt").input_ids.to(device)

    @torch.inference_mode()
    def encode():
        return text_encoder(ids)[0]

    @torch.inference_mode()
    def generate():
        return pipe([PROMPT] * args.batch, negative_prompt=[NEGATIVE] * args.batch,
                    num_inference_steps=args.steps, guidance_scale=7.5, height=args.height,
                    width=args.width, output_type="np").images

    encode_s = time_fn(encode, iters=args.reps * 3, sync=sync)
    t0 = time.perf_counter()
    generate()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        generate()
        sync(None)
        times.append(time.perf_counter() - t0)
    return {"side": "torch", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "text_encoder_s": encode_s,
            "generate_s": min(times), "generate_times_s": times, "first_s": first}


# ----------------------------------------------------------------------------- driver

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=int, default=None, help="default 512 on GPU, 128 on CPU")
    ap.add_argument("--width", type=int, default=None, help="default 512 on GPU, 128 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="default 30 on GPU, 2 on CPU")
    ap.add_argument("--batch", type=int, default=1, help="prompts per call")
    ap.add_argument("--scheduler", default="ddim", choices=("ddim", "dpmpp_2m", "unipc", "pndm"))
    ap.add_argument("--dtype", default=None, help="both sides (default bfloat16 GPU, float32 CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (default 3 GPU, 1 CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    return ap


def table(res: dict) -> str:
    a, j, t = res["args"], res["jax"], res.get("torch")
    ratio = lambda key: f"{t[key] / j[key]:.2f}x" if t else "-"
    torch_s = lambda key: f"{t[key]:.3f}" if t else "-"
    return "\n".join([
        f"SD1.5, {a['height']}x{a['width']}, batch {a['batch']}, {a['steps']} {a['scheduler']} "
        f"steps, CFG 7.5, {a['dtype']}; JAX on {j['device']}"
        + (f", PyTorch on {t['device']} ({t['threads']} threads)" if t else ""), "",
        "| what | JAX s | PyTorch s | PyTorch / JAX | JAX TFLOP | JAX MFU |", "|---|---|---|---|---|---|",
        f"| text encoder forward (2B x 77) | {j['text_encoder_s']:.4f} | {torch_s('text_encoder_s')}"
        f" | {ratio('text_encoder_s')} | {j['text_encoder_tflop']:.4f} | "
        f"{100 * j['text_encoder_mfu']:.1f}% |",
        f"| text-to-image call | {j['generate_s']:.3f} | {torch_s('generate_s')} | "
        f"{ratio('generate_s')} | {j['tflop_per_call']:.3f} | {100 * j['mfu']:.1f}% |", "",
        f"JAX compile + first call {j['compile_and_first_s']:.1f} s; peak {j['peak_tflops']:.1f} "
        f"TFLOP/s{' (' + j['peak_note'] + ')' if j.get('peak_note') else ''}"])


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.side:
        result = run_jax(args) if args.side == "jax" else run_torch(args)
        print("RESULT " + json.dumps(result))
        return 0
    gpu = has_gpu()
    args.height = args.height or (512 if gpu else 128)
    args.width = args.width or (512 if gpu else 128)
    args.steps = args.steps or (30 if gpu else 2)
    args.reps = args.reps or (3 if gpu else 1)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    results = {"args": {k: v for k, v in vars(args).items() if k not in ("side", "folder")}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_config_folder(os.path.join(tmp, "sd15"))
        for side in ("jax",) + (() if args.skip_torch else ("torch",)):
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--folder", folder]
            for key in ("height", "width", "steps", "batch", "scheduler", "dtype", "reps"):
                cmd += [f"--{key}", str(getattr(args, key))]
            if args.peak_tflops:
                cmd += ["--peak-tflops", str(args.peak_tflops)]
            results[side] = run_side(cmd, side, REPO)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
