"""StoryMaker character inputs, as the official pipeline prepares them (pipeline_sdxl_storymaker.py
L101-126 `bounding_rectangle`, L193-210 `crop_image`; insightface `face_align.norm_crop`).

Per character: an RGB photo (H, W, 3) uint8, a person mask (H, W) or (H, W, 3) uint8 (soft
values allowed) and an insightface face: `normed_embedding` (512,) and `kps` (5, 2) landmarks
(x, y) in photo pixels (left eye, right eye, nose, left / right mouth corner).

    crop  = photo and mask cut to the bounding box of the mask's non-zero pixels
            (cv2.findContours RETR_EXTERNAL on channel 0, union of the boxes)
    m     = cv2.GaussianBlur(mask crop, (5, 5), 0) / 255                     (float64)
    comp  = (255 (1 - m) + m crop).astype(uint8)                              truncating cast
    char  = CLIP pixels of PIL resize(comp, (224, 224)) (bicubic; aspect ratio not kept)
    face  = CLIP pixels of norm_crop(photo, kps, 224): similarity transform (Umeyama) of the kps
            onto 2 x arcface_dst, cv2.warpAffine bilinear, border 0 (from the ORIGINAL photo)
    CLIP pixels = CLIPImageProcessor() defaults (OpenAI mean/std), NHWC float32.

Faces come from the user as arrays (`load_face`: .npz or .json with `normed_embedding` or
`embedding`, and `kps`), or, optionally, from insightface's ONNX models through onnxruntime
(`face_from_onnx`: not a required dependency, imported only there).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from leffa_jax.imageio import load_image

ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
CLIP_SIZE = 224


class CharacterInputs(NamedTuple):
    """What the adapter reads of one character: CLIP-normalised NHWC pixels of the character
    crop and of the aligned face, (224, 224, 3) float32 each, and the ArcFace id (512,)."""

    image_pixels: np.ndarray
    face_pixels: np.ndarray
    id_embedding: np.ndarray


class Face(NamedTuple):
    """insightface's fields StoryMaker reads: normed_embedding (512,), kps (5, 2) (x, y)."""

    normed_embedding: np.ndarray
    kps: np.ndarray


# ----------------------------------------------------------------------------- geometry

