"""Conversion: official fixtures round-trip bit-exactly; strict, clear errors; streaming memory."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, shared_path

from leffa_jax import convert
from leffa_jax.nn.config import ConfigError

FIXTURES = {"sd15_tiny": "stable-diffusion-inpainting-tiny",
            "sdxl_tiny": "stable-diffusion-xl-1.0-inpainting-0.1-tiny"}


def _fixture(name):
    base = shared_path("fixtures", "leffa_official", name)
    return base / "weights.safetensors", base / "config" / FIXTURES[name]


def _assert_bit_exact(src: convert.TensorSource, back: dict):
    assert sorted(back) == sorted(src.keys())
    for k in src.keys():
        a, b = src[k], back[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert a.tobytes() == b.tobytes(), f"{k} differs after the round trip"


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_official_fixture_round_trip_bit_exact(tmp_path, name, fmt):
    weights, cfg = _fixture(name)
    comps = convert.official_to_flax(str(weights), str(cfg), str(tmp_path / "flax"), [fmt])
    assert comps["unet"]["in_channels"] == 12 and comps["unet_encoder"]["in_channels"] == 4
    src = convert.TensorSource(weights)
    counts = {c: sum(k.startswith(c + ".") for k in src.keys()) for c in convert.COMPONENTS}
    assert counts["vae"] > 0 and counts["unet"] == counts["unet_encoder"]
    _assert_bit_exact(src, dict(convert.flax_to_torch_state(str(tmp_path / "flax"))))
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
    src = convert.TensorSource(weights)
    _assert_bit_exact(src, {k: v.numpy() for k, v in sd.items()})
    # .pth -> flax -> safetensors also works (the torch reader path)
    run("to-flax", "--checkpoint", str(tmp_path / "back.pth"), "--base-config", str(cfg),
        "--out", str(tmp_path / "f2"))
    run("to-torch", "--flax", str(tmp_path / "f2"), "--out", str(tmp_path / "back.safetensors"))
    _assert_bit_exact(src, {k: convert.TensorSource(tmp_path / "back.safetensors")[k]
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
    comps = convert.diffusers_to_flax(str(folder), str(tmp_path / "f"))
    assert comps["unet"]["in_channels"] == 9
    back = dict(convert.flax_to_torch_state(str(tmp_path / "f")))
    for comp, fname in (("unet", "diffusion_pytorch_model.safetensors"),
                        ("vae", "diffusion_pytorch_model.bin")):
        src = convert.TensorSource(folder / comp / fname)
        for k in src.keys():
            assert back[f"{comp}.{k}"].tobytes() == src[k].tobytes()


def test_error_other_architecture(tmp_path):
    weights, _ = _fixture("sd15_tiny")
    _, xl_cfg = _fixture("sdxl_tiny")
    with pytest.raises(convert.CheckpointError) as e:
        convert.official_to_flax(str(weights), str(xl_cfg), str(tmp_path / "o"))
    msg = str(e.value)
    assert str(weights) in msg and "missing" in msg and "unexpected" in msg
    assert "add_embedding.linear_1.kernel" in msg  # SDXL has it, SD1.5 does not


def test_error_truncated_files(tmp_path):
    weights, cfg = _fixture("sd15_tiny")
    data = weights.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointError, match="truncated"):
        convert.official_to_flax(str(cut), str(cfg), str(tmp_path / "o"))
    with pytest.raises(convert.CheckpointError, match="cut.safetensors"):
        convert.TensorSource(cut)
    torch = pytest.importorskip("torch")
    pth = tmp_path / "w.pth"
    torch.save({k: torch.zeros(2) for k in ("a.weight", "b.bias")}, pth)
    (tmp_path / "cut.pth").write_bytes(pth.read_bytes()[:100])
    with pytest.raises(convert.CheckpointError, match="cut.pth.*truncated"):
        convert.TensorSource(tmp_path / "cut.pth")
    with pytest.raises(convert.CheckpointError, match="not found"):
        convert.TensorSource(tmp_path / "nope.pth")


def test_error_wrong_configs(tmp_path):
    _, cfg = _fixture("sd15_tiny")
    bad = tmp_path / "bad"
    shutil.copytree(cfg, bad)
    ucfg = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps(
        dict(ucfg, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"])))
    with pytest.raises(ConfigError, match=r"bad/unet/config.json.*SimpleCrossAttnDownBlock2D"):
        convert.expected_params("unet", str(bad))
    (bad / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        convert.expected_params("unet", str(bad))
    (bad / "unet" / "config.json").write_text(json.dumps(dict(ucfg, block_out_channels=[30, 64])))
    with pytest.raises(ConfigError, match="not divisible by norm_num_groups"):
        convert.expected_params("unet", str(bad))
    with pytest.raises(ConfigError, match="config not found"):
        convert.expected_params("vae", str(tmp_path / "nowhere"))


def test_streaming_conversion_peak_memory(tmp_path):
    """A ~200 MB checkpoint converts with peak RSS growth well under 3x its size."""
    code = r"""
import resource, sys, numpy as np
from leffa_jax import convert
cfg, src, out = sys.argv[1:4]
want = convert.expected_params("unet", cfg, 4)
items = []
for path, (shape, _) in want.items():
    key, t = convert.flax_to_torch_leaf(path, np.broadcast_to(np.zeros((), np.float32), shape))
    items.append(("unet." + key, convert.LazyTensor(t.shape, np.float32,
                  lambda s=t.shape: np.ones(s, np.float32))))
convert.write_safetensors(src, items)
import os
size = os.path.getsize(src)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
source = convert.TensorSource(src)
params = {k: convert._lazy_flax(source, k) for k in source.keys()}
convert.write_safetensors(out, list(params.items()))
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
