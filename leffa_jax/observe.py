"""Training observability: TensorBoard scalars (tensorboardX), a console progress bar, MFU from
XLA-counted FLOPs, and a PNG grid of the task's panels every N steps.

Metric names come from the metrics given to `Logger.log`: "loss" -> `loss/total`, "grad_norm"
and "lr" -> `train/...`, "step" and "finite" are bookkeeping, every other scalar (the task's
terms, e.g. "mse") -> `loss/<name>`."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

TRAIN_SCALARS = ("grad_norm", "lr")
BOOKKEEPING = ("step", "finite")


def scalar_tags(metrics: dict) -> dict[str, float]:
    """{TensorBoard tag: value} for the scalar metrics of one step (see the module docstring)."""
    tags = {}
    for name, value in metrics.items():
        if name in BOOKKEEPING or np.ndim(value) != 0:
            continue
        if name == "loss":
            tags["loss/total"] = value
        elif name in TRAIN_SCALARS:
            tags[f"train/{name}"] = value
        else:
            tags[f"loss/{name}"] = value
    return tags

def step_flops(compiled) -> float | None:
    """FLOPs of one compiled training step (all devices), from XLA's cost analysis of
    `compiled` (a `jax.stages.Compiled`, e.g. `jax.jit(f).lower(*args).compile()`)."""
    try:
        cost = compiled.cost_analysis()
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
        self.workdir = workdir
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(workdir, "tb"))
        if config.log.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def log(self, m: dict) -> None:
        """Record the host metrics of one step (m["step"] is the step index before it ran)."""
        step = int(m["step"]) + 1
        if not self.enabled:
            return
        tags = scalar_tags(m)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k.split("/")[-1]: f"{float(v):.4g}"
                                  for k, v in tags.items() if k.startswith("loss/")})
        if step % self.every:
            return
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        sps = steps / max(now - self._t, 1e-9)
        self._t, self._last_step = now, step
        scalars = {**tags, "perf/steps_per_sec": sps,
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

    def images(self, step: int, row: list[np.ndarray]) -> None:
        """Write one row of panels (HWC uint8, e.g. `Task.image_row`) as a PNG grid to
        workdir/images/step_NNNNNNN.png and to TensorBoard ("samples"). No panels: nothing."""
        if not self.enabled or not row:
            return
        from leffa_jax import viz

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
