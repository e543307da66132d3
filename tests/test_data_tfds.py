"""TFDS builders: build the ArrayRecord form of the three synthetic layouts and read it through
tfds.data_source with the same Grain pipeline; it must equal the folder pipeline."""

import numpy as np
import pytest

from leffa_jax.data import config as config_lib
from leffa_jax.data import pipeline, synthetic
from leffa_jax.data.tfds import builders

H, W = 64, 48


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("tfds")
    roots = {
        "viton_hd": synthetic.make_synthetic_dataset(
            base / "v", "viton_hd", num_train=4, num_test=3, height=H, width=W, seed=1
        ),
        "dresscode": synthetic.make_synthetic_dataset(
            base / "d", "dresscode", num_train=2, num_test=2, height=H, width=W, seed=2
        ),
        "deepfashion": synthetic.make_synthetic_dataset(
            base / "f", "deepfashion", num_train=3, num_test=2, height=H, width=44, seed=3
        ),
    }
    data_dir = base / "tfds"
    names = {k: builders.build(k, r, data_dir) for k, r in roots.items()}
    return roots, data_dir, names


def _cfg(name, **kw):
    c = config_lib.default_data_config()
    c.name, c.height, c.width, c.batch_size = name, H, W, 2
    c.shuffle, c.num_epochs, c.drop_remainder, c.flip_prob = False, 1, False, 0.0
    for k, v in kw.items():
        c[k] = v
    return c


def _all(cfg, split):
    return list(pipeline.make_dataset(cfg, split, process_index=0, process_count=1))


def test_built_names_and_files(built):
    _, data_dir, names = built
    assert names["dresscode"] == [
        f"leffa_dresscode/{c}" for c in ("upper_body", "lower_body", "dresses")
    ]
    assert list((data_dir / "leffa_viton_hd" / "1.0.0").glob("*.array_record*"))


@pytest.mark.parametrize(
    "name,split,mode,category,width",
    [
        ("viton_hd", "train", "paired", "upper_body", W),
        ("viton_hd", "test", "unpaired", "upper_body", W),
        ("dresscode", "test", "paired", "all", W),
        ("dresscode", "test", "unpaired", "lower_body", W),
        ("deepfashion", "train", "paired", "upper_body", 44),
    ],
)
def test_arrayrecord_equals_folders(built, name, split, mode, category, width):
    roots, data_dir, _ = built
    kw = dict(mode=mode, category=category, width=width)
    folder = _all(_cfg(name, root=str(roots[name]), **kw), split)
    arec = _all(_cfg(name, tfds_dir=str(data_dir), **kw), split)
    assert len(folder) == len(arec) > 0
    for a, b in zip(folder, arec, strict=True):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert ("flow_gt" in folder[0]) == (mode == "paired")


def test_arrayrecord_sharded_restorable_with_workers(built):
    _, data_dir, _ = built
    c = _cfg(
        "viton_hd",
        tfds_dir=str(data_dir),
        shuffle=True,
        num_epochs=None,
        drop_remainder=True,
        flip_prob=0.5,
        num_workers=1,
        batch_size=2,
    )
    idx = []
    for p in range(2):
        ds = pipeline.make_dataset(c, "train", process_index=p, process_count=2)
        it = iter(ds)
        b = [next(it) for _ in range(2)]
        idx.append({i for x in b for i in x["index"].tolist()})
        state = it.get_state()
        nxt = next(it)
        it2 = iter(pipeline.make_dataset(c, "train", process_index=p, process_count=2))
        it2.set_state(state)
        again = next(it2)
        for k in nxt:
            np.testing.assert_array_equal(nxt[k], again[k])
    assert idx == [{0, 2}, {1, 3}]


def test_missing_tfds_dir_names_the_tool(tmp_path):
    with pytest.raises(Exception, match="build_tfds"):
        pipeline.make_dataset(
            _cfg("deepfashion", tfds_dir=str(tmp_path)), "train", process_index=0, process_count=1
        )
