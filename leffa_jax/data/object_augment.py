"""FastComposer's training-time object augmentations (`fastcomposer/transforms.py`,
`get_object_transforms` without --no_object_augmentation), in numpy on uint8 HWC images.

The official pipeline runs on a uint8 CHW tensor, after the segment processor (noise background,
bbox crop):

    1. RandomApply([RandomZoomIn(1.0, 2.0)], p=0.5)    `zoom_in` (resize, then crop top square)
    2. PadToSquare, Resize((R, R))                      `pad_to_square`, `resize_to` (as the
                                                        no-augmentation path)
    3. RandomApply([RandomAffine(30, BILINEAR)], p=0.75)  `rotate`
    4. RandomApply([ColorJitter(.5, .5, .5, .5)], p=0.5)  `color_jitter` (`adjust_*`)
    5. RandomApply([GaussianBlur(5, (0.1, 2.0))], p=0.5)  `gaussian_blur`
    6. RandomGrayscale(p=0.1)                           `grayscale`
    7. RandomHorizontalFlip(p=0.5)                      `hflip`
    8. RandomApply([ElasticTransform()], p=0.5)         `elastic` (`elastic_displacement`)
    9. ConvertImageDtype(float32)                       the caller's / 255

Every op reproduces torchvision's tensor implementation on uint8 (float32 arithmetic, then the
same cast back: `_blend` clamps and truncates, grayscale truncates, hue truncates x 255.999,
resize / blur / grid sampling round half to even). Randomness: `draw_params` takes everything
from a numpy Generator in the official draw order (a RandomApply's coin, then its transform's
parameters only if it applies), so a run resumes exactly; torch's own draws are not reproduced.

Rotation convention: `RandomAffine` calls `F.affine`, whose angle is CLOCKWISE on screen (y
down; `F.rotate` negates it to be counter-clockwise). The rotation is about the image centre in
pixel-index coordinates ((w - 1) / 2, (h - 1) / 2): torchvision's grid uses pixel centres
j + 0.5 - w / 2 with align_corners=False. Pixels mapped from outside are 0, and torchvision's
fill mask also scales the border pixels by the in-image share of their bilinear weights.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from leffa_jax.imageio import pad_to_square, resize_bilinear

_F32 = np.float32


# ----------------------------------------------------------------------------- geometry


def zoom_in(image: np.ndarray, zoom: float) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8: FastComposer `RandomZoomIn` with its drawn factor `zoom`
    (float32, in [1, 2)): resize to (int(zoom H), int(zoom W)) as `resize_bilinear`, then
    `CropTopSquare` (a portrait result keeps its top W rows)."""
    h, w = image.shape[:2]
    z = _F32(zoom)
    out = resize_bilinear(image, (int(z * _F32(h)), int(z * _F32(w))))
    hh, ww = out.shape[:2]
    return out[:ww] if hh > ww else out


def resize_to(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (R, R, 3) with PIL's bilinear resize: the object Resize((R, R))
    exactly as `leffa_jax.data.fastcomposer` does it without augmentation (PIL's uint8 filter
    is within one level of torchvision's)."""
    if image.shape[:2] == (resolution, resolution):
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
        (resolution, resolution), Image.BILINEAR))


def _fma(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once (the product of two float32 is exact in float64)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64)
            + np.asarray(c, np.float64)).astype(_F32)


def _unnormalize(g: np.ndarray, size: int) -> np.ndarray:
    """grid_sample's align_corners=False coordinate: normalised float32 -> source pixel,
    (g + 1) * (size / 2) - 0.5 with the fused multiply-add of torch's CPU kernel."""
    return _fma(g + _F32(1.0), _F32(size) / _F32(2.0), _F32(-0.5))


