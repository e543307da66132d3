"""Before/after a change: one benchmark script run from two revisions of the library, alternately,
on the same machine in one run.

    python benchmarks/compare_revisions.py --rev 47f03a0 --rounds 2 -- sample.py --skip-torch
    python benchmarks/compare_revisions.py --rev HEAD~5 -- train_step.py --variants jax jax_leffa

The older revision is exported with `git archive` to a temporary folder; each round runs the
benchmark script of each tree with that tree first on PYTHONPATH (so `import leffa_jax` is the
tree's own), alternating which goes first, and reads the script's `--json` output. Printed: every
timing of both trees per round, the medians, and after / before (< 1 means the change is faster).
Timings compared: sample.py -> JAX s/image per batch; train_step.py -> JAX s/step per size and
variant; unet_forward.py -> JAX s/call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def export_revision(rev: str, dst: str) -> str:
    """`git archive REV` unpacked into dst/tree; -> the tree's path."""
    tree = os.path.join(dst, "tree")
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    return tree


def jax_timings(script: str, data: dict) -> dict[str, float]:
    """{label: seconds} of the JAX side from a benchmark's --json output."""
    if script == "sample.py":
        return {f"batch {r['batch']} s/image": r["s_per_image"] for r in data["jax"]["runs"]}
    if script == "train_step.py":
        return {f"{size} {variant} s/step": statistics.median(r["times_s"])
                for size, res in data["sizes"].items() for variant, r in res.items()
                if variant.startswith("jax") and r.get("times_s")}
    if script == "unet_forward.py":
        return {"s/call": data["jax_s"]}
    raise SystemExit(f"no timing reader for {script}: add one to jax_timings")


def run_once(tree: str, script: str, args: list[str], out: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.join(tree, "benchmarks", script), *args, "--json", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    if proc.returncode:
        raise SystemExit(f"{script} failed in {tree} (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(out) as f:
        return jax_timings(script, json.load(f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", required=True, help="the 'before' revision (git rev)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each tree (default 2)")
    ap.add_argument("script", help="benchmark script name, e.g. sample.py")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    a = ap.parse_args(argv)
    args = [x for x in a.args if x != "--"]
    tmp = tempfile.mkdtemp(prefix="compare_revisions_")
    trees = {"before": export_revision(a.rev, tmp), "after": REPO}
    # The old tree has no ../shared beside it: point the benchmarks' defaults at ours.
    shared = os.path.join(os.path.dirname(REPO), "shared")
    if os.path.isdir(shared) and not os.path.exists(os.path.join(tmp, "shared")):
        os.symlink(shared, os.path.join(tmp, "shared"))
    times: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for rnd in range(a.rounds):
        order = ("before", "after") if rnd % 2 == 0 else ("after", "before")
        for side in order:
            got = run_once(trees[side], a.script, args, os.path.join(tmp, f"{side}{rnd}.json"))
            for k, v in got.items():
                times[side].setdefault(k, []).append(v)
            print(f"round {rnd + 1} {side}: " + ", ".join(f"{k} {v:.4f}" for k, v in got.items()),
                  file=sys.stderr, flush=True)
    print(f"{a.script} {' '.join(args)}; before = {a.rev}, after = working tree; "
          f"{a.rounds} rounds, alternating")
    print("| timing | before (median) | after (median) | after / before | all before | all after |")
    print("|---|---|---|---|---|---|")
    for k in times["before"]:
        b, f = times["before"][k], times["after"].get(k, [])
        if not f:
            continue
        mb, mf = statistics.median(b), statistics.median(f)
        print(f"| {k} | {mb:.4f} | {mf:.4f} | {mf / mb:.3f} | "
              f"{', '.join(f'{x:.4f}' for x in b)} | {', '.join(f'{x:.4f}' for x in f)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
