"""Folder readers on the three synthetic layouts: pairs, modes, the example contract, masks and
densepose conventions."""

import json

import numpy as np
import pytest
from PIL import Image

from leffa_jax.data import common, masks, pipeline, synthetic, transforms
from leffa_jax.data import config as config_lib
from leffa_jax.data.deepfashion import DeepFashionSource
from leffa_jax.data.dresscode import DressCodeSource
from leffa_jax.data.viton_hd import VitonHDSource

H, W = 128, 96


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("readers")
    return {
        "viton_hd": synthetic.make_synthetic_dataset(
            base / "v", "viton_hd", num_train=4, num_test=3, seed=1
        ),
        "dresscode": synthetic.make_synthetic_dataset(
            base / "d", "dresscode", num_train=3, num_test=2, seed=2
        ),
        "deepfashion": synthetic.make_synthetic_dataset(
            base / "f", "deepfashion", num_train=3, num_test=2, height=128, width=88, seed=3
        ),
    }


def _cfg(name, root, **kw):
    c = config_lib.default_data_config()
    c.name, c.root, c.height, c.width = name, str(root), H, W
    c.flip_prob, c.shuffle, c.batch_size = 0.0, False, 2
    for k, v in kw.items():
        c[k] = v
    return c


def _settings(**kw):
    base = dict(height=H, width=W, with_flow=True)
    base.update(kw)
    return transforms.PrepareSettings(**base)


def test_viton_hd_paired_unpaired(roots):
    r = roots["viton_hd"]
    paired = VitonHDSource(r, "test", "paired")
    unpaired = VitonHDSource(r, "test", "unpaired")
    assert len(paired) == len(unpaired) == 3
    assert paired.files(0)["garment"].endswith("test/cloth/00004_00.jpg")
    assert unpaired.files(0)["garment"].endswith("test/cloth/00005_00.jpg")
    assert paired.has_flow and not unpaired.has_flow
    rec = unpaired[0]
    assert rec["garment"] == (r / "test" / "cloth" / "00005_00.jpg").read_bytes()
    assert rec["flow_gt"] == b""
    # BODY_25 keypoints are read back as OpenPose-18 in image pixels
    raw = json.loads((r / "test/openpose_json/00004_00_keypoints.json").read_text())
    body = np.asarray(raw["people"][0]["pose_keypoints_2d"]).reshape(25, 3)
    np.testing.assert_allclose(rec["keypoints"][8], body[9, :2], atol=1e-4)  # right hip
    np.testing.assert_allclose(rec["keypoints"][:8], body[:8, :2], atol=1e-4)


def test_dresscode_categories(roots):
    r = roots["dresscode"]
    all_ = DressCodeSource(r, "train", category="all")
    assert len(all_) == 9
    assert [all_.pairs[i][0] for i in (0, 3, 6)] == ["upper_body", "lower_body", "dresses"]
    un = DressCodeSource(r, "test", "unpaired", category="dresses")
    c, p, g = un.pairs[0]
    assert p.split("_")[0] != g.split("_")[0]
    rec = un[0]
    assert rec["garment"] == (r / "dresses" / "images" / g).read_bytes()
    assert rec["category"] == "dresses"
    np.testing.assert_array_equal(rec["keypoints_frame"], [384, 512])


def test_deepfashion_pairs(roots):
    r = roots["deepfashion"]
    s = DeepFashionSource(r, "test")
    src, tgt = s.pairs[0]
    rec = s[0]
    assert rec["person"] == (r / "test_highres" / tgt).read_bytes()
    assert rec["garment"] == (r / "test_highres" / src).read_bytes()


@pytest.mark.parametrize("name", ["viton_hd", "dresscode", "deepfashion"])
def test_contract(roots, name):
    c = _cfg(
        name,
        roots[name],
        category="all" if name == "dresscode" else "upper_body",
        width=88 if name == "deepfashion" else W,
    )
    b = next(iter(pipeline.make_dataset(c, "train", process_index=0, process_count=1)))
    h, w = H, c.width
    assert set(b) == {
        "person",
        "garment",
        "mask",
        "densepose",
        "garment_mask",
        "flow_gt",
        "flow_gt_valid",
        "index",
    }
    for k, ch in (
        ("person", 3),
        ("garment", 3),
        ("mask", 1),
        ("densepose", 3),
        ("garment_mask", 1),
        ("flow_gt", 2),
        ("flow_gt_valid", 1),
    ):
        assert b[k].shape == (2, h, w, ch), k
        assert b[k].dtype == np.float32, k
    for k in ("person", "garment", "densepose"):
        assert b[k].min() >= -1 and b[k].max() <= 1
    for k in ("mask", "garment_mask", "flow_gt_valid"):
        assert set(np.unique(b[k])) <= {0.0, 1.0}
    assert b["index"].dtype == np.int32 and b["index"].tolist() == [0, 1]
    # the garment region lies inside the region to generate
    assert (b["garment_mask"] * (1 - b["mask"])).sum() <= 0.01 * b["garment_mask"].sum()
    if name == "deepfashion":
        assert np.all(b["mask"] == 1)


def test_person_pixels_are_the_file_pixels(roots):
    r = roots["viton_hd"]
    ex = transforms.prepare_example(VitonHDSource(r, "train")[2], _settings())
    img = np.asarray(Image.open(r / "train/image/00002_00.jpg").convert("RGB"), np.float32)
    np.testing.assert_allclose(ex["person"], img / 127.5 - 1, atol=1e-6)
    flow = np.load(r / "train/flow_gt/00002_00.npy")
    np.testing.assert_array_equal(ex["flow_gt"], flow[..., :2])
    np.testing.assert_array_equal(ex["flow_gt_valid"][..., 0], flow[..., 2])


