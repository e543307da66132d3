"""The synthetic generator: layouts on disk, exact flow (closed form), warp consistency."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from leffa_jax.data import masks, synthetic

H, W = 128, 96


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("syn")
    t0 = time.perf_counter()
    out = {}
    for layout, (h, w) in {"viton_hd": (H, W), "dresscode": (H, W), "deepfashion": (H, 88)}.items():
        out[layout] = synthetic.make_synthetic_dataset(
            base / layout, layout, num_train=4, num_test=3, height=h, width=w, seed=3
        )
    out["seconds"] = time.perf_counter() - t0
    return out


def test_fast(roots):
    assert roots["seconds"] < 5.0


def test_viton_hd_layout(roots):
    r = roots["viton_hd"]
    train = (r / "train_pairs.txt").read_text().split()
    assert train == ["00000_00.jpg", "00000_00.jpg", "00001_00.jpg", "00001_00.jpg"] + [
        f"0000{i}_00.jpg" for i in (2, 2, 3, 3)
    ]
    test = [ln.split() for ln in (r / "test_pairs.txt").read_text().splitlines()]
    assert test == [
        ["00004_00.jpg", "00005_00.jpg"],
        ["00005_00.jpg", "00006_00.jpg"],
        ["00006_00.jpg", "00004_00.jpg"],
    ]
    d = r / "train"
    for rel in (
        "image/00000_00.jpg",
        "cloth/00000_00.jpg",
        "cloth-mask/00000_00.jpg",
        "image-parse-v3/00000_00.png",
        "openpose_json/00000_00_keypoints.json",
        "image-densepose/00000_00.jpg",
        "agnostic-mask/00000_00_mask.png",
        "flow_gt/00000_00.npy",
        "flow_gt/00000_00.json",
    ):
        assert (d / rel).exists(), rel
    assert Image.open(d / "image/00000_00.jpg").size == (W, H)
    parse = Image.open(d / "image-parse-v3/00000_00.png")
    assert parse.mode == "P"
    # LIP labels: upper clothes are 5 in LIP (4 in ATR)
    assert 5 in np.unique(np.asarray(parse))
    kp = json.loads((d / "openpose_json/00000_00_keypoints.json").read_text())
    assert len(kp["people"][0]["pose_keypoints_2d"]) == 75  # BODY_25 as in VITON-HD


def test_dresscode_and_deepfashion_layouts(roots):
    r = roots["dresscode"]
    for cat in masks.CATEGORIES:
        d = r / cat
        pairs = (d / "test_pairs_unpaired.txt").read_text().split()
        assert pairs[0].endswith("_0.jpg") and pairs[1].endswith("_1.jpg")
        pid = pairs[0][:-6]
        for rel in (
            f"images/{pid}_0.jpg",
            f"images/{pid}_1.jpg",
            f"label_maps/{pid}_4.png",
            f"keypoints/{pid}_2.json",
            f"dense/{pid}_5.png",
        ):
            assert (d / rel).exists(), rel
        kp = json.loads((d / f"keypoints/{pid}_2.json").read_text())["keypoints"]
        assert np.asarray(kp).shape == (18, 4)
    r = roots["deepfashion"]
    rows = (r / "fasion-resize-pairs-test.csv").read_text().splitlines()
    assert rows[0] == "from,to" and len(rows) == 4
    src, tgt = rows[1].split(",")
    assert (r / "test_highres" / src).exists() and (r / "test_highres" / tgt).exists()
    assert (r / "densepose" / (tgt[:-4] + ".png")).exists()


def _closed_form_flow(params, h, w):
    """The documented formula, written out independently of synthetic.Warp."""
    A, b = np.array(params["A"]), np.array(params["b"])
    amp, per, ph = np.array(params["amp"]), np.array(params["period"]), np.array(params["phase"])
    X = (np.arange(w)[None, :] + 0.5) * 384 / w + 0 * np.arange(h)[:, None]
    Y = (np.arange(h)[:, None] + 0.5) * 512 / h + 0 * np.arange(w)[None, :]
    U = A[0, 0] * X + A[0, 1] * Y + b[0] + amp[0] * np.sin(2 * np.pi * Y / per[1] + ph[0])
    V = A[1, 0] * X + A[1, 1] * Y + b[1] + amp[1] * np.sin(2 * np.pi * X / per[0] + ph[1])
    return np.stack([2 * U / 384 - 1, 2 * V / 512 - 1], -1)


def _grid_sample(img, flow):
    """Bilinear, zeros padding, align_corners=False (torch grid_sample convention), numpy."""
    h, w = img.shape[:2]
    px = ((flow[..., 0] + 1) * w - 1) / 2
    py = ((flow[..., 1] + 1) * h - 1) / 2
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    out = np.zeros(flow.shape[:2] + img.shape[2:])
    for dx in (0, 1):
        for dy in (0, 1):
            xx, yy = x0 + dx, y0 + dy
            wgt = (1 - np.abs(px - xx)) * (1 - np.abs(py - yy))
            ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            val = img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
            out += (wgt * ok)[..., None] * val
    return out


@pytest.mark.parametrize(
    "layout,sub",
    [("viton_hd", "train/flow_gt"), ("dresscode", "dresses/flow_gt"), ("deepfashion", "flow_gt")],
)
def test_flow_is_the_closed_form_warp(roots, layout, sub):
    folder = roots[layout] / sub
    npys = sorted(folder.glob("*.npy"))
    assert npys
    for f in npys:
        flow = np.load(f)
        h, w = flow.shape[:2]
        params = json.loads(f.with_suffix(".json").read_text())
        expect = _closed_form_flow(params, h, w)
        valid = flow[..., 2] > 0
        assert 0.03 < valid.mean() < 0.6
        np.testing.assert_allclose(flow[valid][:, :2], expect[valid], atol=2e-6)
        assert np.all(flow[~valid][:, :2] == 0)


def test_warping_the_garment_reproduces_the_person(roots):
    d = roots["viton_hd"] / "train"
    for stem in ("00000_00", "00001_00"):
        flow = np.load(d / "flow_gt" / f"{stem}.npy")
        person = np.asarray(Image.open(d / "image" / f"{stem}.jpg"), np.float64)
        cloth = np.asarray(Image.open(d / "cloth" / f"{stem}.jpg"), np.float64)
        warped = _grid_sample(cloth, flow[..., :2])
        valid = flow[..., 2] > 0
        # interior of the garment region (away from its edge, where JPEG and the garment border
        # mix colours)
        from scipy.ndimage import binary_erosion

        interior = binary_erosion(valid, iterations=2)
        err = np.abs(warped - person)[interior].mean()
        assert err < 6.0, err  # of 255; a wrong warp gives tens
        shifted = _grid_sample(cloth, flow[..., :2] + np.array([0.15, 0.0]))
        assert np.abs(shifted - person)[interior].mean() > 3 * err


def test_pose_target_is_warp_of_source(roots):
    r = roots["deepfashion"]
    src, tgt = (r / "fasion-resize-pairs-train.csv").read_text().splitlines()[1].split(",")
    flow = np.load(r / "flow_gt" / f"{src[:-4]}__{tgt[:-4]}.npy")
    s = np.asarray(Image.open(r / "train_highres" / src), np.float64)
    t = np.asarray(Image.open(r / "train_highres" / tgt), np.float64)
    from scipy.ndimage import binary_erosion

    interior = binary_erosion(flow[..., 2] > 0, iterations=2)
    err = np.abs(_grid_sample(s, flow[..., :2]) - t)[interior].mean()
    assert err < 6.0, err


def test_keypoints_lie_on_the_body(roots):
    d = roots["dresscode"] / "upper_body"
    for f in sorted((d / "keypoints").glob("*.json"))[:3]:
        pid = f.name[:-7]
        kp = np.asarray(json.loads(f.read_text())["keypoints"])[:, :2]  # 384x512 frame
        parse = np.asarray(Image.open(d / "label_maps" / f"{pid}_4.png"))
        h, w = parse.shape
        for k in (0, 1, 2, 3, 5, 6, 8, 9, 11, 12):  # nose, neck, shoulders, elbows, hips, knees
            x, y = kp[k]
            assert parse[int(y * h / 512), int(x * w / 384)] != 0, (pid, k)


def test_deterministic_in_seed(tmp_path):
    a = synthetic.make_synthetic_dataset(
        tmp_path / "a", "dresscode", num_train=1, num_test=1, seed=5
    )
    b = synthetic.make_synthetic_dataset(
        tmp_path / "b", "dresscode", num_train=1, num_test=1, seed=5
    )
    f = "lower_body/images/100000_0.jpg"
    assert (a / f).read_bytes() == (b / f).read_bytes()


def test_cli(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [
            sys.executable,
            "tools/make_synthetic_dataset.py",
            "--layout",
            "deepfashion",
            "--out",
            str(out),
            "--num_train",
            "2",
            "--num_test",
            "1",
            "--height",
            "64",
            "--width",
            "44",
        ],
        check=True,
        capture_output=True,
        cwd=str(__import__("pathlib").Path(__file__).parents[1]),
    )
    assert (out / "fasion-resize-pairs-train.csv").exists()
    assert Image.open(next((out / "train_highres").glob("*.jpg"))).size == (44, 64)
