"""Inputs of `python -m leffa_jax.sample`: pairs files, a pair's files read into the target frame,
agnostic masks from parse maps and keypoints (with the label schema detected), output names.

Images come back as uint8 (H, W, 3) in the target frame (resized and centred like the official
demo); masks as float32 (H, W) in {0, 1}.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

import numpy as np

from leffa_jax import imageio
from leffa_jax.cli import UsageError


@dataclass
class Pair:
    person: str
    garment: str
    densepose: str
    mask: str | None = None
    parse: str | None = None
    keypoints: str | None = None
    where: str = "the command line"  # for messages: "pairs.txt:3"

    @property
    def name(self) -> str:
        stem = lambda p: os.path.splitext(os.path.basename(p))[0]
        return f"{stem(self.person)}__{stem(self.garment)}"


# ----------------------------------------------------------------------------- pairs files


def split_pair_line(line: str) -> list[str]:
    """Columns of one pairs-file line: separated by spaces, tabs or commas; quote a path that
    holds any of them (or quotes) as in a shell ("my photo.jpg", 'a "b".png'); `#` starts a
    comment."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace += ","
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def read_pairs(path: str) -> list[Pair]:
    """Pairs file -> Pairs with paths resolved against the file's folder."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                cols = split_pair_line(line)
            except ValueError as e:
                raise UsageError(f"{path}:{n}: {e} (quote paths as in a shell)") from None
            if not cols:
                continue
            if len(cols) not in (3, 4):
                raise UsageError(f"{path}:{n}: expected 'person garment densepose [mask]', got "
                                 f"{len(cols)} columns {cols} (quote paths holding spaces or "
                                 "commas)")
            cols = [c if os.path.isabs(c) else os.path.join(root, c) for c in cols]
            pairs.append(Pair(*cols[:3], cols[3] if len(cols) == 4 else None,
                              where=f"{path}:{n}"))
    if not pairs:
        raise UsageError(f"{path}: no pairs")
    return pairs


def output_names(pairs: list[Pair]) -> list[str]:
    """`<person>__<garment>` per pair, made unique: a repeated name gets `-2`, `-3`, ..."""
    names, taken = [], set()
    for pair in pairs:
        name, k = pair.name, 1
        while name in taken:
            k += 1
            name = f"{pair.name}-{k}"
        taken.add(name)
        names.append(name)
    return names


# ----------------------------------------------------------------------------- parse maps

# Labels whose meaning differs most between the ATR and LIP schemas, and where each schema puts
# them: fraction of the labelled body's height from its top.
SCHEMA_PROBES = {
    10: ("ATR right shoe / LIP torso skin", {"atr": 0.95, "lip": 0.3}),
    13: ("ATR right leg / LIP face", {"atr": 0.8, "lip": 0.1}),
    18: ("ATR neck / LIP left shoe", {"atr": 0.25, "lip": 0.95}),
}


def detect_parse_schema(labels: np.ndarray) -> tuple[str | None, str]:
    """("atr" | "lip" | None, why) for an (H, W) label map, from where the labels whose meaning
    differs between the schemas sit on the body (e.g. LIP's face, 13, is ATR's right leg)."""
    labels = np.asarray(labels)
    if labels.size and int(labels.max()) == 19:
        return "lip", "label 19 (LIP right shoe) does not exist in ATR (0..18)"
    rows = np.nonzero((labels > 0).any(axis=1))[0]
    if rows.size < 2:
        return None, "no labelled body"
    top, height = rows[0], max(rows[-1] - rows[0], 1)
    errors = {"atr": [], "lip": []}
    reasons = []
    for label, (meaning, expected) in SCHEMA_PROBES.items():
        ys = np.nonzero(labels == label)[0]
        if ys.size < max(20, labels.size * 1e-4):
            continue
        where = (ys.mean() - top) / height
        for schema in errors:
            errors[schema].append(abs(where - expected[schema]))
        reasons.append(f"label {label} ({meaning}) sits at {where:.0%} of the body's height")
    if not reasons:
        return None, "none of the labels that tell the schemas apart is present"
    atr, lip = (float(np.mean(errors[s])) for s in ("atr", "lip"))
    if abs(atr - lip) < 0.25:
        return None, "; ".join(reasons)
    return ("atr" if atr < lip else "lip"), "; ".join(reasons)


def read_parse(path: str, schema: str) -> np.ndarray:
    """A parse label map file -> (H, W) ATR labels. Palette PNGs keep their indices. schema:
    "auto" (detected; LIP, VITON-HD's image-parse-v3, when it cannot be told), "lip" or "atr";
    an explicit schema the content contradicts is an error naming the evidence."""
    from leffa_jax.data import masks

    labels = imageio.load_image(path, "P")
    if labels.size and int(labels.max()) > 19:
        raise ValueError(
            f"{path}: values up to {int(labels.max())} are not parsing labels (0..19); it looks "
            "like a colour or grey rendering. Give the label map itself (VITON-HD "
            "image-parse-v3 palette PNG, or the human parser's label output)")
    detected, why = detect_parse_schema(labels)
    if schema == "auto":
        schema = detected or "lip"
        if detected is None:
            print(f"leffa_jax.sample: note: cannot tell the label schema of {path} ({why}); "
                  "reading it as LIP (VITON-HD image-parse-v3). Pass --parse-schema atr for an "
                  "ATR map", file=sys.stderr)
    elif detected is not None and detected != schema:
        raise ValueError(f"{path} looks like a {detected.upper()} label map, not "
                         f"{schema.upper()}: {why}. Pass --parse-schema {detected} (or auto)")
    return masks.lip_to_atr(labels) if schema == "lip" else labels


def read_keypoints(path: str) -> np.ndarray:
    """OpenPose json (BODY_25 or COCO-18) -> (18, 2) (x, y) in the photo's pixels."""
    from leffa_jax.data.common import DataError, parse_openpose_json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"keypoints file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        keypoints = parse_openpose_json(data, path)
    except DataError as e:
        raise ValueError(str(e)) from None
    if not keypoints.any():
        raise ValueError(f"{path}: no person in the OpenPose keypoints")
    return keypoints.astype(np.float64)


def agnostic_mask_for(pair: Pair, person_hw: tuple[int, int], height: int, width: int,
                      garment_type: str, variant: str, schema: str,
                      stretch: bool = False) -> np.ndarray:
    """The official garment-agnostic mask of `pair` (its parse map and keypoints, in the person
    photo's frame `person_hw`) in the target frame, (height, width) float32 in {0, 1}."""
    import cv2

    from leffa_jax.data import masks

    parse = read_parse(pair.parse, schema)
    if not stretch:
        same_frame(person_hw, parse.shape, pair.person, pair.parse, "parse map")
    parse_t = imageio.resize_and_center(
        cv2.resize(parse, person_hw[::-1], interpolation=cv2.INTER_NEAREST),
        height, width, fill=0, interpolation="nearest")
    f = imageio.fit(*person_hw, height, width)
    kp = read_keypoints(pair.keypoints)
    missing = (kp[:, 0] <= 1) & (kp[:, 1] <= 1)
    kp = kp * f.scale + [f.left, f.top]
    kp *= [masks.MASK_SIZE[0] / width, masks.MASK_SIZE[1] / height]
    kp[missing] = 0
    m = masks.agnostic_mask(parse_t, kp, garment_type, variant)
    m = cv2.resize((m * 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return (m >= 128).astype(np.float32)


# ----------------------------------------------------------------------------- one pair


def same_frame(person_hw, other_hw, person: str, other: str, what: str) -> None:
    """UsageError when `other` has another aspect ratio than the person photo."""
    try:
        imageio.check_same_frame(person_hw, other_hw, person, other, what)
    except ValueError as e:
        raise UsageError(f"{e}, or pass --stretch-to-person to stretch it onto the photo") from None


def _label_image(path: str, mode: str, person, pair: Pair, what: str, stretch: bool):
    """A mask or densepose file, checked to show the person's frame (or stretched onto it)."""
    import cv2

    img = imageio.load_image(path, mode)
    if stretch:
        return cv2.resize(img, person.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    same_frame(person.shape[:2], img.shape[:2], pair.person, path, what)
    return img


def load_pair(pair: Pair, args) -> dict[str, np.ndarray]:
    """-> uint8 person/garment/densepose (H, W, 3) and float32 mask (H, W) in {0, 1}."""
    h, w = args.height, args.width
    stretch = getattr(args, "stretch_to_person", False)
    person_raw = imageio.load_image(pair.person)
    person = imageio.resize_and_center(person_raw, h, w)
    garment = imageio.resize_and_center(imageio.load_image(pair.garment), h, w)
    densepose = _label_image(pair.densepose, "RGB", person_raw, pair, "densepose", stretch)
    densepose = imageio.resize_and_center(densepose, h, w, fill=0, interpolation="nearest")
    if args.task == "pose":
        mask = np.ones((h, w), np.float32)
    elif pair.mask is not None:
        raw = _label_image(pair.mask, "L", person_raw, pair, "mask", stretch)
        mask = imageio.mask_to_binary(raw, pair.mask, args.binarize_mask)
        mask = imageio.resize_and_center((mask * 255).astype(np.uint8), h, w, fill=0,
                                         interpolation="nearest") / 255.0
    elif pair.parse is not None and pair.keypoints is not None:
        mask = agnostic_mask_for(pair, person_raw.shape[:2], h, w, args.garment_type,
                                 args.mask_variant, args.parse_schema, stretch)
    elif pair.where != "the command line":
        raise UsageError(f"{pair.where}: try-on needs a mask: add it as the 4th column "
                         "(person garment densepose mask); with a pairs file --mask and "
                         "--parse do not apply")
    else:
        raise UsageError(f"{pair.name}: try-on needs a mask: give --mask, or --parse with "
                         "--keypoints (and --garment-type)")
    return {"person": person, "garment": garment, "densepose": densepose,
            "mask": mask.astype(np.float32)}
