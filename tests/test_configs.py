"""Every training config loads, is self-consistent, and chains its stages."""

import importlib.util
import pathlib

import pytest

CONFIGS = sorted(p for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                 if p.stem != "common")


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config(path):
    mod = load(path)
    assert "python -m leffa_jax.train --config configs/" + path.name in mod.__doc__
    c = mod.get_config()
    assert c.data.batch_size == c.train.batch_size
    assert c.model.init.split(":")[0] in ("random", "sd_inpainting", "leffa")
    if path.stem.endswith("_leffa"):
        assert c.leffa.enabled and c.leffa.lam == 1e-3 and c.leffa.tau == 2.0
        assert c.leffa.t_threshold == 500 and abs(c.leffa.min_ratio - 1 / 32) < 1e-12


def test_stages_chain():
    names = {p.stem for p in CONFIGS}
    for a, b in (("tryon_512", "tryon_1024"), ("tryon_1024", "tryon_1024_leffa"),
                 ("pose_256", "pose_512"), ("pose_512", "pose_512_leffa")):
        assert a in names and b in names
        assert load(pathlib.Path(__file__).parents[1] / "configs" / f"{b}.py").get_config() \
            .model.init == f"leffa:runs/{a}/export"
