"""Image folders the way the authors' evaluation reads them (VtonEval / CatVTON `eval.py`).

- Listing: pytorch-fid takes the folder's top level (`*.{ext}`, lower-case extensions, sorted);
  clean-fid walks it recursively (`**/*.{ext}`, also JPG/PNG/JPEG, sorted); VtonEval pairs
  `.jpg`/`.png` files recursively by id = the 8 characters from the first digit of the name.
- Ground truth of another height: VtonEval copies the GT folder to `<gt>_<height>` with each image
  Lanczos-resized to (int(w * height / h), height) and saved again under its name (so JPEGs are
  re-encoded at PIL's default quality); `vton_resized_gt` does the same in memory.
- clean-fid "clean" resize: each channel as a float32 PIL image, bicubic to 299x299, clipped to
  [0, 255], no re-quantisation (`clean_fid_resize`).
- Loading: PIL `convert("RGB")` -> uint8 HWC (pytorch-fid and clean-fid); VtonEval's paired
  loader uses `ToTensor` without conversion (RGB files are the same).
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

PYTORCH_FID_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
CLEAN_FID_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp",
                        "JPEG", "JPG", "PNG")
VTON_EXTENSIONS = (".jpg", ".png")


def pytorch_fid_files(folder: str) -> list[str]:
    """pytorch-fid `compute_statistics_of_path`: sorted top-level files by extension."""
    return sorted({p for ext in PYTORCH_FID_EXTENSIONS
                   for p in glob.glob(os.path.join(glob.escape(folder), f"*.{ext}"))})


def clean_fid_files(folder: str) -> list[str]:
    """clean-fid `get_folder_features`: sorted recursive files by extension (npy not supported)."""
    return sorted({p for ext in CLEAN_FID_EXTENSIONS
                   for p in glob.glob(os.path.join(glob.escape(folder), f"**/*.{ext}"),
                                      recursive=True)})


def vton_files(folder: str) -> list[str]:
    """VtonEval `scan_files_in_dir(postfix={'.jpg', '.png'})`: recursive, case-sensitive,
    returned sorted (VtonEval keeps os.scandir order; its metrics do not depend on it)."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if os.path.splitext(f)[1] in VTON_EXTENSIONS]
    return sorted(out)


def vton_id(filename: str) -> str:
    """VtonEval `extract_id_from_filename`: 8 characters from the first digit."""
    for i, c in enumerate(filename):
        if c.isdigit():
            return filename[i:i + 8]
    raise ValueError(f"cannot pair {filename!r}: its name has no digit (VtonEval pairs by the "
                     "8 characters from the first digit)")


def vton_pairs(gt_folder: str, pred_folder: str) -> tuple[list[tuple[str, str]], list[str]]:
    """[(gt_path, pred_path)] in prediction order and the predictions without a GT."""
    gt = {vton_id(os.path.basename(p)): p for p in vton_files(gt_folder)}
    pairs, unmatched = [], []
    for p in vton_files(pred_folder):
        key = vton_id(os.path.basename(p))
        (pairs.append((gt[key], p)) if key in gt else unmatched.append(p))
    return pairs, unmatched


def load_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3) via PIL convert('RGB'); a clear error for unreadable files."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _resize_to_height(img: Image.Image, height: int) -> Image.Image:
    w, h = img.size
    return img.resize((int(w * height / h), height), Image.LANCZOS)


def vton_resized_gt(path: str, height: int) -> Image.Image:
    """VtonEval `copy_resize_gt` for one file: Lanczos to `height`, saved under the same
    extension with PIL's defaults and read back (the re-encoded image it then evaluates)."""
    with Image.open(path) as img:
        img.load()
        out = _resize_to_height(img, height)
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"{path}: PIL cannot save this extension again")
    buf = io.BytesIO()
    out.save(buf, format=fmt)
    buf.seek(0)
    reread = Image.open(buf)
    reread.load()
    return reread


def image_height(path: str) -> int:
    with Image.open(path) as img:
        return img.height


def vton_first_height(folder: str) -> int:
    """Height of `os.listdir(folder)[0]`, the sample VtonEval compares (it assumes one size)."""
    names = os.listdir(folder)
    if not names:
        raise ValueError(f"{folder} is empty")
    return image_height(os.path.join(folder, names[0]))


def to_height(img: Image.Image, height: int) -> Image.Image:
    """VtonEval `EvalDataset.resize` (a no-op copy when the height already matches)."""
    return _resize_to_height(img, height)


def clean_fid_resize(img: np.ndarray) -> np.ndarray:
    """clean-fid `make_resizer("PIL", False, "bicubic", (299, 299))`: uint8 (H,W,3) ->
    float32 (299, 299, 3) in [0, 255]."""
    chans = []
    for c in range(3):
        ch = Image.fromarray(img[:, :, c].astype(np.float32))  # mode "F"
        ch = ch.resize((299, 299), resample=Image.BICUBIC)
        chans.append(np.asarray(ch).clip(0, 255).reshape(299, 299, 1))
    return np.concatenate(chans, axis=2).astype(np.float32)


def batches(items: Iterable, batch_size: int, key=lambda a: np.shape(a)) -> Iterator[list]:
    """Consecutive groups of up to `batch_size` items with equal `key` (one shape per batch)."""
    group, group_key = [], None
    for item in items:
        k = key(item)
        if group and (k != group_key or len(group) == batch_size):
            yield group
            group = []
        group.append(item)
        group_key = k
    if group:
        yield group
