"""Conversion: official fixtures round-trip bit-exactly; strict, clear errors; streaming memory."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, shared_path
from flax import nnx

from leffa_jax import components
from leffa_jax.nn.config import ConfigError
from leffa_jax.weights import folder as weights_folder
from leffa_jax.weights import plans
from leffa_jax.weights.modules import expected_params, module_from_flat, module_to_flat
from leffa_jax.weights.tensor_io import CheckpointError, TensorSource, write_safetensors

FIXTURES = {"sd15_tiny": "stable-diffusion-inpainting-tiny",
            "sdxl_tiny": "stable-diffusion-xl-1.0-inpainting-0.1-tiny"}


def _fixture(name):
    base = shared_path("fixtures", "leffa_official", name)
    return base / "weights.safetensors", base / "config" / FIXTURES[name]


def _assert_bit_exact(src: TensorSource, back: dict):
    assert sorted(back) == sorted(src.keys())
    for k in src.keys():
        a, b = src[k], back[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert a.tobytes() == b.tobytes(), f"{k} differs after the round trip"


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_official_fixture_round_trip_bit_exact(tmp_path, name, fmt):
    weights, cfg = _fixture(name)
    comps = plans.official_to_flax(str(weights), str(cfg), str(tmp_path / "flax"), [fmt])
    assert comps["unet"]["in_channels"] == 12 and comps["unet_encoder"]["in_channels"] == 4
    src = TensorSource(weights)
    counts = {c.name: sum(k.startswith(c.name + ".") for k in src.keys())
              for c in components.LEFFA}
    assert counts["vae"] > 0 and counts["unet"] == counts["unet_encoder"]
    _assert_bit_exact(src, dict(plans.flax_to_torch_state(str(tmp_path / "flax"))))
    # the official zero-SNR rule (decided by the base folder's name) is written down explicitly
    sched = json.loads((tmp_path / "flax" / "config" / "scheduler" / "scheduler_config.json")
                       .read_text())
    assert sched["rescale_betas_zero_snr"] is (name == "sdxl_tiny")


def test_cli_both_ways_and_official_loader(tmp_path):
    """CLI to-flax, to-torch (.pth); the .pth loads with torch.load(weights_only=True) and has the
    official keys, shapes and dtypes."""
    torch = pytest.importorskip("torch")
    weights, cfg = _fixture("sd15_tiny")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = lambda *a: subprocess.run([sys.executable, "-m", "leffa_jax.convert", *a], env=env,
                                    capture_output=True, text=True, check=True)
    run("to-flax", "--checkpoint", str(weights), "--base-config", str(cfg), "--out",
        str(tmp_path / "f"), "--formats", "safetensors,orbax")
    run("to-torch", "--flax", str(tmp_path / "f"), "--out", str(tmp_path / "back.pth"))
    sd = torch.load(tmp_path / "back.pth", weights_only=True)
    src = TensorSource(weights)
    _assert_bit_exact(src, {k: v.numpy() for k, v in sd.items()})
    # .pth -> flax -> safetensors also works (the torch reader path)
    run("to-flax", "--checkpoint", str(tmp_path / "back.pth"), "--base-config", str(cfg),
        "--out", str(tmp_path / "f2"))
    run("to-torch", "--flax", str(tmp_path / "f2"), "--out", str(tmp_path / "back.safetensors"))
    _assert_bit_exact(src, {k: TensorSource(tmp_path / "back.safetensors")[k]
                            for k in src.keys()})
    out = run("verify", "--checkpoint", str(weights), "--base-config", str(cfg)).stdout
    assert "bit-exact" in out


def test_diffusers_folder_to_flax(tmp_path):
    """A diffusers-format folder (as SD1.5-inpainting ships) converts and round-trips."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    _, cfg = _fixture("sd15_tiny")
    folder = tmp_path / "sd"
    ucfg = json.loads((cfg / "unet" / "config.json").read_text())
    vcfg = json.loads((cfg / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")}
                                   ).save_pretrained(folder / "unet")
    diffusers.AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")}
                            ).save_pretrained(folder / "vae", safe_serialization=False)
    comps = plans.diffusers_to_flax(str(folder), str(tmp_path / "f"))
    assert comps["unet"]["in_channels"] == 9
    back = dict(plans.flax_to_torch_state(str(tmp_path / "f")))
    for comp, fname in (("unet", "diffusion_pytorch_model.safetensors"),
                        ("vae", "diffusion_pytorch_model.bin")):
        src = TensorSource(folder / comp / fname)
        for k in src.keys():
            assert back[f"{comp}.{k}"].tobytes() == src[k].tobytes()


