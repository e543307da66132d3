"""Checks of a sampling request, made before anything is compiled: input arrays (shapes, ranges,
finiteness), settings, whether the request fits the device's memory, and the results.

Arrays are NHWC: images (B, H, W, 3) in [-1, 1], masks (B, H, W, 1) in {0, 1}.
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["as_batch", "check_finite", "check_settings", "validate_inputs",
           "nonfinite_parameters", "check_results", "sampling_memory", "available_memory",
           "check_memory"]


def as_batch(x, name: str, channels: int | None) -> np.ndarray:
    """-> float32 (B, H, W, channels); a mask may come as (B, H, W)."""
    a = np.asarray(x, np.float32)
    if name == "mask" and a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or (channels is not None and a.shape[-1] != channels):
        want = f"(B, H, W, {channels})" if channels else "(B, H, W, C)"
        raise ValueError(f"{name} must be NHWC {want}, got shape {a.shape}")
    return a


def check_finite(name: str, a: np.ndarray) -> None:
    """ValueError naming `name` and the first bad sample/pixel when `a` holds NaN or inf."""
    bad = ~np.isfinite(a)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or inf), the "
                         f"first at index {where}: give finite values")


def check_settings(**settings) -> None:
    """Every given setting (None = unset) must be a finite number."""
    for name, value in settings.items():
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def validate_inputs(person, garment, mask, densepose, factor: int):
    """The `generate` inputs as float32 NHWC, checked: batch sizes, mask and densepose in the
    person's frame, its size a multiple of the VAE factor, all finite, images in [-1, 1], mask
    in {0, 1}. The garment may have any size (`generate` brings it to the person's)."""
    person = as_batch(person, "person", 3)
    garment = as_batch(garment, "garment", 3)
    mask = as_batch(mask, "mask", 1)
    densepose = as_batch(densepose, "densepose", 3)
    b, h, w = person.shape[:3]
    for name, a in (("garment", garment), ("mask", mask), ("densepose", densepose)):
        if a.shape[0] != b:
            raise ValueError(f"{name} has batch {a.shape[0]}, person has {b}")
    for name, a in (("mask", mask), ("densepose", densepose)):
        if a.shape[1:3] != (h, w):
            raise ValueError(f"{name} is {a.shape[1]}x{a.shape[2]}, person is {h}x{w}: give "
                             "them at the same size")
    if h % factor or w % factor:
        raise ValueError(f"person size {h}x{w} must be a multiple of {factor} (the VAE "
                         "downsampling factor)")
    for name, a in (("person", person), ("garment", garment), ("mask", mask),
                    ("densepose", densepose)):
        check_finite(name, a)
    for name, a in (("person", person), ("garment", garment), ("densepose", densepose)):
        lo, hi = float(a.min()), float(a.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"{name} values span [{lo:g}, {hi:g}]; images must be in [-1, 1] "
                             "(uint8 x: x / 127.5 - 1)")
    if not np.isin(mask, (0.0, 1.0)).all():
        bad = np.unique(mask[~np.isin(mask, (0.0, 1.0))])[:5]
        raise ValueError(f"mask must hold only 0 and 1 (1 = region to generate); found values "
                         f"such as {bad.tolist()}. Binarise it first, e.g. (mask >= 0.5)")
    return person, garment, mask, densepose


def nonfinite_parameters(model, limit: int = 5) -> tuple[list[str], int]:
    """-> (names of up to `limit` parameters holding NaN/inf, how many there are)."""
    import jax.numpy as jnp
    from flax import nnx

    names, count = [], 0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = value.get_value() if hasattr(value, "get_value") else value.value
        if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.isfinite(x).all()):
            count += 1
            if len(names) < limit:
                names.append(".".join(str(p) for p in path))
    return names, count


