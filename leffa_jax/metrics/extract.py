"""Feature extraction at scale: images stream from file lists (a background thread decodes and
resizes the next batch on the host), batches of one shape are padded to a multiple of the device
count, split over all local devices (`sampling.loop.batch_mesh` / `shard_batch`), run through a
jitted network with replicated weights, and only the (B, D) features come back to the host.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax.metrics import images as img_lib
from leffa_jax.sampling.loop import batch_mesh, shard_batch


def prefetch(items: Iterable, fn: Callable, workers: int = 4) -> Iterator:
    """fn(item) for each item, in order, computed ahead by a thread pool."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: list = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


class Runner:
    """Runs `fn(module, *arrays) -> (B, ...)` jitted and sharded over the batch axis."""

    def __init__(self, module: nnx.Module, fn: Callable, shard: bool = True):
        self.graphdef, self.state = nnx.split(module)
        self.shard = shard
        graphdef = self.graphdef

        @jax.jit
        def run(state, *arrays):
            return fn(nnx.merge(graphdef, state), *arrays)

        self._run = run

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        b = arrays[0].shape[0]
        n = jax.local_device_count() if self.shard else 1
        pad = (-b) % n
        if pad:
            arrays = tuple(np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in arrays)
        mesh = batch_mesh(b + pad, enabled=self.shard)
        out = self._run(self.state, *shard_batch(arrays, mesh))
        return np.asarray(out)[:b]


def stream(files: Sequence[str], load: Callable, runner: Runner, batch_size: int,
           progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Concatenated runner outputs over `files` (loaded with `load`, batched by shape)."""
    outs = []
    for group in img_lib.batches(prefetch(files, load), batch_size):
        outs.append(runner(np.stack(group)))
        if progress is not None:
            progress(len(group))
    if not outs:
        raise ValueError("no images to evaluate")
    return np.concatenate(outs)


def load_pytorch_fid(path: str) -> np.ndarray:
    """pytorch-fid ImagePathDataset + ToTensor: float32 (H, W, 3) in [0, 1]."""
    return img_lib.load_rgb(path).astype(np.float32) / np.float32(255)


def load_clean_fid(path: str) -> np.ndarray:
    """clean-fid ResizeDataset ("clean"): float32 (299, 299, 3) in [0, 255]."""
    return img_lib.clean_fid_resize(img_lib.load_rgb(path))


def inception_runners(model, dims: int = 2048, shard: bool = True) -> dict[str, Runner]:
    return {"pytorch_fid": Runner(model, lambda m, x: m.pytorch_fid_features(x, dims), shard),
            "clean_fid": Runner(model, lambda m, x: m.clean_fid_features(x), shard)}


def paired_runner(lpips_model, shard: bool = True) -> Runner:
    """(pred, gt) float32 [0,1] NHWC -> (B, 2): per-image SSIM (torchmetrics, data_range 1) and
    LPIPS(gt*2-1, pred*2-1) (VtonEval's argument order)."""
    from leffa_jax.metrics.ssim import ssim

    def fn(m, pred, gt):
        s = ssim(pred, gt)
        lp = m(gt * 2 - 1, pred * 2 - 1) if m is not None else jnp.zeros_like(s)
        return jnp.stack([s, lp], -1)

    if lpips_model is None:
        return _NoModelRunner(lambda pred, gt: fn(None, pred, gt), shard)
    return Runner(lpips_model, fn, shard)


class _NoModelRunner(Runner):
    def __init__(self, fn, shard):
        self.shard = shard
        self.state = ()
        self._run = jax.jit(lambda state, *a: fn(*a))
