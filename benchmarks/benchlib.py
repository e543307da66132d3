"""Shared helpers for benchmark scripts: timing, FLOPs from XLA, peak FLOP/s per device."""

from __future__ import annotations

import contextlib
import statistics
import time

import jax


def device_peak_flops() -> float | None:
    """Dense peak FLOP/s of one device for MFU (the trainer's table, leffa_jax.observe)."""
    from leffa_jax.observe import peak_flops_per_device

    return peak_flops_per_device()


def time_fn(fn, *, warmup: int = 1, iters: int = 5, sync=None) -> float:
    """Median seconds per call; `sync(result)` blocks until the work is done."""
    sync = sync or jax.block_until_ready
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def reference_conv_lowering():
    """Trace convolutions as `conv_general_dilated` (the GPU/TPU lowering) even on CPU, where
    leffa_jax.nn.layers.Conv2d otherwise runs small ones as patches @ kernel matmuls. FLOP counts
    taken inside are the same on every backend: XLA counts only the taps that touch the input
    (no zero padding), a little below PyTorch's counter (kernel area x output size) on small maps
    and the same on large ones."""
    from leffa_jax.nn import layers

    old = layers.CPU_MATMUL_CONV_MAX_PIXELS
    layers.CPU_MATMUL_CONV_MAX_PIXELS = 0
    try:
        yield
    finally:
        layers.CPU_MATMUL_CONV_MAX_PIXELS = old


def counted_flops(fn, *args, **kwargs) -> float | None:
    """FLOPs of one call of the plain (un-jitted) function `fn`, from XLA's cost analysis of its
    HLO before optimisation, traced afresh under `reference_conv_lowering` (no compile). `args`
    may be arrays or jax.ShapeDtypeStruct."""
    try:
        with reference_conv_lowering():
            cost = jax.jit(lambda *a, **k: fn(*a, **k)).lower(*args, **kwargs).cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort on some backends
        return None


def has_gpu() -> bool:
    """An NVIDIA GPU is visible (without initialising JAX in this process)."""
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return r.returncode == 0 and "GPU" in r.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def measured_matmul_tflops(n: int = 2048, reps: int = 5) -> float:
    """Best float32 n^3 matmul throughput of the default device, TFLOP/s: the MFU peak on CPU."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def machine() -> str:
    import os
    import platform

    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, {platform.machine()}"


def torch_sd_components(folder: str) -> tuple:
    """The PyTorch baseline's SD1.5 parts with random weights (seed 0) from a diffusers folder's
    configs: -> (unet, vae, text_encoder, tokenizer, scheduler_config dict)."""
    import json
    import os

    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(
        diffusers.UNet2DConditionModel.load_config(os.path.join(folder, "unet")))
    vae = diffusers.AutoencoderKL.from_config(
        diffusers.AutoencoderKL.load_config(os.path.join(folder, "vae")))
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder")))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    return unet, vae, text_encoder, tokenizer, config


def run_side(cmd: list[str], side: str, cwd: str) -> dict:
    """Run one side of a side-by-side benchmark in its own process (`cmd` prints one line
    `RESULT <json>`): -> that dict plus its wall time `wall_s`; exits naming the side, with
    the tail of its output, when it fails."""
    import json
    import subprocess
    import sys

    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{side} side failed (exit {p.returncode})")
    result = {**json.loads(line[0][7:]), "wall_s": time.perf_counter() - t0}
    print(f"{side}: done in {result['wall_s']:.0f} s", file=sys.stderr)
    return result