def check_results(decoded: np.ndarray, model, dtype: str) -> None:
    """ValueError when the decoded images (B, H, W, 3) are not finite, naming the cause: the
    checkpoint's non-finite parameters, else the compute dtype's range."""
    bad = ~np.isfinite(decoded)
    if not bad.any():
        return
    images = sorted({int(i) for i in np.argwhere(bad)[:, 0]})
    what = f"the sampled image(s) {images} hold non-finite values (NaN or inf)"
    names, count = nonfinite_parameters(model)
    if count:
        raise ValueError(f"{what}: {count} parameter(s) of the checkpoint are not finite, e.g. "
                         f"{', '.join(names)}. The checkpoint is damaged: convert or export it "
                         "again")
    raise ValueError(f"{what} although the inputs and parameters are finite: the compute dtype "
                     f"{dtype} overflowed; sample in float32 or bfloat16")


def sampling_memory(model, batch: int, height: int, width: int, dtype_bytes: int = 4,
                    attention_kernel: str = "xla") -> tuple[int, str]:
    """A LOWER bound of the extra memory one `generate` call needs on a device, in bytes, and
    what it is made of: the largest attention-score array of the generative UNet (float32 logits
    (2B, heads, N, 2N): both guidance branches, the person's N tokens against themselves and the
    reference's) or of the VAE's mid-block, plus the parameters cast to the compute dtype.
    Fused kernels do not materialise the scores: "cudnn", and "dot_product" on GPUs (where
    XLA may pick cuDNN) count none; "chunked" one block of queries at a time."""
    import jax

    factor = model.vae.downsample_factor
    latent_hw = (height // factor, width // factor)
    pixels = latent_hw[0] * latent_hw[1]  # the VAE mid-block's single-head attention
    scores = 2 * batch * pixels * pixels * 4  # the encoder sees (masked, garment) pairs
    detail = f"VAE attention scores {2 * batch} x {pixels}^2 float32"
    fused = attention_kernel == "cudnn" or (attention_kernel == "dot_product"
                                            and jax.default_backend() == "gpu")
    if not fused:
        heads = min(model.unet.config.num_heads)
        tokens = max(h * w for h, w in model.unet.layer_resolutions(latent_hw))
        rows = tokens
        if attention_kernel == "chunked":
            from leffa_jax.nn.attention import query_chunk

            rows = query_chunk(tokens)
        unet_scores = 2 * batch * heads * rows * 2 * tokens * 4
        if unet_scores > scores:
            scores = unet_scores
            detail = (f"attention scores {2 * batch} x {heads} heads x {tokens} x "
                      f"{2 * tokens} float32")
    params = 0
    if dtype_bytes != 4:
        params = sum(int(np.prod(x.shape)) for x in _param_arrays(model)) * dtype_bytes
        detail += f" + parameters in {dtype_bytes}-byte floats"
    return scores + params, detail


def _param_arrays(model):
    from flax import nnx

    for _, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield value.get_value() if hasattr(value, "get_value") else value.value


def available_memory() -> tuple[int | None, str]:
    """(free bytes, where) of the default device: the accelerator's `memory_stats()`, else the
    host's available memory (/proc/meminfo MemAvailable); (None, ...) when unknown."""
    import jax

    device = jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"{device.platform} device {device.id}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host memory (MemAvailable)"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def check_memory(model, batch: int, height: int, width: int, dtype_bytes: int = 4,
                 attention_kernel: str = "xla", fix: str = "sample at a lower resolution or "
                 "with fewer images per call") -> None:
    """ValueError, before anything is compiled, when `sampling_memory` exceeds the free memory
    of the device (per device when the batch is sharded: pass the per-device batch)."""
    need, detail = sampling_memory(model, batch, height, width, dtype_bytes, attention_kernel)
    free, where = available_memory()
    if free is not None and need > free:
        raise ValueError(
            f"sampling {batch} image(s) at {height}x{width} needs at least {_size(need)} ({detail})"
            f" but {where} has {_size(free)} free: {fix}")
