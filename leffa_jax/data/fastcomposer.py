"""Face-diffuser / FastComposer training data: the "ffhq_wild_files" layout reader, a synthetic
two-subject set in the same layout, and the per-sample preprocessing of the official
`FaceDiffuserDataset` (data.py:153-391), object augmentations included.

Layout (`root/`):
    image_ids_train.txt            one id per line (image_ids.txt is read when it is missing)
    <id[:5]>/<id>.jpg              the image
    <id[:5]>/<id>.npy              segmentation map (H, W) int ids
    <id[:5]>/<id>.json             {"caption": str, "segments": [{"id", "bbox": [x1, y1, x2, y2],
                                    "coco_label", "end": char offset of the noun phrase end}]}

Per sample (draws from a numpy Generator seeded by (seed, epoch, index), so a run resumes
exactly from `get_state()`):
    1. image resized so its shorter side is `resolution` (bilinear), segmap with nearest; both
       flipped with p 0.5; width centre-cropped, or (portrait) the sides zero-padded to a square
       and resized to `resolution`; image / 127.5 - 1;
    2. with p `uncondition_prob` the caption becomes "" and no subject is kept, else each
       `object_types` segment is kept with p `object_appear_prob` (at most `max_num_objects`,
       a random subset, then in caption order);
    3. each kept subject: pixels outside its segment replaced by uniform noise 0..254, cropped to
       its bbox in the original image, padded to square, resized to `object_resolution`, / 255;
       with `object_augmentation` (default True, the official run_train.sh) the crop gets the
       official training augmentations on its way (`leffa_jax.data.object_augment`: random
       zoom-in before the padding; rotation, colour jitter, blur, grayscale, flip, elastic after
       the resize), drawn from the sample's Generator after the background; False is the
       --no_object_augmentation path (the fixture's), with no further draws;
       its mask on the transformed segmentation map;
    4. `<|image|>` inserted after each kept segment's end; ids/mask as in `face_diffuser`.

Batches: image (B, R, R, 3) float32; input_ids (B, 77) int32; image_token_idx (B, K) int32;
image_token_valid (B, K) bool; objects (B, K, r, r, 3) float32; segmaps (B, K, R, R) float32.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from leffa_jax.training.config import ConfigError

NAMES = ("fastcomposer", "synthetic_subjects")
IMAGE_TOKEN = "<|image|>"


def default_config():
    import ml_collections

    c = ml_collections.ConfigDict()
    c.name = "synthetic_subjects"     # or "fastcomposer" (data.root = the ffhq_wild_files root)
    c.root = ""                       # synthetic: generated here ("" = a temp folder)
    c.resolution = 512
    c.object_resolution = 224
    c.max_num_objects = 4
    c.uncondition_prob = 0.1
    c.object_appear_prob = 0.9
    c.object_types = ("person",)
    c.object_augmentation = True      # official training augmentations of the subject crops
    #                                   (False = --no_object_augmentation)
    c.batch_size = 8
    c.num_synthetic = 64              # synthetic set size
    return c


def check_config(data) -> None:
    """ConfigError naming the key and the fix; cheap (nothing is read or written)."""
    if data.name not in NAMES:
        raise ConfigError(f"data.name {data.name!r}: use one of {NAMES}")
    for key in ("resolution", "object_resolution", "max_num_objects", "batch_size"):
        if int(data[key]) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {data[key]}")
    for key in ("uncondition_prob", "object_appear_prob"):
        if not 0.0 <= float(data[key]) <= 1.0:
            raise ConfigError(f"data.{key} must be in [0, 1], got {data[key]}")
    augment = data.get("object_augmentation", True)
    if not isinstance(augment, bool | np.bool_):
        raise ConfigError(f"data.object_augmentation must be True or False, got {augment!r}")
    if data.name == "fastcomposer":
        if not data.root or not os.path.isdir(data.root):
            raise ConfigError(f"data.root {data.root!r} is not a folder: set --config.data.root "
                              "to the FastComposer ffhq_wild_files folder (image_ids_train.txt, "
                              "<id[:5]>/<id>.jpg/.npy/.json)")
        if not any(os.path.isfile(os.path.join(data.root, f))
                   for f in ("image_ids_train.txt", "image_ids.txt")):
            raise ConfigError(f"data.root {data.root}: no image_ids_train.txt (or image_ids.txt)")


# ----------------------------------------------------------------------------- reading


def read_ids(root: str) -> list[str]:
    for name in ("image_ids_train.txt", "image_ids.txt"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path) as f:
                return [line.strip() for line in f if line.strip()]
    raise FileNotFoundError(f"{root}: no image_ids_train.txt / image_ids.txt")


def read_sample(root: str, image_id: str) -> tuple[np.ndarray, np.ndarray, dict]:
    folder = os.path.join(root, image_id[:5])
    try:
        image = np.asarray(Image.open(os.path.join(folder, f"{image_id}.jpg")).convert("RGB"))
        segmap = np.load(os.path.join(folder, f"{image_id}.npy")).astype(np.int64)
        with open(os.path.join(folder, f"{image_id}.json")) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{root}: sample {image_id} cannot be read ({e})") from None
    if segmap.shape != image.shape[:2]:
        raise ValueError(f"{root}: sample {image_id}: segmap {segmap.shape} does not match the "
                         f"image {image.shape[:2]}")
    return image, segmap, info


# ----------------------------------------------------------------------------- transforms


def _resize(image: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if image.shape[:2] == tuple(hw):
        return image
    if nearest:
        ys = np.minimum((np.arange(hw[0]) * image.shape[0] / hw[0]).astype(np.int64),
                        image.shape[0] - 1)
        xs = np.minimum((np.arange(hw[1]) * image.shape[1] / hw[1]).astype(np.int64),
                        image.shape[1] - 1)
        return image[ys][:, xs]
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def transform_image_and_segmap(image, segmap, resolution: int, flip: bool):
    """Shorter side -> resolution, flip, centre crop / pad-and-resize (TrainTransformWithSegmap
    + CenterCropOrPadSides). -> (image (R, R, 3) float32 in [-1, 1], segmap (R, R) int)."""
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    hw = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    image, segmap = _resize(image, hw), _resize(segmap, hw, nearest=True)
    if flip:
        image, segmap = image[:, ::-1], segmap[:, ::-1]
    h, w = image.shape[:2]
    if h > w:
        pad = (h - w) // 2
        image = np.pad(image, ((0, 0), (pad, h - w - pad), (0, 0)))
        segmap = np.pad(segmap, ((0, 0), (pad, h - w - pad)))
        image = _resize(np.ascontiguousarray(image), (w, w))
        segmap = _resize(segmap, (w, w), nearest=True)
    else:
        left = (w - h) // 2
        image, segmap = image[:, left:left + h], segmap[:, left:left + h]
    return (np.ascontiguousarray(image).astype(np.float32) / 127.5 - 1.0,
            np.ascontiguousarray(segmap))


def subject_crop(image, segmap, segment, background, resolution: int,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """The segment on a noise background, cropped to its bbox, padded square, resized, / 255
    -> (R, R, 3) float32. With `rng`, the official object augmentations are drawn from it and
    applied on the way (`object_augment.augment_object`); without, no draw is made."""
    from leffa_jax.imageio import pad_to_square

    keep = (segmap == segment["id"])[..., None]
    x = np.where(keep, image, background)
    x1, y1, x2, y2 = (int(v) for v in segment["bbox"])
    crop = x[max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)]
    if crop.size == 0:
        crop = np.zeros((1, 1, 3), np.uint8)
    crop = np.ascontiguousarray(crop.astype(np.uint8))
    if rng is not None:
        from leffa_jax.data.object_augment import augment_object

        return augment_object(crop, resolution, rng).astype(np.float32) / 255.0
    crop = pad_to_square(crop)
    return _resize(crop, (resolution, resolution)).astype(np.float32) / 255.0


def caption_with_tokens(caption: str, segments: list[dict]) -> str:
    for segment in sorted(segments, key=lambda s: s["end"], reverse=True):
        end = int(segment["end"])
        caption = caption[:end] + IMAGE_TOKEN + caption[end:]
    return caption


def prepare_sample(image, segmap, info, tokenizer, cfg, rng: np.random.Generator) -> dict:
    """One training example (numpy) from a raw sample; see the module docstring."""
    from leffa_jax.systems.face_diffuser import add_image_token, mask_image_tokens, token_index

    resolution, r, k = int(cfg.resolution), int(cfg.object_resolution), int(cfg.max_num_objects)
    flip = rng.random() < 0.5
    pixels, seg = transform_image_and_segmap(image, segmap, resolution, flip)
    types = tuple(cfg.object_types)
    segments = [s for s in info.get("segments", []) if not types or s.get("coco_label") in types]
    caption = info.get("caption", "")
    if rng.random() < float(cfg.uncondition_prob):
        caption, segments = "", []
    else:
        segments = [s for s in segments if rng.random() < float(cfg.object_appear_prob)]
    if len(segments) > k:
        segments = [segments[i] for i in sorted(rng.choice(len(segments), k, replace=False))]
    segments = sorted(segments, key=lambda s: s["end"])
    background = rng.integers(0, 255, image.shape, dtype=np.uint8)
    augment_rng = rng if cfg.get("object_augmentation", True) else None
    objects = np.zeros((k, r, r, 3), np.float32)
    masks = np.zeros((k, resolution, resolution), np.float32)
    for j, segment in enumerate(segments):
        objects[j] = subject_crop(image, segmap, segment, background, r, augment_rng)
        masks[j] = (seg == segment["id"]).astype(np.float32)
    image_tokenizer, token_id = add_image_token(tokenizer)
    raw = image_tokenizer.encode(caption_with_tokens(caption, segments))
    ids, mask = mask_image_tokens(raw, token_id, image_tokenizer.pad_token_id)
    idx, valid = token_index(mask, k)
    if len(idx) > k:  # a caption whose segments share a token end: keep the first k
        idx, valid = idx[:k], valid[:k]
    return {"image": pixels, "input_ids": ids.astype(np.int32),
            "image_token_idx": idx.astype(np.int32), "image_token_valid": valid,
            "objects": objects, "segmaps": masks}


# ----------------------------------------------------------------------------- dataset


class SubjectsIterator:
    """Batches forever (epochs reshuffled); `get_state()` / `set_state()` resume exactly."""

    def __init__(self, dataset: SubjectsDataset):
        self.ds = dataset
        self.position = 0  # examples consumed by this process

    def __iter__(self):
        return self

    def _example(self, n: int) -> dict:
        ds = self.ds
        local = len(ds.ids)
        epoch, offset = divmod(n, local)
        order = np.random.default_rng([ds.seed, epoch]).permutation(local)
        index = int(order[offset])
        image, segmap, info = read_sample(ds.root, ds.ids[index])
        rng = np.random.default_rng([ds.seed, epoch, index, ds.process_index])
        return prepare_sample(image, segmap, info, ds.tokenizer, ds.config, rng)

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.ds.local_batch
        examples = [self._example(self.position + i) for i in range(b)]
        self.position += b
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    def get_state(self) -> dict[str, Any]:
        return {"position": int(self.position)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class SubjectsDataset:
    def __init__(self, root: str, config, tokenizer, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        self.root, self.config, self.tokenizer, self.seed = root, config, tokenizer, int(seed)
        self.process_index = process_index
        ids = read_ids(root)
        self.ids = ids[process_index::process_count]
        if not self.ids:
            raise ValueError(f"{root}: no samples for process {process_index}")
        batch = int(config.batch_size)
        if batch % process_count:
            raise ConfigError(f"data.batch_size {batch} does not divide over {process_count} "
                              "processes")
        self.local_batch = batch // process_count

    def __iter__(self) -> SubjectsIterator:
        return SubjectsIterator(self)

    def __len__(self) -> int:
        return len(self.ids)


def synthetic_root(config) -> str:
    if config.root:
        return config.root
    return os.path.join(tempfile.gettempdir(), f"leffa_jax_synthetic_subjects_"
                        f"{int(config.num_synthetic)}_{int(config.resolution)}")


def make_dataset(config, tokenizer, split: str = "train", seed: int = 0) -> SubjectsDataset:
    import jax

    root = config.root
    if config.name == "synthetic_subjects":
        root = synthetic_root(config)
        if not os.path.isfile(os.path.join(root, "image_ids_train.txt")):
            make_synthetic_subjects(root, int(config.num_synthetic),
                                    max(64, int(config.resolution)), seed=0)
    return SubjectsDataset(root, config, tokenizer, seed, jax.process_index(),
                           jax.process_count())


# ----------------------------------------------------------------------------- synthetic

_NOUNS = (("a man", (70, 110, 200)), ("a woman", (200, 80, 120)), ("a boy", (80, 170, 90)),
          ("a girl", (220, 160, 60)))
_PLACES = ("in the park", "at the beach", "in a kitchen", "on a street", "in the snow")


def make_synthetic_subjects(root: str, count: int, size: int = 128, seed: int = 0) -> str:
    """Write `count` synthetic samples in the FastComposer layout: one or two drawn people
    (head + body, their colour names the noun) on a coloured scene, segmentation ids 1, 2, a
    caption 'a man and a woman in the park' with each noun phrase's end. Atomic: written to a
    temporary sibling folder, then renamed."""
    rng = np.random.default_rng(seed)
    parent = os.path.dirname(os.path.abspath(root)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic_subjects-", dir=parent)
    ids = []
    for n in range(count):
        image_id = f"{1000000 + n}"
        h, w = size, int(size * rng.uniform(1.0, 1.3))
        scene = rng.integers(0, 4)
        base = np.array([[120, 170, 90], [210, 190, 140], [180, 180, 190], [230, 230, 240]])[scene]
        img = Image.new("RGB", (w, h), tuple(int(v) for v in base))
        seg = Image.new("L", (w, h), 0)
        draw, draw_seg = ImageDraw.Draw(img), ImageDraw.Draw(seg)
        people = int(rng.integers(1, 3))
        picks = rng.choice(len(_NOUNS), people, replace=False)
        phrases, segments = [], []
        for j, pick in enumerate(picks):
            cx = w * (j + 1) / (people + 1) + rng.uniform(-0.05, 0.05) * w
            head = size * rng.uniform(0.08, 0.12)
            top = h * rng.uniform(0.15, 0.3)
            box = [cx - head, top, cx + head, top + 2 * head]
            body = [cx - 1.6 * head, top + 2 * head, cx + 1.6 * head, min(h - 1, top + 7 * head)]
            color = _NOUNS[pick][1]
            for d, fill in ((draw, (235, 200, 170)), (draw_seg, j + 1)):
                d.ellipse(box, fill=fill)
            for d, fill in ((draw, color), (draw_seg, j + 1)):
                d.rectangle(body, fill=fill)
            phrases.append(_NOUNS[pick][0])
            bbox = [int(body[0]), int(box[1]), int(body[2]) + 1, int(body[3]) + 1]
            segments.append({"id": j + 1, "bbox": bbox, "coco_label": "person"})
        caption, ends = "", []
        for j, phrase in enumerate(phrases):
            caption += ("" if j == 0 else " and ") + phrase
            ends.append(len(caption))
        caption += " " + _PLACES[int(rng.integers(len(_PLACES)))]
        for segment, end, phrase in zip(segments, ends, phrases, strict=True):
            segment["end"], segment["word"] = end, phrase
        folder = os.path.join(tmp, image_id[:5])
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{image_id}.jpg"), quality=95)
        np.save(os.path.join(folder, f"{image_id}.npy"), np.asarray(seg, np.int32))
        with open(os.path.join(folder, f"{image_id}.json"), "w") as f:
            json.dump({"caption": caption, "segments": segments}, f)
        ids.append(image_id)
    with open(os.path.join(tmp, "image_ids_train.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
    try:
        os.rename(tmp, root)
    except OSError:  # written meanwhile by another process: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root