def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform src -> dst (N, 2) as a (3, 3) float64 matrix: Umeyama
    1991, as skimage's `SimilarityTransform.estimate`, which keeps the points' dtype (insightface
    passes float32 kps and float32 targets: means, covariance and SVD in float32, the matrix in
    float64; computing all in float64 moves a few warped pixels by one level)."""
    src, dst = np.asarray(src), np.asarray(dst)
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_d, dst_d = src - src_mean, dst - dst_mean
    a = dst_d.T @ src_d / num
    d = np.ones((dim,), np.float64)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1, dtype=np.float64)
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        raise ValueError("face landmarks are degenerate (all equal): cannot align the face")
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(v) > 0:
            t[:dim, :dim] = u @ v
        else:
            s_ = d[dim - 1]
            d[dim - 1] = -1
            t[:dim, :dim] = u @ np.diag(d) @ v
            d[dim - 1] = s_
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_d.var(axis=0).sum() * (s @ d)
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t


def norm_crop(image: np.ndarray, kps: np.ndarray, image_size: int = CLIP_SIZE) -> np.ndarray:
    """insightface `face_align.norm_crop(img, landmark, image_size)` (mode 'arcface'):
    (H, W, 3) uint8 -> (image_size, image_size, 3) uint8 aligned face."""
    import cv2

    kps = np.asarray(kps, np.float32)
    if kps.shape != (5, 2):
        raise ValueError(f"face kps must be (5, 2) landmarks (x, y), got {kps.shape}")
    if image_size % 112 == 0:
        ratio, diff_x = float(image_size) / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"norm_crop: image_size {image_size} must be a multiple of 112 or 128")
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    m = umeyama(kps, dst)[0:2, :]
    return cv2.warpAffine(np.ascontiguousarray(image), m, (image_size, image_size),
                          borderValue=0.0)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the union of the external contours' boxes of mask[..., 0] != 0
    (official `bounding_rectangle`). An empty mask is an error."""
    import cv2

    channel = np.ascontiguousarray(mask[..., 0] if mask.ndim == 3 else mask)
    contours, _ = cv2.findContours(channel, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise ValueError("the character mask is empty (no non-zero pixel): give a person mask "
                         "that covers the character")
    boxes = np.array([cv2.boundingRect(c) for c in contours])
    x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
    x1, y1 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
    return int(x0), int(y0), int(x1), int(y1)


def character_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The white-composited character crop (h, w, 3) uint8 (official `crop_image` L199-203)."""
    import cv2

    image, mask = _rgb(image, "photo"), _mask3(mask, image.shape[:2])
    x0, y0, x1, y1 = bounding_box(mask)
    crop, mask_crop = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    m = cv2.GaussianBlur(mask_crop, (5, 5), 0) / 255
    return (255 * (1 - m) + m * crop).astype(np.uint8)


def _rgb(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"the {what} must be an (H, W, 3) uint8 RGB array, got {image.dtype} "
                         f"{image.shape}")
    return image


def _mask3(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0] if mask.shape[-1] in (1, 3, 4) else mask
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"a character mask must be (H, W) or (H, W, 3) uint8, got {mask.dtype} "
                         f"{mask.shape}")
    if mask.shape != tuple(hw):
        raise ValueError(f"the character mask is {mask.shape[0]}x{mask.shape[1]}, its photo "
                         f"{hw[0]}x{hw[1]}: they must have the same size")
    return np.ascontiguousarray(np.repeat(mask[..., None], 3, axis=-1))


# ----------------------------------------------------------------------------- CLIP pixels

def clip_pixels(images: np.ndarray) -> np.ndarray:
    """(N, 224, 224, 3) uint8 -> CLIPImageProcessor() pixels (N, 224, 224, 3) float32 (the
    default processor: resize / centre crop are no-ops at 224; x / 255, OpenAI mean / std)."""
    from leffa_jax.nn.clip_preprocess import clip_preprocess

    return np.asarray(clip_preprocess(np.asarray(images, np.uint8)), np.float32)


def resize_224(image: np.ndarray) -> np.ndarray:
    """PIL `Image.resize((224, 224))` (bicubic default), aspect ratio not kept."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((CLIP_SIZE, CLIP_SIZE)))


def prepare_character(image: np.ndarray, mask: np.ndarray, face: Face) -> CharacterInputs:
    """One character's adapter inputs from its photo, person mask and insightface face."""
    image = _rgb(image, "photo")
    embedding = np.asarray(face.normed_embedding, np.float32).reshape(-1)
    crop = resize_224(character_crop(image, mask))
    aligned = norm_crop(image, face.kps, CLIP_SIZE)
    pixels = clip_pixels(np.stack([crop, aligned]))
    return CharacterInputs(pixels[0], pixels[1], embedding)


# ----------------------------------------------------------------------------- faces

def _face_from_mapping(data, path: str) -> Face:
    keys = set(data.keys())
    if "kps" not in keys or not keys & {"normed_embedding", "embedding"}:
        raise ValueError(f"{path}: a face needs 'kps' (5, 2) and 'normed_embedding' (512,) (or "
                         f"'embedding', L2-normalised here) as insightface's Face; has "
                         f"{sorted(keys)}")
    if "normed_embedding" in keys:
        emb = np.asarray(data["normed_embedding"], np.float32).reshape(-1)
    else:
        emb = np.asarray(data["embedding"], np.float32).reshape(-1)
        emb = emb / np.linalg.norm(emb)
    kps = np.asarray(data["kps"], np.float32)
    if kps.shape != (5, 2) or not np.all(np.isfinite(kps)) or not np.all(np.isfinite(emb)):
        raise ValueError(f"{path}: kps must be five finite (x, y) landmarks, got {kps.shape}")
    return Face(emb, kps)


def load_face(path: str | os.PathLike) -> Face:
    """A face as insightface gives it, saved by the user: .npz (`np.savez(path, kps=face.kps,
    normed_embedding=face.normed_embedding)`) or .json {"kps": [[x, y] x5], "normed_embedding":
    [512 floats]}."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"face file {path} not found")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return _face_from_mapping({k: data[k] for k in data.files}, path)
    if path.endswith(".json"):
        with open(path) as f:
            return _face_from_mapping(json.load(f), path)
    raise ValueError(f"{path}: a face file is .npz or .json with kps and normed_embedding "
                     "(insightface Face fields)")


def load_character(image_path: str, mask_path: str, face_path: str) -> CharacterInputs:
    """`prepare_character` from files (image: RGB; mask: any mode, channel 0 of its RGB)."""
    return prepare_character(load_image(image_path), load_image(mask_path), load_face(face_path))


def arcface_normalisation(recognition_model: str) -> tuple[float, float]:
    """(mean, std) insightface's ArcFaceONNX uses for a recognition model: (0, 1) for an mxnet
    export (a node named Sub*/_minus* and one named Mul*/_mul* among its first 8: the model
    normalises itself), else (127.5, 127.5). Reading node names needs the `onnx` package;
    without it the common case (127.5, 127.5, every insightface model pack) is assumed."""
    try:
        import onnx
    except ImportError:
        return 127.5, 127.5
    names = [node.name for node in onnx.load(recognition_model).graph.node[:8]]
    mxnet = (any(n.startswith(("Sub", "_minus")) for n in names)
             and any(n.startswith(("Mul", "_mul")) for n in names))
    return (0.0, 1.0) if mxnet else (127.5, 127.5)


def face_from_onnx(image: np.ndarray, kps: np.ndarray, recognition_model: str) -> Face:
    """Optional: the ArcFace embedding of a face whose landmarks are known, from insightface's
    recognition ONNX model (e.g. buffalo_l `w600k_r50.onnx`) through onnxruntime (an optional
    dependency: `pip install onnxruntime`), as insightface's `ArcFaceONNX.get` computes it:
    `norm_crop` of the photo to the model's input size (112), the network fed RGB (insightface
    is handed BGR photos and swaps them back, `blobFromImages(swapRB=True)`), (x - mean) / std
    (`arcface_normalisation`), NCHW float32; `normed_embedding` = the output / its L2 norm.
    image: (H, W, 3) uint8 RGB; kps: (5, 2) landmarks (x, y)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("face_from_onnx needs onnxruntime (optional): pip install onnxruntime; "
                          "or give the face as arrays (.npz with kps and normed_embedding)"
                          ) from None
    if not os.path.isfile(recognition_model):
        raise FileNotFoundError(f"ArcFace ONNX model {recognition_model} not found (insightface "
                                "buffalo_l w600k_r50.onnx)")
    session = onnxruntime.InferenceSession(recognition_model, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    size = model_input.shape[2] if isinstance(model_input.shape[2], int) else 112
    mean, std = arcface_normalisation(recognition_model)
    aligned = norm_crop(_rgb(image, "photo"), kps, size)
    blob = ((aligned.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]
    emb = session.run(None, {model_input.name: blob})[0].reshape(-1)
    if not np.all(np.isfinite(emb)) or not np.linalg.norm(emb) > 0:
        raise ValueError(f"{recognition_model}: the recognition model gave a zero or non-finite "
                         "embedding; is it an ArcFace recognition model (1x3x112x112 -> 512)?")
    return Face((emb / np.linalg.norm(emb)).astype(np.float32), np.asarray(kps, np.float32))
