"""Every GPU figure BENCHMARKS.md asks for, in one run, as one markdown table.

    python benchmarks/gpu_suite.py                 # on a GPU machine: about 8 minutes
    python benchmarks/gpu_suite.py --dry-run       # the same code at tiny sizes on CPU (tests)

Stages (each an existing benchmark script in its own subprocess, so memory is returned between
them and a failure or time-out of one does not lose the others):
1. `unet_forward.py`: SD1.5 UNet forward, bf16, latent 128x96 (a 1024x768 image), batch 2,
   JAX vs PyTorch on the same weights, MFU from XLA's counted FLOPs.
2. `sample.py`: the Leffa sampling pipeline at 1024x768, 30 steps, CFG, JAX bf16 vs the PyTorch
   pipeline fp16 doing the same two-UNet computation.
3. `leffa_loss.py`: the Leffa loss + gradient for one layer at N = 12288 tokens (128x96), fused
   vs materialised.
4. `train_step.py`: the training step at 512x384 and 1024x768, with and without the Leffa loss,
   JAX vs PyTorch, MFU.
5. `text2image.py`: SD1.5 text-to-image at 512x512, 30 steps, CFG, bf16, vs diffusers, with MFU
   (GPU only: on CPU it needs the full SD1.5 model, minutes; `--dry-run` leaves it out).

A second call, `python benchmarks/gpu_suite.py --stages systems` (about 8 minutes), runs the other
systems against the same computation in PyTorch: `magic_clothing.py` (768x576, 20 UniPC steps x
3 branches, bf16), `face_diffuser.py` (SD1.5-size SNF, 20 PNDM steps, two stage-2 calls vs one
stacked call), `storymaker.py` (SDXL 1024x1024, 25 steps, 2 characters, LoRA merged vs unmerged),
`metrics.py` (Inception / SqueezeNet-LPIPS features, images/s). Their dry runs take minutes each
on 2 CPU cores and are not part of the test suite.

Each stage gets its share of `--budget-s` (default 480 s, shares normalised over the chosen
stages); a stage that runs over is stopped and
reported as such. Rows: benchmark, setting, JAX time, baseline time, ratio (baseline / JAX, > 1
means JAX is faster), MFU. The stage scripts' own tables are printed after it (`--verbose`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY = os.path.join(REPO, "leffa_jax", "assets", "tiny_sd15")
SD15 = os.path.join(REPO, "..", "shared", "configs", "stable-diffusion-inpainting")

# (stage, share of the budget, GPU arguments, dry-run arguments or None: not in the dry run).
STAGES = (
    ("unet_forward", 0.06,
     ["--config", SD15, "--latent", "128x96", "--batch", "2", "--dtype", "bfloat16",
      "--kernel", "cudnn", "--iters", "10"],
     ["--config", TINY, "--latent", "8x6", "--iters", "1"]),
    ("sample", 0.18,
     ["--config", SD15, "--height", "1024", "--width", "768", "--steps", "30", "--batch", "1",
      "--reps", "2", "--dtype", "bfloat16", "--torch-dtype", "float16"],
     ["--config", TINY, "--height", "64", "--width", "48", "--steps", "1", "--batch", "1",
      "--reps", "1"]),
    ("leffa_loss", 0.05,
     ["--n", "12288", "--reps", "5"],
     ["--n", "64", "--reps", "1"]),
    ("train_step", 0.30,
     ["--config", SD15, "--sizes", "512x384", "1024x768", "--batch", "4", "--steps", "5",
      "--warmup", "2", "--skip", "jax_leffa_mat"],
     ["--config", TINY, "--sizes", "64x48", "--batch", "1", "--channel-mult", "1",
      "--steps", "1", "--warmup", "0", "--jobs", "1", "--variants", "jax_leffa", "torch_leffa"]),
    ("text2image", 0.09,
     ["--height", "512", "--width", "512", "--steps", "30", "--dtype", "bfloat16", "--reps", "2"],
     None),
    # the other systems' scripts write their own table rows ({"args", "rows"}, rows_generic)
    ("magic_clothing", 0.09, [], ["--dry-run"]),        # 768x576, 20 UniPC steps x 3 branches, bf16
    ("face_diffuser", 0.08, ["--sd15", "--dtype", "bfloat16", "--steps", "20"],
     ["--dry-run"]),                                   # SNF, two calls vs one stacked call
    ("storymaker", 0.10, ["--model", "sdxl"], ["--dry-run"]),  # 1024^2, 25 steps, LoRA (un)merged
    ("metrics", 0.05, ["--batch", "64", "--size", "1024x768", "--iters", "5"], ["--dry-run"]),
)
# Two device calls of about 8 minutes each: the default (Leffa, text-to-image) and `--stages
# systems` (= the four stages below it). The test suite dry-runs the default.
LEFFA_STAGES = ("unet_forward", "sample", "leffa_loss", "train_step", "text2image")
SYSTEM_STAGES = ("magic_clothing", "face_diffuser", "storymaker", "metrics")


def run_stage(name: str, args: list[str], timeout: float, out_dir: str) -> dict:
    """Run benchmarks/<name>.py with `args --json FILE`; -> {"status", "wall_s", "data", "log"}."""
    path = os.path.join(out_dir, f"{name}.json")
    cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), *args, "--json", path]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {timeout:.0f} s"
        log = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace")
    data = None
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    return {"status": status, "wall_s": time.perf_counter() - t0, "data": data, "log": log}


def _ratio(base, jax_s) -> str:
    return f"{base / jax_s:.2f}x" if base and jax_s else ""


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f} %"


def rows_unet_forward(d: dict) -> list[list[str]]:
    setting = f"latent {d['latent'][0]}x{d['latent'][1]}, batch {d['batch']}, {d['dtype']}, " \
              f"{d['kernel']}"
    return [["UNet forward", setting, f"{d['jax_s'] * 1e3:.1f} ms", f"{d['torch_s'] * 1e3:.1f} ms"
             " (PyTorch)", _ratio(d["torch_s"], d["jax_s"]), _pct(d["mfu"])]]


def rows_sample(d: dict) -> list[list[str]]:
    a, runs = d["args"], d["jax"]["runs"]
    torch_runs = d.get("torch", {}).get("runs", [])
    out = []
    for i, r in enumerate(runs):
        t = torch_runs[i]["s_per_image"] if i < len(torch_runs) else None
        out.append(["Sampling (Leffa)", f"{a['height']}x{a['width']}, {a['steps']} steps, CFG, "
                    f"batch {r['batch']}, {d['jax']['dtype']}", f"{r['s_per_image']:.3f} s/image",
                    "" if t is None else f"{t:.3f} s/image (PyTorch)",
                    _ratio(t, r["s_per_image"]), _pct(r.get("mfu"))])
    return out


def rows_leffa_loss(rows: list[dict]) -> list[list[str]]:
    out = []
    for n in sorted({r["n"] for r in rows}):
        mat = next((r for r in rows if r["n"] == n and r["variant"] == "materialised"), None)
        for r in (r for r in rows if r["n"] == n and r["variant"] == "fused"):
            base = mat["time_s"] if mat else None
            out.append(["Leffa loss + grad, one layer", f"N={n}, fused vs materialised",
                        f"{r['time_s'] * 1e3:.1f} ms" if r["time_s"] else "n/a",
                        f"{base * 1e3:.1f} ms (materialised)" if base else "",
                        _ratio(base, r["time_s"]), ""])
    return out


def rows_train_step(d: dict) -> list[list[str]]:
    peak = d["peak_tflops"] * 1e12
    out = []
    for size, res in d["sizes"].items():
        def median_s(variant, res=res):
            r = res.get(variant)
            return statistics.median(r["times_s"]) if r and r.get("times_s") else None

        for jax_v, torch_v in (("jax", "torch"), ("jax_leffa", "torch_leffa")):
            t, tt = median_s(jax_v), median_s(torch_v)
            if t is None:
                continue
            flops = res[jax_v].get("flops")
            mfu = flops / t / peak if flops else None
            label = "with Leffa loss" if "leffa" in jax_v else "no Leffa loss"
            out.append(["Training step", f"{size}, batch {d['args']['batch']}, {label}",
                        f"{t:.3f} s/step", "" if tt is None else f"{tt:.3f} s/step (PyTorch)",
                        _ratio(tt, t), _pct(mfu)])
    return out


def rows_text2image(d: dict) -> list[list[str]]:
    a, j, t = d["args"], d["jax"], d.get("torch")
    setting = f"SD1.5 {a['height']}x{a['width']}, {a['steps']} {a['scheduler']} steps, CFG, " \
              f"batch {a['batch']}, {a['dtype']}"
    return [["Text-to-image", setting, f"{j['generate_s']:.3f} s/call",
             "" if not t else f"{t['generate_s']:.3f} s/call (diffusers)",
             _ratio(t["generate_s"] if t else None, j["generate_s"]), _pct(j.get("mfu"))]]


def rows_generic(d: dict) -> list[list[str]]:
    """Rows a stage script wrote itself: {"rows": [[benchmark, setting, JAX, baseline, ratio,
    MFU], ...]}."""
    return [[str(c) for c in row] for row in d["rows"]]


ROWS = {"unet_forward": rows_unet_forward, "sample": rows_sample, "leffa_loss": rows_leffa_loss,
        "train_step": rows_train_step, "text2image": rows_text2image,
        "magic_clothing": rows_generic, "face_diffuser": rows_generic,
        "storymaker": rows_generic, "metrics": rows_generic}


def markdown(results: dict[str, dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| benchmark | setting | JAX | baseline | baseline / JAX | MFU |",
             "|---|---|---|---|---|---|"]
    for name, res in results.items():
        rows = []
        if res["data"] is not None:
            try:
                rows = ROWS[name](res["data"])
            except (KeyError, TypeError, ZeroDivisionError) as e:
                rows = [[name, f"result unreadable: {e!r}", "", "", "", ""]]
        if res["status"] != "ok" or not rows:
            rows.append([name, f"{res['status']} ({res['wall_s']:.0f} s)", "", "", "", ""])
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_name() -> str:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if p.returncode == 0 and p.stdout.strip():
            return p.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"CPU ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes and the tiny model on CPU (what the test suite runs)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="total time for all stages, shared by their weights (default 480 s; "
                         "1800 s with --dry-run, where the CPU compiles are the slow part)")
    ap.add_argument("--stages", nargs="+", default=list(LEFFA_STAGES),
                    choices=[s[0] for s in STAGES] + ["systems"],
                    help="run only these (default: the Leffa and text-to-image stages; "
                         "'systems' = Magic Clothing, Face-diffuser, StoryMaker, metrics)")
    ap.add_argument("--out", help="also write the table (markdown) and raw JSON to this folder")
    ap.add_argument("--verbose", action="store_true", help="print each stage's own output too")
    args = ap.parse_args(argv)
    args.stages = [n for s in args.stages for n in (SYSTEM_STAGES if s == "systems" else [s])]
    if not args.dry_run and not os.path.isdir(os.path.join(SD15, "unet")):
        raise SystemExit(f"no SD1.5-inpainting config at {SD15}: the suite needs ../shared/configs")
    budget = args.budget_s or (1800.0 if args.dry_run else 480.0)
    out_dir = args.out or tempfile.mkdtemp(prefix="gpu_suite_")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    chosen = [s for s in STAGES if s[0] in args.stages and not (args.dry_run and s[3] is None)]
    total_share = sum(s[1] for s in chosen)
    for name, share, gpu_args, dry_args in chosen:
        res = run_stage(name, dry_args if args.dry_run else gpu_args,
                        max(30.0, share / total_share * budget), out_dir)
        results[name] = res
        print(f"{name}: {res['status']} in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
        if args.verbose or res["status"] != "ok":
            print(res["log"][-4000:], file=sys.stderr)
    table = markdown(results, machine_name())
    print(table)
    with open(os.path.join(out_dir, "gpu_suite.md"), "w") as f:
        f.write(table + "\n")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