def _grid_sample_fill0(image: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """torchvision `_apply_grid_transform(img, grid, "bilinear", fill=[0, ...])` on uint8
    (H, W, C) with a float32 grid (h, w) per axis: bilinear grid_sample (zeros padding) of the
    image and of a ones mask, image * mask, round half even -> uint8."""
    h, w = image.shape[:2]
    x = _unnormalize(gx.astype(_F32), w)
    y = _unnormalize(gy.astype(_F32), h)
    x0, y0 = np.floor(x), np.floor(y)
    wx = x - x0           # weight of the east column
    ex = _F32(1.0) - wx   # weight of the west column
    ny = y - y0           # weight of the south row
    sy = _F32(1.0) - ny   # weight of the north row
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    img = image.astype(_F32)
    out = mask = None
    # torch: nw_val * nw + ne_val * ne + sw_val * sw + se_val * se, contracted to multiply-adds
    for dy, wy in ((0, sy), (1, ny)):
        for dx, wxx in ((0, ex), (1, wx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            weight = (wy * wxx).astype(_F32)[..., None]
            v = np.where(inside[..., None], img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)],
                         _F32(0.0))
            ones = inside[..., None].astype(_F32)
            if out is None:
                out, mask = (v * weight).astype(_F32), (ones * weight).astype(_F32)
            else:
                out, mask = _fma(v, weight, out), _fma(ones, weight, mask)
    out = out * mask  # img * mask + (1 - mask) * fill, fill 0
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3): torchvision `RandomAffine(degrees)` with its drawn
    `angle` (degrees, clockwise on screen), i.e. `F.affine(img, angle, (0, 0), 1.0, (0, 0),
    BILINEAR, fill=[0, 0, 0])`: rotation about ((W - 1) / 2, (H - 1) / 2), outside = 0."""
    h, w = image.shape[:2]
    rot = math.radians(angle)
    # _get_inverse_affine_matrix(center=[0, 0], angle, [0, 0], 1.0, [0, 0]) with no shear
    cos, sin = math.cos(rot), math.sin(rot)
    theta = np.array([[cos, sin, 0.0], [-sin, cos, 0.0]], _F32)
    # _gen_affine_grid: pixel centres relative to the image centre, theta / (w / 2, h / 2)
    xs = np.arange(w, dtype=_F32) + _F32(0.5 - w * 0.5)
    ys = np.arange(h, dtype=_F32) + _F32(0.5 - h * 0.5)
    scale = np.array([0.5 * w, 0.5 * h], _F32)
    t = theta / scale[:, None]
    xg, yg = np.meshgrid(xs, ys)
    gx = (xg * t[0, 0] + yg * t[0, 1]) + t[0, 2]  # float32, as torch's bmm here
    gy = (xg * t[1, 0] + yg * t[1, 1]) + t[1, 2]
    return _grid_sample_fill0(image, gx, gy)


# ----------------------------------------------------------------------------- colour


def _blend(img1: np.ndarray, img2: np.ndarray, ratio: float) -> np.ndarray:
    """torchvision `_blend` on uint8: float32 ratio * img1 + (1 - ratio) * img2, clamp to
    [0, 255], truncate to uint8."""
    out = _F32(ratio) * img1.astype(_F32) + _F32(1.0 - ratio) * img2.astype(_F32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 1) uint8: (0.2989 R + 0.587 G + 0.114 B) in float32,
    truncated (torchvision `rgb_to_grayscale`; white becomes 254)."""
    x = image.astype(_F32)
    g = _F32(0.2989) * x[..., 0] + _F32(0.587) * x[..., 1] + _F32(0.114) * x[..., 2]
    return g.astype(np.uint8)[..., None]


def grayscale(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3): torchvision `rgb_to_grayscale(img, 3)` (what
    RandomGrayscale applies to a 3-channel image)."""
    return np.repeat(_gray(image), 3, axis=-1)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 (H, W, 3): torchvision `adjust_brightness` (blend with black)."""
    return _blend(image, np.zeros_like(image), factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 (H, W, 3): torchvision `adjust_contrast` (blend with the float32 mean of the
    truncated grayscale)."""
    g = _gray(image)
    # torch sums the float32 grayscale (exact while below 2**24) and divides by the count
    mean = _F32(np.sum(g, dtype=np.int64)) / _F32(g.size)
    return _blend(image, np.full((1, 1, 1), mean, _F32), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 (H, W, 3): torchvision `adjust_saturation` (blend with the uint8 grayscale)."""
    return _blend(image, _gray(image), factor)


def _rgb2hsv(img: np.ndarray) -> np.ndarray:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc = img.max(axis=-1)
    minc = img.min(axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = np.ones_like(maxc)
    s = cr / np.where(eqc, ones, maxc)
    cr_divisor = np.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r).astype(_F32) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)).astype(_F32) * (_F32(2.0) + rc - bc)
    hb = ((maxc != g) & (maxc != r)).astype(_F32) * (_F32(4.0) + gc - rc)
    h = hr + hg + hb
    h = np.fmod(h / _F32(6.0) + _F32(1.0), _F32(1.0))
    return np.stack((h, s, maxc), axis=-1)


def _hsv2rgb(img: np.ndarray) -> np.ndarray:
    h, s, v = img[..., 0], img[..., 1], img[..., 2]
    i = np.floor(h * _F32(6.0))
    f = h * _F32(6.0) - i
    i = i.astype(np.int32)
    p = np.clip(v * (_F32(1.0) - s), 0.0, 1.0).astype(_F32)
    q = np.clip(v * (_F32(1.0) - s * f), 0.0, 1.0).astype(_F32)
    t = np.clip(v * (_F32(1.0) - s * (_F32(1.0) - f)), 0.0, 1.0).astype(_F32)
    i = np.mod(i, 6)
    table = np.stack([np.stack(c, axis=-1) for c in
                      ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], axis=-1)
    return np.take_along_axis(table, i[..., None, None], axis=-2)[..., 0, :]


def adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """uint8 (H, W, 3): torchvision `adjust_hue` (x / 255 in float32, HSV, hue shifted by
    `factor` in [-0.5, 0.5] mod 1, back to RGB, x 255.999 truncated)."""
    img = image.astype(_F32) / _F32(255.0)
    hsv = _rgb2hsv(img)
    h = hsv[..., 0] + _F32(factor)
    h = h - np.floor(h)  # torch remainder(h, 1.0)
    hsv = np.stack((h.astype(_F32), hsv[..., 1], hsv[..., 2]), axis=-1)
    rgb = _hsv2rgb(hsv)
    return (rgb * _F32(255.0 + 1.0 - 1e-3)).astype(np.uint8)


def color_jitter(image: np.ndarray, order, brightness: float, contrast: float,
                 saturation: float, hue: float) -> np.ndarray:
    """uint8 (H, W, 3): torchvision `ColorJitter.forward` with its drawn parameters: the four
    adjustments in `order` (a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    ops = (lambda x: adjust_brightness(x, brightness), lambda x: adjust_contrast(x, contrast),
           lambda x: adjust_saturation(x, saturation), lambda x: adjust_hue(x, hue))
    for k in order:
        image = ops[int(k)](image)
    return image


# ----------------------------------------------------------------------------- filters


def _gaussian_kernel1d(kernel_size: int, sigma: float) -> np.ndarray:
    """torchvision `_get_gaussian_kernel1d` in float32."""
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size).astype(_F32)
    pdf = np.exp(_F32(-0.5) * (x / _F32(sigma)) ** 2).astype(_F32)
    return (pdf / pdf.sum(dtype=_F32)).astype(_F32)


def _gaussian_kernel2d(kernel_size: int, sigma: float) -> np.ndarray:
    """torchvision `_get_gaussian_kernel2d` (k_y k_x^T) in float32."""
    k = _gaussian_kernel1d(kernel_size, sigma)
    return (k[:, None] * k[None, :]).astype(_F32)


def gaussian_blur(image: np.ndarray, sigma: float, kernel_size: int = 5) -> np.ndarray:
    """uint8 (H, W, 3): torchvision `GaussianBlur(kernel_size)` with its drawn `sigma`
    (`F.gaussian_blur(img, [k, k], [sigma, sigma])`: the float32 2-D kernel over reflect
    padding without edge repeat, taps accumulated row-major with multiply-adds as torch's CPU
    depthwise conv2d; round half even)."""
    k2 = _gaussian_kernel2d(kernel_size, sigma)
    r = kernel_size // 2
    h, w = image.shape[:2]
    xp = np.pad(image.astype(_F32), [(r, r), (r, r), (0, 0)], mode="reflect")
    acc = None
    for i in range(kernel_size):
        for j in range(kernel_size):
            term = xp[i:i + h, j:j + w]
            acc = (term * k2[i, j]).astype(_F32) if acc is None else _fma(term, k2[i, j], acc)
    return np.clip(np.round(acc), 0, 255).astype(np.uint8)


def _blur_separable(x: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """(H, W) float -> float64: torchvision's Gaussian blur (reflect padding without edge
    repeat) as two float64 1-D passes (for the displacement field, which is not rounded)."""
    k = _gaussian_kernel1d(kernel_size, sigma).astype(np.float64)
    r = kernel_size // 2
    h, w = x.shape
    xp = np.pad(x.astype(np.float64), r, mode="reflect")
    rows = sum(k[i] * xp[i:i + h, :] for i in range(kernel_size))
    return sum(k[j] * rows[:, j:j + w] for j in range(kernel_size))


def hflip(image: np.ndarray) -> np.ndarray:
    """(H, W, C): torchvision `hflip` (RandomHorizontalFlip)."""
    return image[:, ::-1]


def elastic_displacement(noise: np.ndarray, alpha: float = 50.0,
                         sigma: float = 5.0) -> np.ndarray:
    """torchvision `ElasticTransform.get_params(alpha, sigma, [H, W])` from its two uniform
    draws `noise` (2, H, W) float32 in [0, 1) (torch.rand for dx, then dy): each mapped to
    [-1, 1), blurred with kernel int(8 sigma + 1) made odd (reflect padding), dx x alpha / W,
    dy x alpha / H. -> (H, W, 2) float32 in normalised grid units."""
    _, h, w = noise.shape
    k = int(8 * sigma + 1)
    k += k % 2 == 0
    d = noise.astype(_F32) * _F32(2.0) - _F32(1.0)
    if sigma > 0:
        d = np.stack([_blur_separable(c, k, sigma) for c in d]).astype(_F32)
    dx = d[0] * _F32(alpha) / _F32(w)
    dy = d[1] * _F32(alpha) / _F32(h)
    return np.stack([dx, dy], axis=-1).astype(_F32)


def _identity_axis(s: int) -> np.ndarray:
    """torch.linspace((1 - s) / s, (s - 1) / s, s) in float32 (its two-sided evaluation,
    start + step i below the middle, end - step (s - 1 - i) above, as multiply-adds)."""
    start, end = _F32((-s + 1) / s), _F32((s - 1) / s)
    if s == 1:
        return np.array([start], _F32)
    step = (end - start) / _F32(s - 1)
    i = np.arange(s)
    lo = _fma(step, i.astype(_F32), start)
    hi = _fma(-step, (s - 1 - i).astype(_F32), end)
    return np.where(i < s // 2, lo, hi).astype(_F32)


def elastic(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8: torchvision `F.elastic_transform(img, displacement, BILINEAR,
    fill=[0])` with `displacement` (H, W, 2) float32 from `elastic_displacement`."""
    h, w = image.shape[:2]
    gx = _identity_axis(w)[None, :] + displacement[..., 0]
    gy = _identity_axis(h)[:, None] + displacement[..., 1]
    return _grid_sample_fill0(image, gx.astype(_F32), gy.astype(_F32))


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class ObjectAugmentParams:
    """One object's drawn augmentation (None / False = that step is skipped)."""

    zoom: float | None = None                 # RandomZoomIn factor (float32 value in [1, 2))
    angle: float | None = None                # RandomAffine angle, degrees in [-30, 30]
    jitter: tuple | None = None               # (order (4,), brightness, contrast, saturation, hue)
    blur_sigma: float | None = None           # GaussianBlur sigma in [0.1, 2]
    grayscale: bool = False
    flip: bool = False
    elastic_noise: np.ndarray | None = None   # (2, R, R) float32 uniform draws


