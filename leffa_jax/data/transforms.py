"""Per-example transforms: decode a raw record, build mask / densepose / garment region, resize
per modality, normalise, and flip every modality together.

Output example (the contract with training and sampling), NHWC without the batch axis:
    person (H, W, 3) f32 in [-1, 1]        target image
    garment (H, W, 3) f32 in [-1, 1]       reference (flat garment, or source person)
    mask (H, W, 1) f32 in {0, 1}           1 = region to generate
    densepose (H, W, 3) f32 in [-1, 1]
    garment_mask (H, W, 1) f32 in {0, 1}   garment region on the target
    flow_gt (H, W, 2) f32, flow_gt_valid (H, W, 1) f32   when the layout ships flow_gt/
    index () int32                          pair index in the source
Resampling: images bicubic (or bilinear), antialiased when shrinking (PIL); masks, parse maps and
densepose nearest; flow bilinear on (flow * valid, valid) then renormalised, valid nearest.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from typing import Any

import grain
import numpy as np
from PIL import Image

from leffa_jax import imageio
from leffa_jax.data import common, masks

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
ASPECT_TOLERANCE = 0.02


def decode_image(data: bytes, path: str, mode: str = "RGB") -> np.ndarray:
    """Decode encoded image bytes to uint8 (H, W, 3) for RGB or (H, W) for L/P (palette indices
    kept) with the library's one decoder, `imageio.decode_image`; names the file."""
    try:
        return imageio.decode_image(data, path, mode)
    except ValueError as e:
        raise common.DataError(
            f"corrupt or unreadable image: {e}. Re-extract it from the dataset archive or set "
            "data.on_bad_sample='skip'."
        ) from e


# np.load parses the .npy header with ast.literal_eval, which is not thread-safe in CPython 3.11
# ("SystemError: AST constructor recursion depth mismatch" under Grain's reader threads).
_NPY_LOCK = threading.Lock()


def decode_npy(data: bytes, path: str) -> np.ndarray:
    try:
        with _NPY_LOCK:
            return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise common.DataError(f"corrupt .npy file: {path} ({e})") from e


def resize_image(img: np.ndarray, size: tuple[int, int], method: str = "bicubic") -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3); size = (H, W)."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), _RESAMPLE[method]))


def resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize (PIL NEAREST: pixel centres) of uint8 (h, w) or (h, w, c); size = (H, W)."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    if arr.ndim == 2 or (arr.shape[-1] == 3 and arr.dtype == np.uint8):
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.NEAREST))
    return np.stack(
        [resize_nearest(np.ascontiguousarray(arr[..., c]), size) for c in range(arr.shape[-1])], -1
    )


def resize_flow(flow: np.ndarray, valid: np.ndarray, size: tuple[int, int]):
    """Resize a normalised flow field (values are resolution-free) and its validity mask."""
    h, w = size
    if flow.shape[:2] == (h, w):
        return flow, valid
    wt = np.asarray(Image.fromarray(valid.astype(np.float32)).resize((w, h), Image.BILINEAR))
    chans = [
        np.asarray(
            Image.fromarray((flow[..., c] * valid).astype(np.float32)).resize(
                (w, h), Image.BILINEAR
            )
        )
        for c in range(2)
    ]
    new_valid = resize_nearest(valid.astype(np.uint8), size).astype(np.float32)
    out = np.stack(chans, -1) / np.maximum(wt, 1e-6)[..., None]
    return (out * new_valid[..., None]).astype(np.float32), new_valid


