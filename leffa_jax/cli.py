"""Pieces the command lines share: help texts that show every default, output folders checked
before any work, number checks, and a progress bar that stays quiet in logs."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile


class UsageError(ValueError):
    """A problem with the command line or its files (reported without a traceback)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; every flag's help ends with its default,
    "(required)", "(off)" for switches or "(no default)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "%(default)" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (off)"
        if action.default is None:
            return f"{text} (no default)"
        return f"{text} (default: %(default)s)"


def check_output_folder(out: str, flag: str = "--out") -> None:
    """UsageError unless `out` is a folder that exists or can be created, and can be written:
    checked by creating and removing a temporary file in it (or in its nearest existing parent),
    so nothing stays behind."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{flag} {out} is a file: give a folder (new or existing)")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {out}: {parent} is a file, so the folder cannot be created")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(handle)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot write in {parent} ({e.strerror or e}); choose "
                         "a writable folder") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_multiple(name: str, value: int | None, factor: int) -> None:
    """UsageError unless `value` (None = unset) is a positive multiple of `factor`."""
    if value is not None and (value <= 0 or value % factor):
        raise UsageError(f"{name} must be a positive multiple of {factor}, got {value}")


def finite(name: str, value: float | None, minimum: float | None = None) -> None:
    """UsageError unless `value` (None = unset) is finite (and >= minimum)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum:g}, got {value:g}")


def progress_bar(total: int, desc: str, enabled: bool = True, file=None):
    """A tqdm bar on stderr. Interactive terminals redraw it in place; elsewhere (CI logs,
    cluster jobs, pipes) it writes at most one plain line every 60 s and the final state,
    instead of one line per update."""
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    interactive = bool(getattr(file, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, unit="step", file=file, disable=not enabled,
                mininterval=0.1 if interactive else 60.0,
                maxinterval=10.0 if interactive else 600.0,
                dynamic_ncols=interactive, ascii=not interactive)


def run_reporting_errors(run, args, done, program: str = "leffa_jax.sample") -> int:
    """`run(args)` -> written paths, then print `done(written)`; the errors a user can fix (bad
    flags, files, checkpoints, values) become one line on stderr and exit status 2."""
    from leffa_jax.weights.tensor_io import CheckpointError

    try:
        written = run(args)
    except (UsageError, FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return 2
    print(done(written))
    return 0


def step_ticker(bar, steps: int):
    """A per-step progress callback `tick(i)` (i = 0-based step index, repeats and retraces
    ignored) that advances `bar` by the steps not yet counted, never past `steps`."""
    done = [0]

    def tick(i: int) -> None:
        reached = min(int(i) + 1, steps)
        if reached > done[0]:
            bar.update(reached - done[0])
            done[0] = reached

    return tick


def slug(text: str, limit: int = 40) -> str:
    """A file-name piece from a prompt: lowercase, runs of other characters -> `_`."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


def compute_dtype(name: str) -> str:
    """`--dtype`: "auto" -> float32 on CPU, bfloat16 on accelerators; else the name."""
    if name != "auto":
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def sample_prompts(args, sample) -> list[str]:
    """The prompt loop of the sampling CLIs. For each `args.prompt[i]`, `sample(i, prompt,
    progress)` -> a list of (H, W, 3) uint8 images (`progress(step)` is the per-step callback,
    None with --no-progress). Writes `<nnn>_<slug>.png` per image and `grid.png` (a row per
    prompt), each atomically; -> the paths written, grid last."""
    from leffa_jax import imageio

    steps = args.steps
    bar = progress_bar(len(args.prompt) * steps, f"{len(args.prompt)} prompt(s)",
                       not args.no_progress)
    written, rows, count = [], [], 0
    for index, prompt in enumerate(args.prompt):
        tick = step_ticker(bar, steps)
        images = list(sample(index, prompt, None if args.no_progress else tick))
        tick(steps - 1)
        for image in images:
            path = os.path.join(args.out, f"{count:03d}_{slug(prompt)}.png")
            imageio.save_png(path, image)
            written.append(path)
            count += 1
        rows.append(images)
    bar.close()
    grid_path = os.path.join(args.out, "grid.png")
    imageio.save_png(grid_path, imageio.grid(rows))
    return [*written, grid_path]
