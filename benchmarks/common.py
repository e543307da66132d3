"""Shared helpers for benchmark scripts: timing, FLOPs from XLA, peak FLOP/s per device."""

from __future__ import annotations

import statistics
import time

import jax

# Dense peak FLOP/s used for MFU (bf16 tensor cores / fp32 where noted).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5e": 197e12,
              "TPU v4": 275e12, "TPU v5p": 459e12}


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower().replace(" ", "") in kind.lower().replace(" ", ""):
            return peak
    return None


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


def xla_flops(jitted, *args, **kwargs) -> float | None:
    """FLOPs of one call from XLA's cost analysis of the compiled program."""
    try:
        cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort on some backends
        return None


def machine() -> str:
    import os
    import platform

    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, {platform.machine()}"