def to_signed(img_u8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1)."""
    return img_u8.astype(np.float32) / 127.5 - 1.0


def normalize_iuv(iuv: np.ndarray) -> np.ndarray:
    """DensePose IUV image (RGB = (V, U, I)) -> float32 [-1, 1]: ch0,1 / 255, ch2 / 24, *2-1."""
    x = iuv.astype(np.float32)
    out = np.stack([x[..., 0] / 255.0, x[..., 1] / 255.0, x[..., 2] / 24.0], -1)
    return out * 2.0 - 1.0


def _check_aspect(ref_hw, other_hw, ref_path: str, other_path: str, field: str) -> None:
    r1 = ref_hw[0] / ref_hw[1]
    r2 = other_hw[0] / other_hw[1]
    if abs(r1 / r2 - 1.0) > ASPECT_TOLERANCE:
        raise common.DataError(
            f"size mismatch: {field} {other_path} is {other_hw[1]}x{other_hw[0]} (WxH) but the "
            f"person image {ref_path} is {ref_hw[1]}x{ref_hw[0]}; they must show the same frame"
        )


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    height: int
    width: int
    image_resample: str = "bicubic"
    mask_source: str = "auto"  # auto | compute | dataset
    mask_protect_fixed: bool = False
    pose_garment_mask: str = "ones"  # ones | foreground
    with_flow: bool = False
    on_bad_sample: str = "error"


def prepare_example(raw: dict[str, Any], s: PrepareSettings) -> dict[str, np.ndarray]:
    """Raw record -> contract example (see module docstring). Raises DataError naming files."""
    files = json.loads(common.as_str(raw["files"]))
    kind = common.as_str(raw["kind"])
    category = common.as_str(raw["category"])
    size = (s.height, s.width)

    def path(field):
        return files.get(field, f"<{field} of {common.as_str(raw['name'])}>")

    person = decode_image(raw["person"], path("person"))
    garment = decode_image(raw["garment"], path("garment"))
    hw = person.shape[:2]
    out: dict[str, np.ndarray] = {}

    if kind == "deepfashion":
        iuv = decode_image(raw["densepose"], path("densepose"))
        _check_aspect(hw, iuv.shape[:2], path("person"), path("densepose"), "densepose")
        iuv = resize_nearest(iuv, size)
        densepose = normalize_iuv(iuv)
        mask = np.ones(size, np.float32)
        if s.pose_garment_mask == "foreground":
            gmask = (iuv[..., 2] > 0).astype(np.float32)
        else:
            gmask = np.ones(size, np.float32)
    else:
        variant = "hd" if kind == "viton_hd" else "dc"
        if kind == "viton_hd":
            dp = decode_image(raw["densepose"], path("densepose"))
        else:
            dp = np.repeat(decode_image(raw["densepose"], path("densepose"), "P")[..., None], 3, -1)
        _check_aspect(hw, dp.shape[:2], path("person"), path("densepose"), "densepose")
        densepose = to_signed(resize_nearest(dp, size))

        parse = None
        if len(raw["parse"]):
            parse = decode_image(raw["parse"], path("parse"), "P")
            _check_aspect(hw, parse.shape, path("person"), path("parse"), "parse map")
            if kind == "viton_hd":
                try:
                    parse = masks.lip_to_atr(parse)
                except ValueError as e:
                    raise common.DataError(f"parse map {path('parse')}: {e}") from e
        has_shipped = len(raw["agnostic_mask"]) > 0
        if s.mask_source == "dataset" or (s.mask_source == "auto" and has_shipped):
            if not has_shipped:
                raise common.DataError(
                    f"data.mask_source='dataset' but no agnostic mask ships for {path('person')}"
                )
            m = decode_image(raw["agnostic_mask"], path("agnostic_mask"), "L")
            _check_aspect(hw, m.shape, path("person"), path("agnostic_mask"), "agnostic mask")
            mask = (resize_nearest((m > 127).astype(np.uint8), size)).astype(np.float32)
        else:
            if parse is None:
                raise common.DataError(f"no parse map to compute the mask of {path('person')}")
            kp = np.asarray(raw["keypoints"], np.float32).reshape(18, 2)
            frame = np.asarray(raw["keypoints_frame"], np.float32)
            fw, fh = (hw[1], hw[0]) if frame[0] <= 0 else (frame[0], frame[1])
            kp384 = kp * np.array([384.0 / fw, 512.0 / fh], np.float32)
            p384 = resize_nearest(parse, (512, 384))
            m = masks.agnostic_mask(
                p384, kp384, category, variant, protect_fixed=s.mask_protect_fixed
            )
            mask = resize_nearest(m, size).astype(np.float32)
        if parse is None:
            raise common.DataError(f"no parse map for the garment region of {path('person')}")
        gmask = resize_nearest(masks.garment_region(parse, category, variant), size).astype(
            np.float32
        )

    out["person"] = to_signed(resize_image(person, size, s.image_resample))
    out["garment"] = to_signed(resize_image(garment, size, s.image_resample))
    out["mask"] = mask[..., None].astype(np.float32)
    out["densepose"] = densepose.astype(np.float32)
    out["garment_mask"] = gmask[..., None].astype(np.float32)
    if s.with_flow:
        if not len(raw["flow_gt"]):
            raise common.DataError(f"flow_gt missing for {path('person')}")
        f = decode_npy(raw["flow_gt"], path("flow_gt"))
        if f.shape != (hw[0], hw[1], 3):
            raise common.DataError(
                f"size mismatch: flow_gt {path('flow_gt')} has shape {f.shape}, expected "
                f"({hw[0]}, {hw[1]}, 3) to match {path('person')}"
            )
        flow, valid = resize_flow(f[..., :2].astype(np.float32), f[..., 2].astype(np.float32), size)
        out["flow_gt"] = flow
        out["flow_gt_valid"] = valid[..., None]
    out["index"] = np.int32(raw["pair_index"])
    return out


class PrepareExample(grain.transforms.Map):
    """grain Map: raw record -> contract example (bad samples -> marker under 'skip')."""

    def __init__(self, settings: PrepareSettings):
        self.settings = settings

    def map(self, raw):
        if common.is_bad(raw):
            return raw
        try:
            return prepare_example(raw, self.settings)
        except Exception as e:
            err = e
            if not isinstance(e, common.DataError):
                files = common.as_str(raw.get("files", "{}"))
                err = common.DataError(f"cannot prepare the sample with files {files}: {e!r}")
            if self.settings.on_bad_sample == "skip":
                return common.bad_sample(str(err))
            if err is e:
                raise
            raise err from e


def hflip(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mirror every spatial modality; flow x is negated (both images are mirrored)."""
    out = {}
    for k, v in example.items():
        if k == "index":
            out[k] = v
            continue
        v = v[:, ::-1]
        if k == "flow_gt":
            v = v * np.array([-1.0, 1.0], np.float32)
        out[k] = np.ascontiguousarray(v)
    return out


class RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability p, the same draw for every modality of an example."""

    def __init__(self, prob: float):
        self.prob = float(prob)

    def random_map(self, example, rng: np.random.Generator):
        flip = rng.random() < self.prob
        if common.is_bad(example) or not flip:
            return example
        return hflip(example)
