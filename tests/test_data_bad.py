"""Bad data: missing files, corrupt images, size mismatches and empty pair lists raise errors
naming the file; on_bad_sample='skip' drops and counts them instead."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from leffa_jax.data import common, pipeline, synthetic
from leffa_jax.data import config as config_lib

H, W = 64, 48
N = 8


@pytest.fixture()
def root(tmp_path_factory):
    # one pristine copy per module, copied per test (tests break files)
    base = tmp_path_factory.getbasetemp() / "bad_pristine"
    if not base.exists():
        synthetic.make_synthetic_dataset(
            base, "viton_hd", num_train=N, num_test=2, height=H, width=W, seed=4
        )
    dst = tmp_path_factory.mktemp("bad") / "v"
    shutil.copytree(base, dst)
    return dst


def _cfg(root, **kw):
    c = config_lib.default_data_config()
    c.name, c.root, c.height, c.width = "viton_hd", str(root), H, W
    c.batch_size, c.shuffle, c.num_epochs, c.drop_remainder, c.flip_prob = 2, False, 1, False, 0.0
    c.read_threads = 1
    for k, v in kw.items():
        c[k] = v
    return c


def _run(cfg, split="train"):
    return list(pipeline.make_dataset(cfg, split, process_index=0, process_count=1))


def _raises_naming(path, cfg):
    with pytest.raises(Exception, match=re.escape(str(path))) as info:
        _run(cfg)
    return info.value


def test_missing_file(root):
    p = root / "train" / "image-densepose" / "00003_00.jpg"
    p.unlink()
    err = _raises_naming(p, _cfg(root))
    assert "missing" in str(err) and "on_bad_sample" in str(err)


def test_corrupt_image(root):
    p = root / "train" / "cloth" / "00005_00.jpg"
    p.write_bytes(p.read_bytes()[:200])  # truncated JPEG
    err = _raises_naming(p, _cfg(root))
    assert "corrupt" in str(err)


def test_corrupt_json(root):
    p = root / "train" / "openpose_json" / "00001_00_keypoints.json"
    p.write_text("{oops")
    _raises_naming(p, _cfg(root, mask_source="compute"))


def test_size_mismatch(root):
    p = root / "train" / "image-parse-v3" / "00002_00.png"
    lab = np.asarray(Image.open(p))
    Image.fromarray(np.ascontiguousarray(lab.T)).save(p)  # transposed: 64x48 instead of 48x64
    err = _raises_naming(p, _cfg(root))
    assert "size mismatch" in str(err)
    assert str(root / "train" / "image" / "00002_00.jpg") in str(err)


def test_flow_size_mismatch(root):
    p = root / "train" / "flow_gt" / "00004_00.npy"
    np.save(p, np.zeros((H // 2, W // 2, 3), np.float32))
    assert "size mismatch" in str(_raises_naming(p, _cfg(root)))


def test_empty_pair_list(root):
    p = root / "train_pairs.txt"
    p.write_text("\n")
    with pytest.raises(
        common.DataError, match=re.escape(str(p)) + ".*empty|empty.*" + re.escape(str(p))
    ):
        pipeline.make_dataset(_cfg(root), "train", process_index=0, process_count=1)


def test_missing_pair_list_and_malformed_line(root):
    (root / "test_pairs.txt").unlink()
    with pytest.raises(common.DataError, match="test_pairs.txt"):
        pipeline.make_dataset(_cfg(root), "test", process_index=0, process_count=1)
    (root / "train_pairs.txt").write_text("00000_00.jpg\n")
    with pytest.raises(common.DataError, match=r"train_pairs.txt:1"):
        pipeline.make_dataset(_cfg(root), "train", process_index=0, process_count=1)


def test_skip_and_count(root):
    (root / "train" / "image" / "00001_00.jpg").unlink()
    c = root / "train" / "cloth" / "00006_00.jpg"
    c.write_bytes(b"not a jpeg")
    cfg = _cfg(root, on_bad_sample="skip")
    it = iter(pipeline.make_dataset(cfg, "train", process_index=0, process_count=1))
    batches = list(it)
    idx = [i for b in batches for i in b["index"].tolist()]
    assert idx == [0, 2, 3, 4, 5, 7]
    assert it.num_bad_samples == 2
    assert all(b["person"].shape[0] == 2 for b in batches)  # batches are refilled with good ones


def test_skip_count_survives_checkpoint(root):
    (root / "train" / "image" / "00000_00.jpg").unlink()
    (root / "train" / "image" / "00005_00.jpg").unlink()
    cfg = _cfg(root, on_bad_sample="skip", num_workers=0)
    it = iter(pipeline.make_dataset(cfg, "train", process_index=0, process_count=1))
    next(it)
    state = it.get_state()
    assert state["num_bad_samples"] == 1
    rest = [b["index"].tolist() for b in it]
    it2 = iter(pipeline.make_dataset(cfg, "train", process_index=0, process_count=1))
    it2.set_state(state)
    assert [b["index"].tolist() for b in it2] == rest == [[3, 4], [6, 7]]
    assert it2.num_bad_samples == it.num_bad_samples == 2


def test_skip_with_workers(root):
    (root / "train" / "image" / "00002_00.jpg").unlink()
    cfg = _cfg(root, on_bad_sample="skip", num_workers=2)
    it = iter(pipeline.make_dataset(cfg, "train", process_index=0, process_count=1))
    idx = sorted(i for b in it for i in b["index"].tolist())
    assert idx == [0, 1, 3, 4, 5, 6, 7]
    assert it.num_bad_samples == 1
