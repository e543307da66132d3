"""Character data for StoryMaker training: images + captions + per-character masks + face
embeddings, read from a folder, prepared as the official `mp_dataset.py` does, batched by Grain;
and a synthetic two-character set with known masks (`write_synthetic_characters`).

Folder layout (`data.root`):

    metadata.jsonl        one JSON object per image:
        {"image": "images/0001.jpg", "caption": "two people ...",
         "characters": [{"mask": "masks/0001_0.png", "face": "faces/0001_0.npz"},
                        {"mask": "masks/0001_1.png", "face": "faces/0001_1.npz"}]}
    images/, masks/, faces/   (any paths relative to the root)

- mask: a PNG the size of the image (grayscale, or RGB read by its first channel); pixels
  > 127 belong to the character (a person segmentation: hair, face, clothes, body).
- face: an .npz with `embedding` (512,) float32, the L2-normalised ArcFace embedding
  (insightface `face.normed_embedding`), and `kps` (5, 2) float32, the 5 landmarks (x, y) in IMAGE
  pixels, insightface order (eyes, nose, mouth corners) (`face.kps`).
Every image of a run has the same number of characters (`data.num_characters`; the official
recipe trains on its two-person list only); the official colour-mask png / torch `.bin` face
format is converted to this layout once (docs/storymaker_training.md).

Per example (official `help_realistic` / `crop_refimg`, mp_dataset.py L179-309):
1. image resized to (data.height, data.width) (PIL bicubic), kps scaled with it; in [-1, 1];
2. per character: mask > 127 -> dilate 7x7 -> GaussianBlur 5x5 (uint8) = m; latent mask =
   cv2.resize(m, (W/8, H/8), INTER_LINEAR) / 255; crop = bounding box of m, composited on white
   `(255 (1 - m) + m crop)` with a truncating uint8 cast; face = `norm_crop(crop, kps -
   crop corner, 224)`; reference = crop rotated by U(-10, 10) degrees (PIL nearest, white fill),
   resized to 224x224 (LANCZOS); both CLIP-normalised (the processor's resize and crop are
   identities at 224);
3. caption tokenised by both tokenizers (77, max_length padding);
4. time ids [H, W, 0, 0, target_h, target_w] (official: target fixed at (int(1.34 R), R)).
Text / image dropout is drawn in the loss (systems/storymaker_train.py), not here.

Example keys and per-example shapes (n characters, h = H/8, w = W/8):
    image (H, W, 3) float32 [-1, 1]     masks (h, w, n) float32 [0, 1]
    clip_images, clip_faces (n, 224, 224, 3) float32 (CLIP-normalised, NHWC)
    face_embeds (n, 512) float32        input_ids, input_ids_2 (77,) int32
    time_ids (6,) float32               index () int32
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from typing import Any

import grain
import numpy as np
from PIL import Image

from leffa_jax.data.common import DataError

CLIP_SIZE = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
FACE_DIM = 512
METADATA = "metadata.jsonl"
# insightface's ArcFace template (face_align.arcface_dst), scaled by size / 112 in norm_crop
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


@dataclasses.dataclass(frozen=True)
class CharacterSettings:
    height: int
    width: int
    num_characters: int
    target_size: tuple[int, int]      # the time ids' target (h, w)
    latent_factor: int = 8
    rotate_degrees: float = 10.0


# ----------------------------------------------------------------------------- reading
def read_metadata(root: str) -> list[dict[str, Any]]:
    """The records of `root/metadata.jsonl`; DataError naming the line for a malformed one."""
    path = os.path.join(root, METADATA)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: a character dataset folder holds metadata.jsonl "
                        "(layout in leffa_jax/data/characters.py), or write the synthetic set "
                        "with write_synthetic_characters(root)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                chars = rec["characters"]
                ok = (isinstance(rec["image"], str) and isinstance(rec.get("caption", ""), str)
                      and all("mask" in c and "face" in c for c in chars))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise DataError(f"{path} line {line_no}: expected {{\"image\": str, \"caption\": "
                                "str, \"characters\": [{\"mask\": str, \"face\": str}, ...]}")
            records.append(rec)
    if not records:
        raise DataError(f"{path} lists no images")
    return records


class CharacterSource:
    """Random access over the records of a character folder (raw paths, nothing decoded)."""

    def __init__(self, root: str, num_characters: int):
        self.root = root
        self.records = read_metadata(root)
        for i, rec in enumerate(self.records):
            if len(rec["characters"]) != num_characters:
                raise DataError(f"{root}/{METADATA} record {i} ({rec['image']}) has "
                                f"{len(rec['characters'])} characters; data.num_characters is "
                                f"{num_characters} (every image of a run needs that many)")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        return {"index": int(index), "root": self.root, **rec}


def _path(root: str, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.join(root, rel)


def _read_image(path: str, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


_NPZ_LOCK = threading.Lock()


def read_face(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(embedding (512,), kps (5, 2)) from a face .npz; DataError naming what is wrong."""
    try:
        # one reader at a time: np.load parses the .npy headers with ast.literal_eval, which is
        # not thread-safe in CPython 3.11 ("SystemError: AST constructor recursion depth
        # mismatch" seen with the Grain read threads, 2026-12-03)
        with _NPZ_LOCK, np.load(path) as z:
            emb, kps = np.asarray(z["embedding"], np.float32), np.asarray(z["kps"], np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot read face file {path} (an .npz with 'embedding' (512,) and "
                        f"'kps' (5, 2)): {e}") from None
    if emb.shape != (FACE_DIM,) or kps.shape != (5, 2):
        raise DataError(f"{path}: embedding {emb.shape} / kps {kps.shape}; expected (512,) / (5, 2)")
    return emb, kps


# ----------------------------------------------------------------------------- preparing
def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) similarity transform mapping src (N, 2) onto dst (N, 2) in the least-squares sense
    (Umeyama 1991, as skimage `SimilarityTransform.estimate`)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[-1] = -1
    u, sv, vt = np.linalg.svd(cov)
    rot = u @ np.diag(sign) @ vt
    scale = (sv * sign).sum() / s.var(0).sum()
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], axis=1)


