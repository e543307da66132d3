"""Every training config loads, is self-consistent, and chains its stages; `--config` finds the
packaged configs by path, old path and name."""

import importlib.util
import pathlib

import pytest

from leffa_jax import configs

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "leffa_jax" / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.py")
                 if p.stem not in ("common", "__init__") and not p.stem.endswith("_common"))


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config(path):
    mod = load(path)
    assert "python -m leffa_jax.train --config leffa_jax/configs/" + path.name in mod.__doc__
    c = mod.get_config()
    assert c.data.batch_size == c.train.batch_size
    from leffa_jax import systems

    assert c.task in systems.TASKS
    systems.task_class(c.task)  # the Task class imports
    if c.task == "leffa":
        assert c.model.init.split(":")[0] in ("random", "sd_inpainting", "leffa")
    if path.stem.endswith("_leffa"):
        assert c.leffa.enabled and c.leffa.lam == 1e-3 and c.leffa.tau == 2.0
        assert c.leffa.t_threshold == 500 and abs(c.leffa.min_ratio - 1 / 32) < 1e-12


def test_stages_chain():
    names = {p.stem for p in CONFIGS}
    for a, b in (("tryon_512", "tryon_1024"), ("tryon_1024", "tryon_1024_leffa"),
                 ("pose_256", "pose_512"), ("pose_512", "pose_512_leffa")):
        assert a in names and b in names
        assert load(CONFIG_DIR / f"{b}.py").get_config() \
            .model.init == f"leffa:runs/{a}/export"


def test_config_resolution(tmp_path):
    want = str(CONFIG_DIR / "tryon_512.py")
    assert configs.names() == sorted(p.stem for p in CONFIGS)
    for spec in ("tryon_512", "leffa_jax.configs.tryon_512", "configs/tryon_512.py",
                 "leffa_jax/configs/tryon_512.py", "/elsewhere/configs/tryon_512.py"):
        assert pathlib.Path(configs.resolve(spec)).samefile(want), spec
    own = tmp_path / "tryon_512.py"
    own.write_text("")
    assert configs.resolve(str(own)) == str(own)  # an existing file wins
    assert configs.resolve("mine/tryon_512.py") == "mine/tryon_512.py"  # not silently replaced
    assert configs.resolve("tryon_512:arg") == want + ":arg"
    assert configs.resolve_argv(["p", "--config", "tryon_512", "--config.a=1"])[2] == want
    assert configs.resolve_argv(["p", "--config=pose_256"]) == \
        ["p", "--config=" + str(CONFIG_DIR / "pose_256.py")]
    assert configs.get_config("tryon_512").data.height == 512
