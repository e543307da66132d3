"""Where conversions write: checked before any work, and written so that a failure leaves
nothing behind.

    check_output_file    a `.pth`/`.safetensors` target: parent exists and is writable, not a
                         folder, not the source nor inside it
    check_output_folder  a checkpoint folder target: not overlapping a source; empty or new, or
                         (with overwrite) an existing checkpoint folder that gets replaced
    write_folder_atomically   write into a temporary sibling, then swap it in
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import TypeVar

from leffa_jax.weights.tensor_io import CheckpointError, CheckpointNotFoundError

T = TypeVar("T")


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (after resolving links)."""
    path, folder = _real(path), _real(folder)
    return path == folder or os.path.commonpath([path, folder]) == folder


def check_not_source(out: str, sources: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is a source, lies inside one or contains one."""
    for source in sources:
        if source is None:
            continue
        source = os.fspath(source)
        if _inside(out, source) or _inside(source, out):
            where = "is" if _real(out) == _real(source) else (
                "is inside" if _inside(out, source) else "contains")
            raise CheckpointError(f"output {out} {where} the source {source}: writing it would "
                                  "damage the source; choose an output outside it")


def check_writable_folder(folder: str, what: str = "output folder") -> None:
    """`folder` exists, is a folder and a file can be created in it (probed, so read-only mounts
    and permissions are both caught)."""
    if not os.path.exists(folder):
        raise CheckpointNotFoundError(f"{what} {folder} does not exist: create it first "
                                      f"(mkdir -p {folder})")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{what} {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write into {what} {folder} ({e.strerror or e}): choose "
                              "another output or make it writable") from None


def check_output_file(out_path: str, sources: Iterable[str | os.PathLike | None],
                      extensions: tuple[str, ...]) -> None:
    """Before any work: `out_path` ends in one of `extensions`, is not a folder, its parent is a
    writable folder and it is not (inside) a source."""
    if not out_path.endswith(extensions):
        raise CheckpointError(f"{out_path}: output must end in {', '.join(extensions)}")
    if os.path.isdir(out_path):
        raise CheckpointError(f"{out_path} is a folder; give a file name, e.g. "
                              f"{os.path.join(out_path, 'model' + extensions[0])}")
    check_not_source(out_path, sources)
    check_writable_folder(os.path.dirname(os.path.abspath(out_path)), "the output's folder")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_folder(out_dir: str, sources: Iterable[str | os.PathLike | None],
                        overwrite: bool, marker: str) -> None:
    """Before any work: `out_dir` does not overlap a source; it is new, empty, or (only with
    `overwrite`) a checkpoint folder holding `marker`; the folder it will be created in (its
    parents are created) is writable."""
    check_not_source(out_dir, sources)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"output {out_dir} is a file; give a folder")
        if os.listdir(out_dir):
            if not overwrite:
                raise CheckpointError(f"output folder {out_dir} exists and is not empty: choose a "
                                      "new folder, or pass --overwrite (overwrite=True) to "
                                      "replace it as a whole")
            if not os.path.isfile(os.path.join(out_dir, marker)):
                raise CheckpointError(f"output folder {out_dir} is not empty and is not a "
                                      f"checkpoint (no {marker}); refusing to replace it even "
                                      "with --overwrite: choose a new or empty folder")
    parent = os.path.dirname(os.path.abspath(out_dir))
    check_writable_folder(_nearest_existing(parent), "the output's parent folder")


def write_folder_atomically(out_dir: str, write: Callable[[str], T]) -> T:
    """`write(tmp)` fills a temporary sibling of `out_dir`, which then replaces `out_dir` as a
    whole (nothing of an earlier folder survives). On any failure the temporary folder is removed
    and `out_dir` is left as it was. Returns what `write` returns."""
    target = _real(out_dir)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        result = write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(target, os.path.join(old, name))
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(os.path.join(old, name), target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