def test_mask_sources(roots):
    r = roots["viton_hd"]
    rec = VitonHDSource(r, "train")[1]
    shipped = np.asarray(Image.open(r / "train/agnostic-mask/00001_00_mask.png")) > 127
    ex = transforms.prepare_example(rec, _settings(mask_source="dataset"))
    np.testing.assert_array_equal(ex["mask"][..., 0], shipped)
    auto = transforms.prepare_example(rec, _settings(mask_source="auto"))
    np.testing.assert_array_equal(auto["mask"], ex["mask"])
    # compute: the official function on the LIP->ATR parse at 384x512, keypoints scaled to 384x512
    comp = transforms.prepare_example(rec, _settings(mask_source="compute"))
    lip = np.asarray(Image.open(r / "train/image-parse-v3/00001_00.png"))
    atr = masks.lip_to_atr(lip)
    kp = rec["keypoints"] * np.array([384 / W, 512 / H])
    m = masks.agnostic_mask_hd(atr, kp, "upper_body")
    m = np.asarray(Image.fromarray(m).resize((W, H), Image.NEAREST))
    np.testing.assert_array_equal(comp["mask"][..., 0], m)
    # garment region = upper clothes (LIP 5) or dress (LIP 6) of the parse map
    np.testing.assert_array_equal(comp["garment_mask"][..., 0], np.isin(lip, (5, 6)))


def test_resize_per_modality(roots):
    r = roots["dresscode"]
    rec = DressCodeSource(r, "train", category="lower_body")[0]
    ex = transforms.prepare_example(rec, _settings(height=256, width=192))
    # nearest for masks / parse / densepose: the 2x upsampling repeats every source pixel
    label = np.asarray(Image.open(r / "lower_body/label_maps/100000_4.png"))
    gm = np.isin(label, (masks.SKIRT, masks.PANTS)).repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(ex["garment_mask"][..., 0], gm)
    dense = np.asarray(Image.open(r / "lower_body/dense/100000_5.png")).repeat(2, 0).repeat(2, 1)
    np.testing.assert_allclose(ex["densepose"][..., 1], dense / 127.5 - 1, atol=1e-6)
    # bicubic for images: a smooth image, not a pixel repeat
    person = ex["person"]
    assert np.any(person[0::2] != person[1::2])
    # flow values are resolution free; 2x bilinear keeps the interior values close
    flow = np.load(r / "lower_body/flow_gt/100000_0.npy")
    assert ex["flow_gt"].shape == (256, 192, 2)
    v = flow[..., 2] > 0
    assert abs(ex["flow_gt"][ex["flow_gt_valid"][..., 0] > 0].mean() - flow[v][:, :2].mean()) < 0.02


def test_dresscode_densepose_is_repeated_part_index(roots):
    r = roots["dresscode"]
    ex = transforms.prepare_example(DressCodeSource(r, "train")[0], _settings())
    dense = np.asarray(Image.open(r / "upper_body/dense/000000_5.png"), np.float32)
    for c in range(3):
        np.testing.assert_allclose(ex["densepose"][..., c], dense / 127.5 - 1, atol=1e-6)


def test_iuv_normalisation_hand_values():
    iuv = np.array([[[255, 0, 24], [0, 255, 0], [51, 102, 12]]], np.uint8)
    out = transforms.normalize_iuv(iuv)
    np.testing.assert_allclose(out[0, 0], [1, -1, 1])
    np.testing.assert_allclose(out[0, 1], [-1, 1, -1])
    np.testing.assert_allclose(out[0, 2], [-0.6, -0.2, 0.0], atol=1e-6)


def test_pose_densepose_and_foreground(roots):
    r = roots["deepfashion"]
    s = DeepFashionSource(r, "train")
    ex = transforms.prepare_example(s[0], _settings(width=88, pose_garment_mask="foreground"))
    iuv = np.asarray(Image.open(r / "densepose" / (s.pairs[0][1][:-4] + ".png")))
    np.testing.assert_allclose(ex["densepose"], transforms.normalize_iuv(iuv), atol=1e-6)
    np.testing.assert_array_equal(ex["garment_mask"][..., 0], iuv[..., 2] > 0)


def test_hflip_hand_example():
    ex = {
        "person": np.arange(6, dtype=np.float32).reshape(1, 2, 3),
        "flow_gt": np.array([[[0.5, 0.25], [-0.75, 0.1]]], np.float32),
        "index": np.int32(4),
    }
    f = transforms.hflip(ex)
    assert f["person"].tolist() == [[[3, 4, 5], [0, 1, 2]]]
    np.testing.assert_allclose(f["flow_gt"], [[[0.75, 0.1], [-0.5, 0.25]]])
    assert f["index"] == 4


def test_openpose_json_variants():
    coco = {"people": [{"pose_keypoints_2d": [float(i) for i in range(54)]}]}
    kp = common.parse_openpose_json(json.dumps(coco).encode(), "x.json")
    assert kp[1].tolist() == [3.0, 4.0]
    assert common.parse_openpose_json(b'{"people": []}', "x.json").sum() == 0
    with pytest.raises(common.DataError, match="bad.json"):
        common.parse_openpose_json(b"{not json", "bad.json")
