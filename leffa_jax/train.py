r"""Training CLI: the Task that `config.task` names (default "leffa"), run by the generic loop.

    python -m leffa_jax.train --config leffa_jax/configs/tryon_512.py --workdir DIR \
        [--config.key=value ...]

`--config` takes a config file, a packaged config's name (`tryon_512`) or the pre-package path
(`configs/tryon_512.py`); see `leffa_jax/configs/__init__.py`. The run is sharded over all
devices, checkpointed with the data-iterator state and resumable (`leffa_jax/training/loop.py`);
Leffa's loss is `leffa_jax/systems/leffa.py`. With LEFFA_MULTIHOST set, every host runs this
command and `jax.distributed.initialize()` connects them.

The flags, the config (unknown keys, values), the data folder and the initial checkpoint are
checked before anything is written: a mistake leaves the workdir as it was. `train.steps=0` is
refused (it would export an untrained model) unless `--config.train.export_at_step_0=True`.
The export (`WORKDIR/export`) records the image size trained at; sampling defaults to it.

Exit status: 0 the run reached `train.steps` (and exported) or stopped as asked; 2 a usage
error: a flag, config key or value, config file, data folder or initial checkpoint is wrong
(one line names it and the fix); 3 a step's loss or gradient was not finite (the line names
the step and its batch samples; that step was not applied, the last checkpoint is intact).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import textwrap
from collections.abc import Sequence

import jax
import ml_collections

from leffa_jax.cli import UsageError
from leffa_jax.training.loop import Hook, MetricsCallback, NonFiniteLossError, RunResult

__all__ = ["EXIT_NON_FINITE", "EXIT_USAGE", "NonFiniteLossError", "RunResult", "help_text",
           "main", "parse_args", "run_cli", "train"]

PROG = "python -m leffa_jax.train"
EXIT_USAGE = 2
EXIT_NON_FINITE = 3
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def train(config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None,
          callback: MetricsCallback | None = None, hooks: Sequence[Hook] = ()) -> RunResult:
    """Run (or resume) the training `config` describes in `workdir` (see `training.loop.train`)."""
    from leffa_jax.systems import make_task
    from leffa_jax.training import loop

    return loop.train(make_task(config), config, workdir, max_steps=max_steps,
                      callback=callback, hooks=hooks)


def help_text() -> str:
    """The --help text: usage, every flag with its default, the exit statuses."""
    from leffa_jax import configs

    flags_help = (
        ("--config CONFIG", "a config file (FILE or FILE:ARG) or the name of a packaged config: "
                            f"{', '.join(configs.names())} (required)"),
        ("--workdir DIR", "where config.json, checkpoints/, tb/, images/ and export/ go; a run "
                          "restarted in the same DIR resumes (required)"),
        ("--config.KEY=VALUE", "set one field of the config, nested with dots, e.g. "
                               "--config.train.batch_size=64; repeatable; an unknown KEY is an "
                               "error (default: the config file's values)"),
        ("--flagfile FILE", "read more flags from FILE, one per line (default: none)"),
        ("--help", "show this help and exit"),
    )
    doc = __doc__.split("\n\n", 1)[1].rsplit("\n\nExit status:", 1)[0]
    lines = [f"usage: {PROG} --config CONFIG --workdir DIR [--config.KEY=VALUE ...]", "",
             doc.strip(), "", "flags:"]
    lines += [f"  {name}\n" + textwrap.fill(text, 96, initial_indent=" " * 6,
                                            subsequent_indent=" " * 6)
              for name, text in flags_help]
    lines += ["", "Exit status:" + __doc__.rsplit("Exit status:", 1)[1].rstrip()]
    return "\n".join(lines)


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _flag_values(argv: Sequence[str]):
    """A fresh absl FlagValues with this command's flags (so `main` can run more than once in a
    process), parsed from `argv` (without the program name). -> (flag values, other args)."""
    from absl import flags
    from ml_collections import config_flags

    full = [PROG, *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file or packaged config name",
                                    flag_values=values, lock_config=True, sys_argv=full)
    flags.DEFINE_string("workdir", None, "the run's folder", flag_values=values)
    rest = values(full)
    return values, rest[1:]


def _unknown_key(argv: Sequence[str], spec: str, error: Exception) -> str:
    """The message for an override naming no field: which flag, the nearest key, the fix."""
    base = _flag_values(["--config", spec])[0].config
    for arg in argv:
        name = arg.split("=", 1)[0]
        if not name.startswith(("--config.", "--noconfig.")):
            continue
        node, done = base, []
        for part in name.split(".", 1)[1].split("."):
            keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if part not in keys:
                where = "config." + ".".join(done) if done else "the config"
                close = difflib.get_close_matches(part, keys, n=1)
                hint = (f"did you mean --config.{'.'.join([*done, close[0]])}?" if close
                        else f"its keys: {', '.join(sorted(keys)) or 'none'}")
                return f"{name}: {where} has no key {part!r} ({hint})"
            node, done = node[part], [*done, part]
    return f"a --config.KEY override failed: {str(error).splitlines()[0]}"


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """The command line (without the program name) -> (config, workdir); UsageError naming the
    problem and the fix (nothing is read but the config file)."""
    from absl import flags

    from leffa_jax import configs

    argv = configs.resolve_argv(list(argv))
    spec = _config_spec(argv)
    if spec is None:
        raise UsageError("--config is required: a config file or a packaged config's name "
                         f"({', '.join(configs.names())})")
    if not os.path.isfile(spec.partition(":")[0]):
        raise UsageError(f"--config {spec}: no such file, nor a packaged config's name "
                         f"({', '.join(configs.names())})")
    try:
        values, rest = _flag_values(argv)
        config = values.config
    except flags.Error as e:  # a config file's own error comes as a traceback: its last line
        head, _, trace = str(e).partition("Traceback (most recent call last):")
        message = " ".join(head.split() + trace.strip().splitlines()[-1:])
        raise UsageError(f"{message} (see {PROG} --help)") from None
    except (AttributeError, KeyError) as e:  # ml_collections: an override naming no field
        raise UsageError(_unknown_key(argv, spec, e)) from None
    if rest:
        raise UsageError(f"unexpected argument(s) {' '.join(rest)}: config fields are set as "
                         "--config.KEY=VALUE")
    if not values.workdir:
        raise UsageError("--workdir is required: the folder of the run (created; a run "
                         "restarted there resumes)")
    return config, values.workdir


def _check_workdir(workdir: str) -> None:
    from leffa_jax import cli

    if "://" not in workdir:  # remote (gs://...) workdirs are checked when written
        cli.check_output_folder(workdir, "--workdir")


def main(argv: Sequence[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    """The command (argv without the program name; default sys.argv[1:]) -> exit status.
    `hooks` go to the loop (see `training.loop.train`)."""
    from leffa_jax.convert import CheckpointError
    from leffa_jax.data.common import DataError
    from leffa_jax.systems import make_task
    from leffa_jax.training import loop

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if any(a in HELP_FLAGS for a in argv):
        print(help_text())
        return 0
    try:
        config, workdir = parse_args(argv)
        _check_workdir(workdir)
        task = make_task(config)
        loop.validate(task, config)
        if os.environ.get("LEFFA_MULTIHOST"):
            jax.distributed.initialize()
        result = loop.train(task, config, workdir, hooks=hooks)
    except NonFiniteLossError as e:
        print(f"leffa_jax.train: error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except (UsageError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"leffa_jax.train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if jax.process_index() == 0:
        last = result.metrics[-1] if result.metrics else {}
        print(json.dumps({"step": result.step, "loss": last.get("loss")}))
    return 0


def run_cli(argv: Sequence[str] | None = None, hooks: Sequence[Hook] = ()) -> None:
    """`main` on `argv` (sys.argv style, program name first; default sys.argv), then exit with
    its status."""
    argv = sys.argv if argv is None else argv
    sys.exit(main(list(argv)[1:], hooks))


if __name__ == "__main__":
    run_cli()
