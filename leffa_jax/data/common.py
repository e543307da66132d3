"""Shared pieces of the dataset readers: the raw record, errors, file and keypoint reading.

A reader is a grain random-access source (``__len__``, ``__getitem__``) over pairs. Each item is
a *raw record*: encoded file bytes plus a few small arrays, identical for the folder readers and
for the ArrayRecord form written by the TFDS builders, so one decode stage serves both:

    person, garment, densepose, parse, agnostic_mask, flow_gt: bytes (b"" when absent)
    keypoints: (18, 2) float32 OpenPose-18 (x, y); keypoints_frame: (2,) float32 (W, H) of the
        frame they are in, (0, 0) = the person image's own size
    kind: "viton_hd" | "dresscode" | "deepfashion"; category: garment category ("" for pose)
    name: person file name; files: JSON {field: path} for error messages; pair_index: int64
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

RAW_BYTES_FIELDS = ("person", "garment", "densepose", "parse", "agnostic_mask", "flow_gt")
BAD_KEY = "_bad_sample"

# BODY_25 -> OpenPose-18 (COCO) index map: 0-7 coincide, then hips/knees/ankles, eyes and ears.
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or inconsistent. The message names the file."""


def bad_sample(message: str) -> dict[str, Any]:
    """The marker that replaces a bad sample under on_bad_sample="skip"."""
    log.warning("skipping bad sample: %s", message)
    return {BAD_KEY: message}


def is_bad(example: Any) -> bool:
    return isinstance(example, dict) and BAD_KEY in example


def as_str(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return as_str(x.item())
    return str(x)


def read_bytes(path: epath.Path, field: str, where: str) -> bytes:
    """Read a whole file, raising DataError naming it when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"{field} file missing: {path} (listed by {where}). Restore the file from the "
            "dataset download, remove the pair from the list, or set data.on_bad_sample='skip'."
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {field} file {path} ({where}): {e}") from e


def read_pair_list(path: epath.Path, ncols: Sequence[int] = (2,)) -> list[list[str]]:
    """Whitespace-separated pair list; raises DataError naming the file if absent/empty/bad."""
    if not path.exists():
        raise DataError(
            f"pair list not found: {path}. Check data.root points at the dataset folder "
            "(see docs/data.md for the expected layout)."
        )
    rows = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in ncols:
            raise DataError(f"{path}:{ln}: expected {ncols} columns, got {line!r}")
        rows.append(parts)
    if not rows:
        raise DataError(f"pair list is empty: {path}. It must list at least one pair.")
    return rows


def parse_openpose_json(data: bytes, path: str) -> np.ndarray:
    """OpenPose JSON ({"people": [{"pose_keypoints_2d": [...]}]}, BODY_25 or COCO-18) -> (18, 2).

    Missing people or points give (0, 0), which the mask code treats as missing.
    """
    try:
        obj = json.loads(data)
        people = obj.get("people", [])
        if not people:
            return np.zeros((18, 2), np.float32)
        flat = np.asarray(people[0]["pose_keypoints_2d"], np.float32)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"malformed OpenPose keypoints JSON: {path} ({e})") from e
    if flat.size == 75:
        kp = flat.reshape(25, 3)[list(BODY25_TO_COCO18), :2]
    elif flat.size == 54:
        kp = flat.reshape(18, 3)[:, :2]
    elif flat.size == 36:
        kp = flat.reshape(18, 2)
    else:
        raise DataError(
            f"OpenPose JSON {path}: expected 25 or 18 keypoints, got {flat.size} values"
        )
    return np.ascontiguousarray(kp, np.float32)


def parse_dresscode_json(data: bytes, path: str) -> np.ndarray:
    """DressCode keypoints JSON ({"keypoints": [[x, y, score, id] x 18]}, 384x512) -> (18, 2)."""
    try:
        arr = np.asarray(json.loads(data)["keypoints"], np.float32).reshape(-1, 4)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"malformed DressCode keypoints JSON: {path} ({e})") from e
    if arr.shape[0] != 18:
        raise DataError(f"DressCode keypoints {path}: expected 18 points, got {arr.shape[0]}")
    return np.ascontiguousarray(arr[:, :2])


def make_record(
    *,
    kind: str,
    category: str,
    name: str,
    pair_index: int,
    files: dict[str, str],
    keypoints: np.ndarray | None = None,
    keypoints_frame: tuple[float, float] = (0.0, 0.0),
    **blobs: bytes,
) -> dict[str, Any]:
    """Assemble a raw record (see module docstring); absent byte fields become b""."""
    rec: dict[str, Any] = {f: blobs.get(f, b"") for f in RAW_BYTES_FIELDS}
    unknown = set(blobs) - set(RAW_BYTES_FIELDS)
    if unknown:
        raise ValueError(f"unknown raw fields {unknown}")
    rec["keypoints"] = (
        np.zeros((18, 2), np.float32) if keypoints is None else keypoints.astype(np.float32)
    )
    rec["keypoints_frame"] = np.asarray(keypoints_frame, np.float32)
    rec["kind"] = kind
    rec["category"] = category
    rec["name"] = name
    rec["files"] = json.dumps(files)
    rec["pair_index"] = np.int64(pair_index)
    return rec


class PairSource:
    """Base of the folder readers: a grain RandomAccessDataSource over pairs.

    Subclasses fill ``self.pairs`` (a list of per-pair descriptions) and implement ``_read(i)``.
    ``on_bad_sample="skip"`` turns a DataError into a bad-sample marker that the pipeline drops
    and counts.
    """

    kind = ""

    def __init__(self, on_bad_sample: str = "error"):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.on_bad_sample = on_bad_sample
        self.pairs: list[Any] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        try:
            return self._read(index)
        except DataError as e:
            if self.on_bad_sample == "skip":
                return bad_sample(str(e))
            raise

    def _read(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} pairs)"
