"""Training observability: TensorBoard scalars (tensorboardX), a console progress bar, MFU from
XLA-counted FLOPs, and a PNG grid every N steps (person | garment | mask | sample | Leffa flow)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np


def step_flops(step_fn, *args) -> float | None:
    """FLOPs of one compiled training step (all devices), from XLA's cost analysis."""
    try:
        cost = step_fn.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # best effort on some backends
        return None


PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5p": 459e12, "v5 lite": 197e12,
              "v5e": 197e12, "v4": 275e12, "v6e": 918e12}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def host_params(tree):
    """Host (numpy) copy of a possibly sharded pytree. Collective under multi-host: every
    process must call it (only process 0 then writes images)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


class Logger:
    def __init__(self, workdir: str, config, *, flops: float | None, start: int, total: int,
                 enabled: bool = True):
        self.enabled = enabled
        self.config = config
        self.flops = flops
        self.every = max(int(config.log.every), 1)
        self.n_dev = jax.device_count()
        self.batch = int(config.train.batch_size)
        self.peak = peak_flops_per_device()
        self._t = time.perf_counter()
        self._last_step = start
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.workdir = workdir
        self.writer = SummaryWriter(os.path.join(workdir, "tb"))
        if config.log.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def log(self, m: dict) -> None:
        step = int(m["step"]) + 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", leffa=f"{m['leffa']:.2e}")
        if step % self.every:
            return
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        sps = steps / max(now - self._t, 1e-9)
        self._t, self._last_step = now, step
        scalars = {"loss/total": m["loss"], "loss/mse": m["mse"], "loss/leffa": m["leffa"],
                   "train/grad_norm": m["grad_norm"], "train/lr": m["lr"],
                   "perf/steps_per_sec": sps,
                   "perf/images_per_sec_per_device": sps * self.batch / self.n_dev}
        if self.flops:
            scalars["perf/tflops_per_sec"] = self.flops * sps / 1e12
            if self.peak:
                scalars["perf/mfu"] = self.flops * sps / (self.peak * self.n_dev)
        for k, v in scalars.items():
            self.writer.add_scalar(k, float(v), step)
        self.writer.flush()
        if self.bar is None and self.config.log.print_every_log:
            print(f"step {step}: " + ", ".join(f"{k.split('/')[-1]} {float(v):.4g}"
                                              for k, v in scalars.items()), flush=True)

    def images(self, step: int, model, ema: dict, vae_params, host_batch: dict, config) -> None:
        """Sample with `ema` (host copies of the trainable params, see `host_params`) on the first
        pair of `host_batch` and write a PNG grid (person | garment | mask | sample | flow | warped)
        to workdir/images/step_NNNNNNN.png and to TensorBoard ("samples")."""
        if not self.enabled:
            return
        from flax import nnx

        from leffa_jax import pipeline, viz
        from leffa_jax.train import TRAINABLE

        for name in TRAINABLE:
            nnx.update(getattr(model, name), ema[name])
        nnx.update(model.vae, vae_params)
        b = {k: np.asarray(v[:1]) for k, v in host_batch.items()}
        row = [viz.to_uint8(b["person"][0]), viz.to_uint8(b["garment"][0]),
               np.repeat(np.round(b["mask"][0] * 255).astype(np.uint8), 3, -1)]
        out = pipeline.generate(model, b["person"], b["garment"], b["mask"], b["densepose"],
                                steps=int(config.log.sample_steps), guidance=2.5, seed=0)
        row.append(np.asarray(out.images[0]))
        pics = viz.attention_pictures(model, b["person"][0], b["garment"][0], b["mask"][0],
                                      b["densepose"][0], t=300, layers=None, points=())
        flows = sorted(k for k in pics if k.startswith("flow_l"))
        row += [pics[flows[0]], pics[flows[0].replace("flow", "warped")]] if flows else []
        grid = viz.grid([row])
        os.makedirs(os.path.join(self.workdir, "images"), exist_ok=True)
        viz.save_png(os.path.join(self.workdir, "images", f"step_{step:07d}.png"), grid)
        self.writer.add_image("samples", grid, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