def _uniform32(rng: np.random.Generator, low: float, high: float) -> float:
    """torch.empty(1).uniform_(low, high).item(): a float32 value."""
    return float(_F32(low + (high - low) * rng.random()))


def draw_params(rng: np.random.Generator, resolution: int) -> ObjectAugmentParams:
    """Draw one object's augmentation from `rng`, in the official order (each RandomApply's
    coin, then its transform's parameters only when it applies)."""
    zoom = angle = jitter = sigma = noise = None
    if rng.random() < 0.5:
        zoom = float(_F32(_F32(rng.random()) * _F32(1.0) + _F32(1.0)))
    if rng.random() < 0.75:
        angle = _uniform32(rng, -30.0, 30.0)
    if rng.random() < 0.5:
        order = tuple(int(k) for k in rng.permutation(4))
        jitter = (order, _uniform32(rng, 0.5, 1.5), _uniform32(rng, 0.5, 1.5),
                  _uniform32(rng, 0.5, 1.5), _uniform32(rng, -0.5, 0.5))
    if rng.random() < 0.5:
        sigma = _uniform32(rng, 0.1, 2.0)
    gray = bool(rng.random() < 0.1)
    flip = bool(rng.random() < 0.5)
    if rng.random() < 0.5:
        noise = rng.random((2, resolution, resolution), dtype=_F32)
    return ObjectAugmentParams(zoom, angle, jitter, sigma, gray, flip, noise)


def apply_params(crop: np.ndarray, resolution: int, params: ObjectAugmentParams) -> np.ndarray:
    """uint8 (H, W, 3) subject crop -> uint8 (R, R, 3): steps 1-8 with drawn `params` (zoom
    before PadToSquare + Resize, the rest after); with nothing drawn it is exactly the
    no-augmentation crop."""
    x = np.ascontiguousarray(crop, np.uint8)
    if params.zoom is not None:
        x = zoom_in(x, params.zoom)
    x = resize_to(pad_to_square(x), resolution)
    if params.angle is not None:
        x = rotate(x, params.angle)
    if params.jitter is not None:
        x = color_jitter(x, *params.jitter)
    if params.blur_sigma is not None:
        x = gaussian_blur(x, params.blur_sigma)
    if params.grayscale:
        x = grayscale(x)
    if params.flip:
        x = hflip(x)
    if params.elastic_noise is not None:
        x = elastic(x, elastic_displacement(params.elastic_noise))
    return np.ascontiguousarray(x)


def augment_object(crop: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) subject crop -> uint8 (R, R, 3): the official object augmentation
    (steps 1-8) with parameters drawn from `rng`; / 255 gives ConvertImageDtype (step 9)."""
    return apply_params(crop, int(resolution), draw_params(rng, int(resolution)))
