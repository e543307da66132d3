"""Synthetic VITON-HD / DressCode / DeepFashion layouts with exact ground-truth correspondence.

Each person is a drawn figure (head, hair, neck, torso, arms, legs, shoes, clothes) in an
18-point OpenPose skeleton. For try-on the garment worn is a known smooth warp of the flat garment
image; for pose transfer the target is a known smooth warp of the source person. The warp maps a
target point to the reference image in a 384x512 "design" frame (continuous coordinates, pixel
edges at integers):

    X = (j + 0.5) * 384 / W,  Y = (i + 0.5) * 512 / H            target pixel (i, j) centre
    U = A00 X + A01 Y + b0 + amp_x sin(2 pi Y / period_y + phase_x)
    V = A10 X + A11 Y + b1 + amp_y sin(2 pi X / period_x + phase_y)
    flow_gt = (2 U / 384 - 1, 2 V / 512 - 1)                       grid_sample's normalised
                                                                    (x, y), align_corners=False
The parameters are saved as JSON beside ``flow_gt/<stem>.npy`` (H, W, 3) float32 = (x, y, valid),
valid = 1 where the target pixel shows the garment (try-on) or the person (pose transfer).
Every upper-body garment has the same flat shape, so a person's warp fits any of them: the
VITON-HD layout also writes ``test/image-unpaired/<person>.jpg``, the exact result of the
unpaired test pair (the person wearing the garment `test_pairs.txt` lists), and the person's
``flow_gt`` is that pair's true correspondence too.

Drawing lives in `synthetic_figures.py`; this module writes the dataset layouts. Generation is
vectorised numpy + PIL drawing: tens of pairs at 128x96 take well under a second.
"""

from __future__ import annotations

import csv
import json

import numpy as np
from etils import epath
from PIL import Image

from leffa_jax.data import masks
from leffa_jax.data.synthetic_figures import (
    DH,
    DW,
    LAYOUTS,
    Warp,
    densepose_rgb,
    render_pose_pair,
    render_tryon,
    wear,
)

__all__ = ["LAYOUTS", "Warp", "make_synthetic_dataset"]

# ----------------------------------------------------------------------------- writers
def _save_jpg(path, arr):
    Image.fromarray(arr).save(str(path), quality=95, subsampling=0)


def _save_palette_png(path, labels):
    """Palette PNG whose indices are the labels (as VITON-HD's image-parse-v3)."""
    labels = np.ascontiguousarray(labels, np.uint8)
    im = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    pal = (np.arange(256)[:, None] * np.array([[37, 101, 173]]) % 256).astype(np.uint8)
    im.putpalette(pal.flatten().tolist())
    im.save(str(path))


def _save_flow(folder: epath.Path, stem: str, flow: np.ndarray, warp: Warp):
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{stem}.npy").open("wb") as f:
        np.save(f, flow.astype(np.float32))
    (folder / f"{stem}.json").write_text(json.dumps(warp.to_json()))


def _openpose25(kp_pixels: np.ndarray) -> dict:
    body = np.zeros((25, 3), np.float32)
    coco_to_25 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
    for c, b in enumerate(coco_to_25):
        body[b, :2] = kp_pixels[c]
        body[b, 2] = 0.9
    body[8, :2] = (kp_pixels[8] + kp_pixels[11]) / 2
    body[8, 2] = 0.9
    return {
        "version": 1.3,
        "people": [{"person_id": [-1], "pose_keypoints_2d": body.flatten().round(3).tolist()}],
    }


def _split_counts(num_train, num_test):
    return [("train", i) for i in range(num_train)] + [
        ("test", num_train + i) for i in range(num_test)
    ]


def write_viton_hd(root, rng, num_train, num_test, h, w, agnostic_mask=True):
    """VITON-HD layout (see `leffa_jax/data/viton_hd.py`), plus `flow_gt/` and, for the test
    split, `test/image-unpaired/<person>.jpg`: the exact ground truth of the unpaired try-on of
    `test_pairs.txt` (that person wearing the listed garment, `synthetic_figures.wear`)."""
    root = epath.Path(root)
    names = {"train": [], "test": []}
    tests = []
    for split, i in _split_counts(num_train, num_test):
        ex, warp = render_tryon(rng, h, w, "upper_body")
        if split == "test":
            tests.append({k: ex[k] for k in ("texture", "undressed", "garment_uv",
                                             "garment_region")})
        stem = f"{i:05d}_00"
        d = root / split
        for sub in (
            "image",
            "cloth",
            "cloth-mask",
            "image-parse-v3",
            "openpose_json",
            "image-densepose",
        ):
            (d / sub).mkdir(parents=True, exist_ok=True)
        _save_jpg(d / "image" / f"{stem}.jpg", ex["person"])
        _save_jpg(d / "cloth" / f"{stem}.jpg", ex["garment"])
        _save_jpg(d / "cloth-mask" / f"{stem}.jpg", ex["garment_mask_flat"] * 255)
        _save_palette_png(d / "image-parse-v3" / f"{stem}.png", masks.atr_to_lip(ex["parse"]))
        kp_px = ex["keypoints"] * np.array([w / DW, h / DH], np.float32)
        (d / "openpose_json" / f"{stem}_keypoints.json").write_text(json.dumps(_openpose25(kp_px)))
        _save_jpg(d / "image-densepose" / f"{stem}.jpg", densepose_rgb(ex["parts"]))
        if agnostic_mask:
            (d / "agnostic-mask").mkdir(exist_ok=True)
            p384 = np.asarray(Image.fromarray(ex["parse"]).resize((384, 512), Image.NEAREST))
            m = masks.agnostic_mask_hd(p384, ex["keypoints"], "upper_body")
            m = np.asarray(Image.fromarray(m * 255).resize((w, h), Image.NEAREST))
            Image.fromarray(m).save(str(d / "agnostic-mask" / f"{stem}_mask.png"))
        _save_flow(d / "flow_gt", stem, ex["flow"], warp)
        names[split].append(f"{stem}.jpg")
    (root / "train_pairs.txt").write_text("".join(f"{n} {n}\n" for n in names["train"]))
    t = names["test"]
    (root / "test_pairs.txt").write_text(
        "".join(f"{n} {t[(k + 1) % len(t)]}\n" for k, n in enumerate(t))
    )
    (root / "test" / "image-unpaired").mkdir(parents=True, exist_ok=True)
    for k, (n, ex) in enumerate(zip(t, tests, strict=True)):
        other = tests[(k + 1) % len(tests)]["texture"]
        _save_jpg(root / "test" / "image-unpaired" / n, wear(ex, other))


