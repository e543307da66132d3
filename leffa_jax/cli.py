"""Pieces the command lines share: help texts that show every default, output folders checked
before any work, number checks, and a progress bar that stays quiet in logs."""

from __future__ import annotations

import argparse
import math
import os
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
