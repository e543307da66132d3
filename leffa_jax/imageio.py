"""Images in and out, the one place for them: loading with clear errors, the official demo's
resize-and-centre on white padding, model-range conversion both ways (`to_model`, `to_uint8`),
PNG writing, result grids and the official repaint.

Arrays here are HWC uint8 (files) or NHWC float32 in [-1, 1] (model inputs and outputs).
"""

from __future__ import annotations

import io
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


def decode_image(data: bytes, path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """Encoded image bytes -> HWC uint8 ("RGB") or HW uint8 ("L"; "P" for label maps: a palette
    image keeps its palette INDICES, as VITON-HD's parse maps need, other images become "L").
    The one image decoder of the library (the data pipeline uses it too). Raises ValueError
    naming `path` for data that is not an image or is too large to decode safely."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if mode == "P":
                return np.asarray(im if im.mode in ("P", "L") else im.convert("L"))
            return np.asarray(im.convert(mode))
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"{os.fspath(path)} is too large to read ({e}); downscale it first: the model "
            "samples at a few megapixels at most"
        ) from None
    except Exception as e:  # PIL raises several types for truncated or corrupt files
        raise ValueError(
            f"{os.fspath(path)} is not a readable image file ({type(e).__name__}: {e})"
        ) from None


def load_image(path: str | os.PathLike, mode: str = "RGB") -> np.ndarray:
    """Read an image file -> HWC (or HW for modes "L" and "P", see `decode_image`) uint8. Raises
    FileNotFoundError / ValueError naming the file when it is missing or not an image."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not an image file")
    with open(path, "rb") as f:
        return decode_image(f.read(), path, mode)


def check_same_frame(reference_hw, other_hw, reference: str, other: str, what: str,
                     tolerance: float = 0.02) -> None:
    """Raise ValueError when `other` (a mask, densepose or parse map) has another aspect ratio
    than `reference` (the person image) by more than `tolerance`: it cannot show the same frame,
    and resizing it would misalign it."""
    ratio = (reference_hw[0] / reference_hw[1]) / (other_hw[0] / other_hw[1])
    if abs(ratio - 1.0) > tolerance:
        raise ValueError(
            f"{what} {other} is {other_hw[1]}x{other_hw[0]} (WxH) but the person image "
            f"{reference} is {reference_hw[1]}x{reference_hw[0]}: another aspect ratio, so it "
            "would be misaligned. Give it in the person photo's frame"
        )


def resize_and_center(
    img: np.ndarray, height: int, width: int, *, fill: float = 255, interpolation: str = "cubic"
) -> np.ndarray:
    """The official demo's `resize_and_center` (leffa_utils/utils.py): keep the aspect ratio,
    resize with OpenCV INTER_CUBIC ("nearest" for label-like images), centre on a canvas filled
    with `fill` (white for photos: 255, or 1.0 for float images in [-1, 1]). img HWC or HW uint8
    (or float32) -> (height, width[, C]) of the same dtype."""
    import cv2

    f = fit(img.shape[0], img.shape[1], height, width)
    interp = {"cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}[interpolation]
    resized = cv2.resize(img, (f.new_w, f.new_h), interpolation=interp)
    out = np.full((height, width) + img.shape[2:], fill, dtype=img.dtype)
    out[f.top : f.top + f.new_h, f.left : f.left + f.new_w] = resized.reshape(
        (f.new_h, f.new_w) + img.shape[2:]
    )
    return out


def to_model(img: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5) of the official transform)."""
    return img.astype(np.float32) / 127.5 - 1.0


def to_uint8(images):
    """Model range about [-1, 1] -> uint8 `round(clip(x / 2 + 0.5, 0, 1) * 255)`, any shape.
    numpy in, numpy out; a jax array (or tracer, inside `jax.jit`) gives a jax array."""
    if isinstance(images, np.ndarray | np.generic | list | tuple | float | int):
        xp = np
    else:
        import jax.numpy as xp
    x = xp.clip(xp.asarray(images).astype(xp.float32) / 2 + 0.5, 0.0, 1.0)
    return xp.round(x * 255).astype(xp.uint8)


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
    """Write an HWC (or HW) uint8 image as PNG, creating the folder. Written to a temporary
    sibling and renamed, so a failure never leaves a truncated file."""
    from PIL import Image

    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        Image.fromarray(np.asarray(img, np.uint8)).save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def resize_nearest(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of an HW[C] array to (h, w) (index floor(i * H / h))."""
    ys = (np.arange(h) * img.shape[0]) // h
    xs = (np.arange(w) * img.shape[1]) // w
    return img[ys][:, xs]


def grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile uint8 images (HW masks become grey; all resized to the first image's size) into
    rows with `pad` pixels of white between and around them -> (rows*(h+pad)+pad, ...) x 3."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = img if img.ndim == 3 else np.repeat(img[..., None], 3, -1)
            if img.shape[:2] != (h, w):
                img = resize_nearest(img, h, w)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = img[..., :3]
    return out


def repaint_radius(height: int) -> int:
    """Official blur radius of the repaint: height // 100, made odd (1024 -> 11, 512 -> 5)."""
    k = height // 100
    return k + 1 if k % 2 == 0 else k


def apply_repaint(
    person_uint8: np.ndarray, mask: np.ndarray, generated_uint8: np.ndarray
) -> np.ndarray:
    """Official Leffa `do_repaint`: blur the mask with PIL `GaussianBlur(repaint_radius(H))` and
    paste the generated pixels into the person: `person * (1 - m) + generated * m`, truncated to
    uint8. person/generated (B,H,W,3) uint8, mask (B,H,W[,1]) in {0,1} -> (B,H,W,3) uint8."""
    from PIL import Image, ImageFilter

    mask = np.asarray(mask, np.float32)
    if mask.ndim == 4:
        mask = mask[..., 0]
    out = []
    for person, m, generated in zip(person_uint8, mask, generated_uint8, strict=True):
        blurred = Image.fromarray(np.round(m * 255).astype(np.uint8), mode="L").convert("RGB")
        blurred = blurred.filter(ImageFilter.GaussianBlur(repaint_radius(generated.shape[0])))
        weight = np.asarray(blurred) / 255
        out.append((person * (1 - weight) + generated * weight).astype(np.uint8))
    return np.stack(out)


# ----------------------------------------------------------------------------- torch-exact resize
_F32 = np.float32


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """(H, W, C) -> zero padding of |H - W| // 2 on both sides of the short axis (FastComposer
    / Face-diffuser PadToSquare; one pixel short of square when |H - W| is odd)."""
    h, w = image.shape[:2]
    pad = abs(h - w) // 2
    if h == w:
        return image
    spec = ((0, 0), (pad, pad), (0, 0)) if h > w else ((pad, pad), (0, 0), (0, 0))
    return np.pad(image, spec)


def antialias_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """torch `interpolate(bilinear, antialias=True, align_corners=False)` taps for one axis:
    indices (out, T) int64 and float32 weights (out, T) (zero weights pad short rows). The
    triangle filter widened by the downscale factor, normalised per output; plain bilinear
    with edge clamping when upscaling."""
    scale = _F32(in_size) / _F32(out_size)
    support = scale if scale >= 1.0 else _F32(1.0)
    invscale = _F32(1.0) / scale if scale >= 1.0 else _F32(1.0)
    center = scale * (np.arange(out_size) + 0.5).astype(_F32)
    xmin = np.maximum(np.trunc(center - support + _F32(0.5)).astype(np.int64), 0)
    xsize = np.minimum(np.trunc(center + support + _F32(0.5)).astype(np.int64), in_size) - xmin
    taps = max(int(xsize.max()), 1)
    j = np.arange(taps)
    w = np.maximum(_F32(0.0), _F32(1.0) - np.abs(
        ((j[None, :] + xmin[:, None]).astype(_F32) - center[:, None] + _F32(0.5)) * invscale))
    w = np.where(j[None, :] < xsize[:, None], w, _F32(0.0)).astype(_F32)
    total = np.zeros(out_size, _F32)
    for t in range(taps):  # torch sums the taps in order
        total = (total + w[:, t]).astype(_F32)
    w = np.where(total[:, None] != 0, w / np.where(total == 0, _F32(1.0), total)[:, None], w)
    idx = np.minimum(j[None, :] + xmin[:, None], in_size - 1)
    return idx, w.astype(_F32)


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One float32 separable pass, taps accumulated in order with one rounding each (torch's CPU
    kernel: multiply-adds into a float32 accumulator)."""
    idx, wts = antialias_taps(x.shape[axis], out_size)
    x = np.moveaxis(x, axis, 0).astype(np.float64)
    shape = (-1,) + (1,) * (x.ndim - 1)
    acc = (x[idx[:, 0]] * wts[:, 0].astype(np.float64).reshape(shape)).astype(_F32)
    for t in range(1, idx.shape[1]):
        acc = (acc.astype(np.float64)
               + x[idx[:, t]] * wts[:, t].astype(np.float64).reshape(shape)).astype(_F32)
    return np.moveaxis(acc, 0, axis)


def resize_bilinear(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (h, w, C): torchvision `F.resize(tensor, (h, w), BILINEAR,
    antialias=True)` (float32 antialiased bilinear, width pass then height, round half even);
    the input itself when the size already matches."""
    h, w = int(hw[0]), int(hw[1])
    if image.shape[:2] == (h, w):
        return image
    x = image.astype(_F32)
    if x.shape[1] != w:
        x = _resize_axis(x, w, 1)
    if x.shape[0] != h:
        x = _resize_axis(x, h, 0)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)