def write_dresscode(
    root, rng, num_train, num_test, h, w, categories=("upper_body", "lower_body", "dresses")
):
    root = epath.Path(root)
    for ci, cat in enumerate(categories):
        d = root / cat
        for sub in ("images", "label_maps", "keypoints", "dense"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        names = {"train": [], "test": []}
        for split, i in _split_counts(num_train, num_test):
            ex, warp = render_tryon(rng, h, w, cat)
            pid = f"{ci * 100000 + i:06d}"
            _save_jpg(d / "images" / f"{pid}_0.jpg", ex["person"])
            _save_jpg(d / "images" / f"{pid}_1.jpg", ex["garment"])
            Image.fromarray(ex["parse"]).save(str(d / "label_maps" / f"{pid}_4.png"))
            kps = [[float(x), float(y), 0.9, k] for k, (x, y) in enumerate(ex["keypoints"])]
            (d / "keypoints" / f"{pid}_2.json").write_text(json.dumps({"keypoints": kps}))
            Image.fromarray(ex["parts"]).save(str(d / "dense" / f"{pid}_5.png"))
            _save_flow(d / "flow_gt", f"{pid}_0", ex["flow"], warp)
            names[split].append(pid)
        (d / "train_pairs.txt").write_text(
            "".join(f"{p}_0.jpg {p}_1.jpg\n" for p in names["train"])
        )
        t = names["test"]
        (d / "test_pairs_paired.txt").write_text("".join(f"{p}_0.jpg {p}_1.jpg\n" for p in t))
        (d / "test_pairs_unpaired.txt").write_text(
            "".join(f"{p}_0.jpg {t[(k + 1) % len(t)]}_1.jpg\n" for k, p in enumerate(t))
        )


def write_deepfashion(root, rng, num_train, num_test, h, w):
    root = epath.Path(root)
    (root / "densepose").mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "test": []}
    ann = {"train": [], "test": []}
    for split, i in _split_counts(num_train, num_test):
        ex, warp = render_pose_pair(rng, h, w)
        d = root / f"{split}_highres"
        d.mkdir(parents=True, exist_ok=True)
        src = f"fashionWOMENTees_Tanksid{i:08d}_1front.jpg"
        tgt = f"fashionWOMENTees_Tanksid{i:08d}_2side.jpg"
        _save_jpg(d / src, ex["source"])
        _save_jpg(d / tgt, ex["target"])
        for name, iuv in ((src, ex["source_iuv"]), (tgt, ex["target_iuv"])):
            Image.fromarray(iuv).save(str(root / "densepose" / f"{name[:-4]}.png"))
        _save_flow(root / "flow_gt", f"{src[:-4]}__{tgt[:-4]}", ex["flow"], warp)
        rows[split].append((src, tgt))
        for name, k in ((src, ex["source_keypoints"]), (tgt, ex["target_keypoints"])):
            ky = np.round(k[:, 1] * 256 / DH).astype(int).tolist()
            kx = np.round(k[:, 0] * 176 / DW).astype(int).tolist()
            ann[split].append((name, json.dumps(ky), json.dumps(kx)))
    for split in ("train", "test"):
        with (root / f"fasion-resize-pairs-{split}.csv").open("w") as f:
            wr = csv.writer(f)
            wr.writerow(["from", "to"])
            wr.writerows(rows[split])
        with (root / f"fasion-resize-annotation-{split}.csv").open("w") as f:
            f.write("name:keypoints_y:keypoints_x\n")
            f.writelines(f"{n}:{y}:{x}\n" for n, y, x in ann[split])
        names = sorted({n for r in rows[split] for n in r})
        (root / f"{split}.lst").write_text("".join(f"{n}\n" for n in names))


def make_synthetic_dataset(
    root,
    layout: str = "viton_hd",
    *,
    num_train: int = 8,
    num_test: int = 4,
    height: int = 128,
    width: int = 96,
    seed: int = 0,
    agnostic_mask: bool = True,
) -> epath.Path:
    """Write a synthetic dataset in the given layout under ``root`` (deterministic in ``seed``).

    layout: "viton_hd" | "dresscode" | "deepfashion". Pose-transfer sets are usually 4:3 less
    wide (e.g. 256x176); try-on sets 4:3 (e.g. 128x96, 1024x768).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if num_train < 1 or num_test < 1:
        raise ValueError("num_train and num_test must be >= 1")
    root = epath.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if layout == "viton_hd":
        write_viton_hd(root, rng, num_train, num_test, height, width, agnostic_mask)
    elif layout == "dresscode":
        write_dresscode(root, rng, num_train, num_test, height, width)
    else:
        write_deepfashion(root, rng, num_train, num_test, height, width)
    (root / ".complete").write_text(
        json.dumps({"layout": layout, "seed": seed, "height": height, "width": width})
    )
    return root
