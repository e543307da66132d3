"""Leffa loss + gradient w.r.t. q and k for one layer: fused vs materialised flow.

One layer: q, k_ref (B=1, heads 8, N, d 40), the flow mean_h softmax(q k^T / (tau sqrt d)) @ C
at h x w (N = h*w), upsampled to an image 8x the latent, clipped, warp of a 3-channel reference
image, masked smooth-L1, gate and lambda; `jax.value_and_grad` w.r.t. (q, k).

Peak memory, two measures:
- xla: the compiled executable's `memory_analysis()`: temp + argument + output bytes (what XLA
  plans to allocate for one call; exact and deterministic).
- rss: each variant runs in its own subprocess; after compiling, the kernel's RSS high-water
  mark is reset (`/proc/self/clear_refs` = 5) and the increase of VmHWM over the VmRSS before
  the first call is reported, over the warm-up and timed calls (Linux only; "n/a" elsewhere).
  Coarser: it includes allocator and thread-pool effects.

    python benchmarks/leffa_loss.py                    # N = 1024 and 4096 on CPU
    python benchmarks/leffa_loss.py --n 12288          # 1024x768 finest layer, for a GPU
    python benchmarks/leffa_loss.py --n 4096 --chunk 64 128 256   # fused chunk sweep
    python benchmarks/leffa_loss.py --n 12288 --compile-only      # XLA's planned memory only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HW = {256: (16, 16), 1024: (32, 32), 3072: (64, 48), 4096: (64, 64), 12288: (128, 96)}


def _hw(n: int) -> tuple[int, int]:
    if n in HW:
        return HW[n]
    s = int(round(n**0.5))
    if s * s != n:
        raise SystemExit(f"--n {n}: give a square number or one of {sorted(HW)}")
    return s, s


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_variant(
    variant: str,
    n: int,
    chunk: int | None,
    reps: int,
    heads: int,
    d: int,
    compile_only: bool = False,
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from leffa_jax import flow as fl

    h, w = _hw(n)
    hh, ww = 8 * h, 8 * w
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, heads, n, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, heads, n, d)), jnp.float32)
    ref = jnp.asarray(rng.uniform(-1, 1, size=(1, hh, ww, 3)), jnp.float32)
    tgt = jnp.asarray(rng.uniform(-1, 1, size=(1, hh, ww, 3)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(1, hh, ww, 1)) > 0.5, jnp.float32)
    ts = jnp.asarray([100])

    def loss(q, k):
        if variant == "fused":
            f = fl.flow_from_qk(q, k, h, w, 2.0, chunk_size=chunk)
        else:
            f = fl.flow_from_attention(fl.attention_map(q, k, 2.0), h, w)
        return fl.leffa_loss([f], ref, tgt, mask, ts)

    step = jax.jit(jax.value_and_grad(loss, (0, 1)))
    compiled = step.lower(q, k).compile()
    ma = compiled.memory_analysis()
    xla = None
    if ma is not None:
        xla = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)
    info = {
        "variant": variant,
        "n": n,
        "chunk": chunk if variant == "fused" else None,
        "chunk_used": (chunk or fl.default_chunk_size(1, heads, n, n))
        if variant == "fused"
        else None,
        "xla_bytes": xla,
        "device": str(jax.devices()[0].platform),
    }
    if compile_only:
        return {**info, "time_s": None, "time_median_s": None, "rss_bytes": None, "loss": None}
    # RSS: reset the high-water mark after compiling, before the first call (later calls reuse
    # pages the first one touched), and count everything the calls add over the current RSS
    rss0 = _status_kib("VmRSS")
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    out = compiled(q, k)  # warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = compiled(q, k)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    hwm = _status_kib("VmHWM")
    rss = (hwm - rss0) * 1024 if (reset and hwm is not None and rss0 is not None) else None
    return {
        **info,
        "time_s": float(np.min(times)),
        "time_median_s": float(np.median(times)),
        "rss_bytes": rss,
        "loss": float(out[0]),
    }


def _sub(variant, n, chunk, reps, heads, d, compile_only=False) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--n", str(n), "--reps", str(reps)]
    if compile_only:
        cmd.append("--compile-only")
    cmd += ["--heads", str(heads), "--d", str(d)]
    if chunk is not None:
        cmd += ["--chunk", str(chunk)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{variant} N={n} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:8.1f}"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--chunk", type=int, nargs="+", default=[None])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d", type=int, default=40)
    ap.add_argument("--skip-materialised", action="store_true", help="e.g. when it does not fit")
    ap.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile and report XLA's planned memory (no run, no timing, no RSS)",
    )
    ap.add_argument("--json", help="also write every row here (JSON list)")
    ap.add_argument("--child", choices=["fused", "materialised"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        r = run_variant(a.child, a.n[0], a.chunk[0], a.reps, a.heads, a.d, a.compile_only)
        print(json.dumps(r))
        return
    print(
        f"Leffa loss + grad(q, k), one layer, B=1, heads {a.heads}, d {a.d}, image 8x latent, "
        f"best of {a.reps} (median in brackets); peak memory: xla = compiled temp+arg+out, rss = VmHWM increase"
    )
    hdr = (
        f"{'N':>6} {'h x w':>8} {'variant':>13} {'chunk':>5} {'time ms':>9} {'(median)':>9} {'xla MiB':>8} "
        f"{'rss MiB':>8} {'time x':>7} {'xla x':>7} {'rss x':>7}"
    )
    print(hdr)
    all_rows = []
    for n in a.n:
        h, w = _hw(n)
        co = a.compile_only
        mat = (
            None if a.skip_materialised else _sub("materialised", n, None, a.reps, a.heads, a.d, co)
        )
        rows = [mat] if mat else []
        rows += [_sub("fused", n, c, a.reps, a.heads, a.d, co) for c in a.chunk]
        all_rows += [{**r, "n": n} for r in rows]
        for r in rows:
            tr = xr = rr = ""
            if mat and r is not mat:
                if r["time_s"] and mat["time_s"]:
                    tr = f"{r['time_s'] / mat['time_s']:.2f}"
                if r["xla_bytes"] and mat["xla_bytes"]:
                    xr = f"1/{mat['xla_bytes'] / r['xla_bytes']:.1f}"
                if r["rss_bytes"] and mat["rss_bytes"]:
                    rr = f"1/{mat['rss_bytes'] / max(r['rss_bytes'], 1):.1f}"
            med = "-" if r["time_s"] is None else "({:.1f})".format(r["time_median_s"] * 1e3)
            t_ms = "n/a" if r["time_s"] is None else f"{r['time_s'] * 1e3:.1f}"
            print(
                f"{n:>6} {f'{h}x{w}':>8} {r['variant']:>13} {str(r['chunk_used'] or '-'):>5} "
                f"{t_ms:>9} {med:>9} {_mib(r['xla_bytes']):>8} "
                f"{_mib(r['rss_bytes']):>8} "
                f"{tr:>7} {xr:>7} {rr:>7}"
            )
        if mat and not co:
            for r in rows[1:]:
                rel = abs(r["loss"] - mat["loss"]) / max(abs(mat["loss"]), 1e-30)
                assert rel < 1e-4, (
                    f"fused and materialised losses differ: {r['loss']} vs {mat['loss']}"
                )
    print(f"device: {rows[0]['device']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