def norm_crop(image: np.ndarray, kps: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """insightface `face_align.norm_crop`: the face aligned to the ArcFace template scaled to
    `size` (bilinear warp, black border). image (H, W, 3) uint8 -> (size, size, 3) uint8."""
    import cv2

    ratio = size / 112.0 if size % 112 == 0 else size / 128.0
    dst = ARCFACE_DST * ratio
    if size % 112 != 0:
        dst = dst + np.array([8.0 * ratio, 0.0], np.float32)
    matrix = umeyama_similarity(kps, dst)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def clip_normalize(image_u8: np.ndarray) -> np.ndarray:
    """(224, 224, 3) uint8 -> CLIP pixels (x / 255 - mean) / std, float32."""
    return ((image_u8.astype(np.float32) / 255.0) - CLIP_MEAN) / CLIP_STD


def character_mask(mask_u8: np.ndarray) -> np.ndarray:
    """Binary mask (H, W) -> the official soft mask: dilate 7x7, GaussianBlur 5x5 (uint8)."""
    import cv2

    binary = np.where(mask_u8 > 127, 255, 0).astype(np.uint8)
    dilated = cv2.dilate(binary, np.ones((7, 7), np.uint8), iterations=1)
    return cv2.GaussianBlur(dilated, (5, 5), 0)


def crop_character(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """(crop composited on white with the soft mask m: 255 (1 - m) + m crop, truncated to uint8;
    (left, top)) over the bounding box of mask > 0."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise DataError("a character mask is empty")
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = image[top:bottom, left:right]
    m = mask[top:bottom, left:right, None] / 255.0
    out = (255.0 * (1.0 - m) + m * crop).astype(np.uint8)  # truncating cast, as the official
    return out, (int(left), int(top))


def prepare_characters(record: dict, rng: np.random.Generator, s: CharacterSettings,
                       tokenizers) -> dict[str, np.ndarray]:
    """One record -> the example dict of the module docstring."""
    import cv2

    root = record["root"]
    image = _read_image(_path(root, record["image"]), "RGB")
    ih, iw = image.shape[:2]
    scale_xy = np.array([s.width / iw, s.height / ih], np.float32)
    image = np.asarray(Image.fromarray(image).resize((s.width, s.height), Image.BICUBIC))
    h, w = s.height // s.latent_factor, s.width // s.latent_factor
    masks, clip_images, clip_faces, embeds = [], [], [], []
    for char in record["characters"]:
        raw = _read_image(_path(root, char["mask"]), "RGB")[..., 0]
        if raw.shape != (ih, iw):
            raise DataError(f"mask {char['mask']} is {raw.shape[1]}x{raw.shape[0]}, the image "
                            f"{record['image']} is {iw}x{ih}")
        raw = np.asarray(Image.fromarray(raw).resize((s.width, s.height), Image.NEAREST))
        mask = character_mask(raw)
        emb, kps = read_face(_path(root, char["face"]))
        crop, (left, top) = crop_character(image, mask)
        face = norm_crop(crop, kps * scale_xy - np.array([left, top], np.float32))
        angle = float(rng.uniform(-s.rotate_degrees, s.rotate_degrees))
        ref = Image.fromarray(crop).rotate(angle, fillcolor=(255, 255, 255))
        ref = np.asarray(ref.resize((CLIP_SIZE, CLIP_SIZE), Image.LANCZOS))
        masks.append(cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR) / 255.0)
        clip_images.append(clip_normalize(ref))
        clip_faces.append(clip_normalize(face))
        embeds.append(emb)
    caption = record.get("caption", "")
    ids = [np.asarray(t(caption)["input_ids"][0], np.int32) for t in tokenizers]
    th, tw = s.target_size
    return {
        "image": image.astype(np.float32) / 127.5 - 1.0,
        "masks": np.stack(masks, -1).astype(np.float32),
        "clip_images": np.stack(clip_images), "clip_faces": np.stack(clip_faces),
        "face_embeds": np.stack(embeds).astype(np.float32),
        "input_ids": ids[0], "input_ids_2": ids[1],
        "time_ids": np.array([s.height, s.width, 0, 0, th, tw], np.float32),
        "index": np.int32(record["index"]),
    }


class _Prepare(grain.transforms.RandomMap):
    def __init__(self, settings: CharacterSettings, tokenizers):
        self.settings, self.tokenizers = settings, tokenizers

    def random_map(self, record, rng: np.random.Generator):
        return prepare_characters(record, rng, self.settings, self.tokenizers)


def example_shapes(s: CharacterSettings) -> dict[str, tuple[int, ...]]:
    """{key: per-example shape} of the prepared examples (what the Task's batches hold)."""
    n, f = s.num_characters, s.latent_factor
    return {"image": (s.height, s.width, 3), "masks": (s.height // f, s.width // f, n),
            "clip_images": (n, CLIP_SIZE, CLIP_SIZE, 3), "clip_faces": (n, CLIP_SIZE, CLIP_SIZE, 3),
            "face_embeds": (n, FACE_DIM), "input_ids": (77,), "input_ids_2": (77,),
            "time_ids": (6,)}


def make_character_dataset(root: str, settings: CharacterSettings, tokenizers, *,
                           batch_size: int, seed: int = 0, shuffle: bool = True,
                           num_epochs: int | None = None, process_index: int = 0,
                           process_count: int = 1, read_threads: int = 4) -> grain.IterDataset:
    """Per-process Grain pipeline: records p, p + P, ... -> shuffle (a new order per epoch) ->
    repeat -> prepare (seeded per record: rotations replay on resume) -> batches of
    `batch_size // process_count`. `iter(...)` has get_state()/set_state(). `read_threads`
    prepare samples ahead, at most two batches (Grain's default, 16 threads and 500 samples
    ahead, kept 2 CPU cores busy on samples a short run never used)."""
    if read_threads < 0:
        raise DataError(f"data.read_threads must be >= 0 (0: prepare on the training thread), "
                        f"got {read_threads}")
    if batch_size % process_count:
        raise DataError(f"data.batch_size {batch_size} is not divisible by {process_count} "
                        "processes")
    ds = grain.MapDataset.source(CharacterSource(root, settings.num_characters))
    ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(_Prepare(settings, tokenizers), seed=seed + 7919 * process_index + 1)
    local_bs = batch_size // process_count
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * local_bs, 8))
    return ds.to_iter_dataset(read).batch(local_bs, drop_remainder=True)


# ----------------------------------------------------------------------------- synthetic
# Identities of the synthetic set: (name, body colour, hair colour)
IDENTITIES = (("red", (200, 40, 40), (40, 20, 10)), ("blue", (40, 70, 200), (230, 200, 90)),
              ("green", (40, 160, 60), (90, 50, 20)), ("yellow", (220, 200, 40), (20, 20, 20)))


def _draw_character(canvas: np.ndarray, mask: np.ndarray, cx: float, top: float, height: float,
                    body: tuple, hair: tuple) -> np.ndarray:
    """Draw a figure (head, hair, torso, legs) into canvas/mask; returns its 5 face kps."""
    from PIL import ImageDraw

    im, mk = Image.fromarray(canvas), Image.fromarray(mask)
    d, dm = ImageDraw.Draw(im), ImageDraw.Draw(mk)
    r = 0.12 * height                              # head radius
    hy = top + r
    shapes = [("ellipse", (cx - r, hy - r, cx + r, hy + r), (236, 200, 170)),
              ("pieslice", (cx - r, hy - r, cx + r, hy + r), hair),
              ("rectangle", (cx - 0.2 * height, hy + r, cx + 0.2 * height, top + 0.65 * height), body),
              ("rectangle", (cx - 0.15 * height, top + 0.65 * height, cx + 0.15 * height,
                             top + height), tuple(c // 2 for c in body))]
    for kind, box, colour in shapes:
        if kind == "pieslice":
            d.pieslice(box, 180, 360, fill=colour)
            dm.pieslice(box, 180, 360, fill=255)
        else:
            getattr(d, kind)(box, fill=colour)
            getattr(dm, kind)(box, fill=255)
    kps = np.array([[cx - 0.4 * r, hy + 0.1 * r], [cx + 0.4 * r, hy + 0.1 * r],
                    [cx, hy + 0.4 * r], [cx - 0.3 * r, hy + 0.7 * r], [cx + 0.3 * r, hy + 0.7 * r]],
                   np.float32)
    for x, y in kps[:2]:
        d.ellipse((x - 0.08 * r, y - 0.08 * r, x + 0.08 * r, y + 0.08 * r), fill=(20, 20, 20))
    d.line([tuple(kps[3]), tuple(kps[4])], fill=(150, 40, 40), width=max(1, int(0.08 * r)))
    canvas[...] = np.asarray(im)
    mask[...] = np.asarray(mk)
    return kps


def synthetic_face_embeddings(seed: int = 0) -> np.ndarray:
    """(len(IDENTITIES), 512) fixed unit vectors: the synthetic identities' 'ArcFace' embeddings."""
    e = np.random.default_rng(seed + 12345).standard_normal((len(IDENTITIES), FACE_DIM))
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def render_two_characters(rng: np.random.Generator, height: int, width: int,
                          random_order: bool = False
                          ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[int], str]:
    """(image uint8, [mask uint8 x2], [kps x2], [identity x2], caption): two figures side by
    side on a random plain-gradient background, non-overlapping masks. The characters are
    listed left, right; with `random_order` in a random order per image (one more draw), so
    that a character's slot says nothing about where it stands."""
    top_colour, bottom_colour = rng.integers(90, 255, 3), rng.integers(90, 255, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    canvas = ((1 - ramp) * top_colour + ramp * bottom_colour).repeat(width, 1).astype(np.uint8)
    ids = [int(i) for i in rng.choice(len(IDENTITIES), 2, replace=False)]
    masks, kps = [], []
    for slot, ident in enumerate(ids):
        h = height * rng.uniform(0.6, 0.85)
        cx = width * (0.25 + 0.5 * slot + rng.uniform(-0.06, 0.06))
        top = rng.uniform(0.02, 0.98 * height - h)
        mask = np.zeros((height, width), np.uint8)
        kps.append(_draw_character(canvas, mask, cx, top, h, IDENTITIES[ident][1],
                                   IDENTITIES[ident][2]))
        masks.append(mask)
    masks[0] = np.where(masks[1] > 0, 0, masks[0]).astype(np.uint8)
    sides = ["left", "right"]
    if random_order and rng.random() < 0.5:
        masks, kps, ids, sides = masks[::-1], kps[::-1], ids[::-1], sides[::-1]
    names = [IDENTITIES[i][0] for i in ids]
    caption = (f"two people side by side, a {names[0]} person on the {sides[0]} and a "
               f"{names[1]} person on the {sides[1]}")
    return canvas, masks, kps, ids, caption


def write_synthetic_characters(root: str, num_images: int = 64, height: int = 128,
                               width: int = 128, seed: int = 0, random_order: bool = False) -> str:
    """Write a synthetic two-character set in the folder layout above (PNG images and masks,
    face .npz with the identity's fixed embedding and the drawn landmarks; characters listed
    left, right, or with `random_order` in a random order per image). The folder is written
    under a temporary name and renamed, so it is complete or absent. -> root."""
    if os.path.isfile(os.path.join(root, METADATA)):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".characters-", dir=parent)
    rng = np.random.default_rng(seed)
    embeds = synthetic_face_embeddings(seed)
    for sub in ("images", "masks", "faces"):
        os.makedirs(os.path.join(tmp, sub))
    lines = []
    for i in range(num_images):
        image, masks, kps, ids, caption = render_two_characters(rng, height, width,
                                                                random_order)
        Image.fromarray(image).save(os.path.join(tmp, "images", f"{i:05d}.png"))
        chars = []
        for c, (mask, k, ident) in enumerate(zip(masks, kps, ids, strict=True)):
            Image.fromarray(mask).save(os.path.join(tmp, "masks", f"{i:05d}_{c}.png"))
            np.savez(os.path.join(tmp, "faces", f"{i:05d}_{c}.npz"), embedding=embeds[ident],
                     kps=k, identity=np.int32(ident))
            chars.append({"mask": f"masks/{i:05d}_{c}.png", "face": f"faces/{i:05d}_{c}.npz"})
        lines.append(json.dumps({"image": f"images/{i:05d}.png", "caption": caption,
                                 "characters": chars}))
    with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    try:
        os.replace(tmp, root)
    except OSError:
        if os.path.isfile(os.path.join(root, METADATA)):  # written concurrently
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            return root
        raise
    return root
