"""Image files in and out for sampling: loading with clear errors, the official demo's
resize-and-centre on white padding, model-range conversion, PNG writing and result grids.

Arrays here are HWC uint8 (files) or NHWC float32 in [-1, 1] (model inputs).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np


class Fit(NamedTuple):
    """Placement of a (src_h, src_w) image inside (height, width): scale, then offset."""

    scale: float
    new_h: int
    new_w: int
    top: int
    left: int


def fit(src_h: int, src_w: int, height: int, width: int) -> Fit:
    """Official `resize_and_center` geometry: scale = min(H/h, W/w), sizes truncated, centred."""
    scale = min(height / src_h, width / src_w)
    nh, nw = int(src_h * scale), int(src_w * scale)
    return Fit(scale, nh, nw, (height - nh) // 2, (width - nw) // 2)


def load_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """Read an image file -> HWC (or HW for mode "L") uint8. Raises FileNotFoundError /
    ValueError naming the file when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image file ({type(e).__name__}: {e})") from None


def resize_and_center(
    img: np.ndarray, height: int, width: int, *, fill: int = 255, interpolation: str = "cubic"
) -> np.ndarray:
    """The official demo's `resize_and_center` (leffa_utils/utils.py): keep the aspect ratio,
    resize with OpenCV INTER_CUBIC ("nearest" for label-like images), centre on a canvas filled
    with `fill` (white for photos). img HWC or HW uint8 -> (height, width[, C]) uint8."""
    import cv2

    f = fit(img.shape[0], img.shape[1], height, width)
    interp = {"cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}[interpolation]
    resized = cv2.resize(img, (f.new_w, f.new_h), interpolation=interp)
    out = np.full((height, width) + img.shape[2:], fill, dtype=np.uint8)
    out[f.top : f.top + f.new_h, f.left : f.left + f.new_w] = resized.reshape(
        (f.new_h, f.new_w) + img.shape[2:]
    )
    return out


def to_model(img: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5) of the official transform)."""
    return img.astype(np.float32) / 127.5 - 1.0


def mask_to_binary(mask: np.ndarray, path: str = "mask", binarize: bool = False) -> np.ndarray:
    """HW uint8 mask -> HW float32 {0, 1}. Accepts {0, 255} or {0, 1} images; anything else is an
    error unless `binarize` (threshold at half range, as the official mask processor)."""
    vals = np.unique(mask)
    if binarize:
        return (mask >= 128).astype(np.float32)
    if set(vals.tolist()) <= {0, 255}:
        return (mask == 255).astype(np.float32)
    if set(vals.tolist()) <= {0, 1}:
        return mask.astype(np.float32)
    raise ValueError(
        f"{path}: a mask must be black/white (values 0 and 255, or 0 and 1; white = "
        f"region to generate), found {len(vals)} distinct values such as "
        f"{vals[:6].tolist()}; pass --binarize-mask to threshold it at 128"
    )


def save_png(path: str | os.PathLike, img: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.fromarray(np.asarray(img, np.uint8)).save(path, format="PNG")


def grid_row(*images: np.ndarray) -> np.ndarray:
    """Side by side (HW or HWC uint8, same height) -> H x sum(W) x 3 uint8 (masks to grey)."""
    cols = []
    for im in images:
        im = np.asarray(im, np.uint8)
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=-1)
        cols.append(im)
    return np.concatenate(cols, axis=1)