def test_error_other_architecture(tmp_path):
    weights, _ = _fixture("sd15_tiny")
    _, xl_cfg = _fixture("sdxl_tiny")
    with pytest.raises(CheckpointError) as e:
        plans.official_to_flax(str(weights), str(xl_cfg), str(tmp_path / "o"))
    msg = str(e.value)
    assert str(weights) in msg and "missing" in msg and "unexpected" in msg
    # named as in the file (SDXL has it, SD1.5 does not); proj_in is 1x1 conv vs linear
    assert "unet_encoder.add_embedding.linear_1.weight" in msg
    assert "unet_encoder.mid_block.attentions.0.proj_in.weight: (64, 64, 1, 1) vs (64, 64)" in msg
    assert not (tmp_path / "o").exists()


def test_error_truncated_files(tmp_path):
    weights, cfg = _fixture("sd15_tiny")
    data = weights.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        plans.official_to_flax(str(cut), str(cfg), str(tmp_path / "o"))
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        TensorSource(cut)
    torch = pytest.importorskip("torch")
    pth = tmp_path / "w.pth"
    torch.save({k: torch.zeros(2) for k in ("a.weight", "b.bias")}, pth)
    (tmp_path / "cut.pth").write_bytes(pth.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated"):
        TensorSource(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="not found"):
        TensorSource(tmp_path / "nope.pth")


def test_error_wrong_configs(tmp_path):
    _, cfg = _fixture("sd15_tiny")
    bad = tmp_path / "bad"
    shutil.copytree(cfg, bad)
    ucfg = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps(
        dict(ucfg, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"])))
    with pytest.raises(ConfigError, match=r"bad/unet/config.json.*SimpleCrossAttnDownBlock2D"):
        expected_params("unet", str(bad))
    (bad / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        expected_params("unet", str(bad))
    (bad / "unet" / "config.json").write_text(json.dumps(dict(ucfg, block_out_channels=[30, 64])))
    with pytest.raises(ConfigError, match="not divisible by norm_num_groups"):
        expected_params("unet", str(bad))
    with pytest.raises(ConfigError, match="config not found"):
        expected_params("vae", str(tmp_path / "nowhere"))


def test_streaming_conversion_peak_memory(tmp_path):
    """A ~200 MB checkpoint converts with peak RSS growth well under 3x its size."""
    code = r"""
import resource, sys, numpy as np
from leffa_jax.components import Component
from leffa_jax.weights import leaf_rules, modules, plans, tensor_io
cfg, src, out = sys.argv[1:4]
want = modules.expected_params("unet", cfg, 4)
items = []
for path, (shape, _) in want.items():
    key, t = leaf_rules.flax_to_torch_leaf(path, np.broadcast_to(np.zeros((), np.float32), shape))
    items.append(("unet." + key, tensor_io.LazyTensor(t.shape, np.float32,
                  lambda s=t.shape: np.ones(s, np.float32))))
tensor_io.write_safetensors(src, items)
import os
size = os.path.getsize(src)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
plan = plans.plan_prefixed(src, cfg, (Component("unet", "unet"),))
tensor_io.write_safetensors(out, list(plan.lazy_params().items()))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(size, after - before, flush=True)
"""
    cfg = tmp_path / "cfg"
    (cfg / "unet").mkdir(parents=True)
    (cfg / "unet" / "config.json").write_text(json.dumps(dict(
        block_out_channels=[320, 640], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2,
        attention_head_dim=8, cross_attention_dim=768)))
    r = subprocess.run([sys.executable, "-c", code, str(cfg), str(tmp_path / "src.safetensors"),
                        str(tmp_path / "out.safetensors")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
    size, growth = map(int, r.stdout.split()[-2:])
    assert size > 150e6
    assert growth < 1.5 * size, f"peak RSS grew {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


# ----------------------------------------------------------------------------- a new kind


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    in_features: int
    out_features: int


class _ToyProjection(nnx.Module):
    """A Linear-only kind whose torch layout names its leaves `W` (out, in) and `b`."""

    def __init__(self, config: _ToyConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.proj = nnx.Linear(config.in_features, config.out_features, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def _build_toy(config_folder, *, rngs, in_features=None):
    config = json.loads((pathlib.Path(config_folder) / "config.json").read_text())
    return _ToyProjection(_ToyConfig(in_features or config["in_features"],
                                     config["out_features"]), rngs=rngs)


def _toy_to_flax(key, array):
    base, leaf = key.rsplit(".", 1)
    return (f"{base}.kernel", array.T) if leaf == "W" else (f"{base}.bias", array)


def _toy_to_torch(path, array):
    base, leaf = path.rsplit(".", 1)
    return (f"{base}.W", array.T) if leaf == "kernel" else (f"{base}.b", array)


TOY_KIND = components.ComponentKind(
    "toy", _build_toy, "toy", _toy_to_flax, _toy_to_torch, options=("in_features",),
    options_from_tensors=lambda shapes: {"in_features": shapes["proj.W"][1]})


def test_new_kind_round_trips_with_one_table_entry(tmp_path, monkeypatch):
    """Registering a kind in `components.KINDS` is all it takes: a prefixed file of a system
    made of that kind converts, loads, rebuilds its modules, saves again and converts back
    bit-exactly, with its build option (in_features) read from the tensors and recorded."""
    monkeypatch.setitem(components.KINDS, "toy", TOY_KIND)
    base = tmp_path / "base"
    (base / "toy").mkdir(parents=True)
    (base / "toy" / "config.json").write_text(json.dumps({"in_features": 3, "out_features": 5}))
    rng = np.random.default_rng(0)
    tensors = {"encoder.proj.W": rng.standard_normal((5, 3)).astype(np.float32),
               "encoder.proj.b": rng.standard_normal(5).astype(np.float32),
               "head.proj.W": rng.standard_normal((5, 6)).astype(np.float16),
               "head.proj.b": rng.standard_normal(5).astype(np.float16)}
    write_safetensors(str(tmp_path / "toy.safetensors"), tensors.items())
    system = (components.Component("encoder", "toy"), components.Component("head", "toy"))
    plan = plans.plan_prefixed(str(tmp_path / "toy.safetensors"), str(base), system, "a toy file")
    entries = plans.save_plan(plan, str(tmp_path / "flax"), ["safetensors", "orbax"])
    assert entries == {"encoder": {"kind": "toy", "config": "toy", "in_features": 3},
                       "head": {"kind": "toy", "config": "toy", "in_features": 6}}
    back = dict(plans.flax_to_torch_state(str(tmp_path / "flax")))
    assert sorted(back) == sorted(tensors)
    for key, array in tensors.items():
        assert back[key].dtype == array.dtype and back[key].tobytes() == array.tobytes(), key

    meta, flat = weights_folder.read_flax_checkpoint(str(tmp_path / "flax"))
    found = weights_folder.checkpoint_components(meta)
    config_dir = str(tmp_path / "flax" / weights_folder.CONFIG_FOLDER)
    head = module_from_flat(found["head"], config_dir, weights_folder.split_params(flat, "head"))
    x = rng.standard_normal((2, 6)).astype(np.float32)
    want = x @ tensors["head.proj.W"].T.astype(np.float32) + tensors["head.proj.b"]
    np.testing.assert_allclose(np.asarray(head(x)), want, rtol=1e-3, atol=1e-3)

    # save again from rebuilt modules (what a model's save_pretrained does), then to torch
    rebuilt = {f"{name}.{path}": value for name, component in found.items()
               for path, value in module_to_flat(module_from_flat(
                   component, config_dir, weights_folder.split_params(flat, name))).items()}
    weights_folder.save_flax_checkpoint(str(tmp_path / "again"), rebuilt, config_dir,
                                        found.values())
    assert plans.flax_to_torch(str(tmp_path / "again"), str(tmp_path / "back.safetensors")) == 4
    again = TensorSource(tmp_path / "back.safetensors")
    for key, array in tensors.items():
        assert again[key].dtype == array.dtype and again[key].tobytes() == array.tobytes(), key

    monkeypatch.delitem(components.KINDS, "toy")
    with pytest.raises(CheckpointError, match="unknown component kind 'toy'"):
        dict(plans.flax_to_torch_state(str(tmp_path / "again")))
