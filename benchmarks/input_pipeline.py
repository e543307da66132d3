"""Input-pipeline throughput: samples/s of the Grain pipeline on a synthetic VITON-HD folder and on
its ArrayRecord (TFDS) form, at 512x384 and 1024x768, with 0, 1 and 2 worker processes.

    python benchmarks/input_pipeline.py [--pairs 48] [--batch 8] [--seconds 6] [--out results.json]

The synthetic set is written at 1024x768 (the real VITON-HD size), so 512x384 includes the
downscale. Training-style settings: shuffle, repeat, flip 0.5, the shipped agnostic masks
(mask_source=auto) and no flow_gt (real datasets have none); two extra rows compute the masks
from parse map + keypoints, and load the synthetic flow_gt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def measure(cfg, seconds: float, warmup_batches: int = 2) -> float:
    from leffa_jax.data import pipeline

    ds = pipeline.make_dataset(cfg, "train", process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(warmup_batches):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["person"].shape[0]
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "leffa_bench_input"))
    p.add_argument("--out", default="")
    a = p.parse_args(argv)

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from etils import epath

    from leffa_jax.data import config as config_lib
    from leffa_jax.data import synthetic
    from leffa_jax.data.tfds import builders

    root = epath.Path(a.workdir) / "viton_hd_1024"
    tfds_dir = epath.Path(a.workdir) / "tfds_noflow"
    t = time.perf_counter()
    if not (root / ".complete").exists():
        synthetic.make_synthetic_dataset(
            root, "viton_hd", num_train=a.pairs, num_test=2, height=1024, width=768, seed=0
        )
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    if not (tfds_dir / "leffa_viton_hd").exists():
        builders.build("viton_hd", root, tfds_dir, load_flow_gt="never")
    build_s = time.perf_counter() - t
    print(f"synthetic set: {gen_s:.1f}s, ArrayRecord build: {build_s:.1f}s")

    rows = []
    for h, w in ((512, 384), (1024, 768)):
        for src in ("folder", "arrayrecord"):
            for workers in (0, 1, 2):
                cfg = config_lib.default_data_config()
                cfg.name, cfg.height, cfg.width = "viton_hd", h, w
                cfg.batch_size, cfg.num_workers, cfg.read_threads = a.batch, workers, 2
                cfg.load_flow_gt = "never"  # as on the real datasets
                if src == "folder":
                    cfg.root = str(root)
                else:
                    cfg.tfds_dir = str(tfds_dir)
                rate = measure(cfg, a.seconds, warmup_batches=2 + 2 * workers)
                rows.append(
                    {"size": f"{h}x{w}", "source": src, "workers": workers, "samples_per_s": rate}
                )
                print(f"{h}x{w} {src:11s} workers={workers}: {rate:7.1f} samples/s", flush=True)
    for label, kw in (
        ("folder, masks computed", {"mask_source": "compute", "load_flow_gt": "never"}),
        ("folder, with flow_gt", {"load_flow_gt": "auto"}),
    ):
        cfg = config_lib.default_data_config()
        cfg.name, cfg.root, cfg.height, cfg.width = "viton_hd", str(root), 512, 384
        cfg.batch_size, cfg.read_threads = a.batch, 2
        cfg.update(kw)
        rate = measure(cfg, a.seconds)
        rows.append({"size": "512x384", "source": label, "workers": 0, "samples_per_s": rate})
        print(f"512x384 {label}, workers=0: {rate:7.1f} samples/s", flush=True)
    result = {
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.python_version()}",
        "pairs": a.pairs,
        "batch": a.batch,
        "rows": rows,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
