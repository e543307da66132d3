"""`python -m leffa_jax.evaluate` on a small synthetic folder: weights found in the usual places
(squeezenet in $TORCH_HOME, LPIPS linear layers inside the installed torchmetrics), a table on
stdout, JSON written atomically, numbers equal to torchmetrics run here; usage errors exit 2."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import require_module

require_module("torch")
for _pkg in ("torchmetrics", "pytorch_fid", "cleanfid"):
    require_module(_pkg, "pip install --no-deps -r requirements-metrics.txt")

import metrics_reference as ref  # noqa: E402
import torch  # noqa: E402
import torchvision_shim  # noqa: E402
from PIL import Image  # noqa: E402

from leffa_jax import evaluate  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _torchvision_stand_in():
    """The reference packages' torchvision, only while this module's tests run."""
    torchvision_shim.install()
    yield
    torchvision_shim.uninstall()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    hub = root / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    sq = ref.random_squeezenet_state(4)
    torch.save(sq, hub / "squeezenet1_1-b8a52dc0.pth")
    ids = ["01234_00", "01235_00", "01236_00", "99999_00"]
    ref.write_images(str(root / "gt"), ids, (64, 48), 7, ext=".jpg")
    ref.write_images(str(root / "pred"), [f"x{i}" for i in ids[:3]], (64, 48), 8)
    return root, sq


def test_cli_paired_ssim_lpips(setup, monkeypatch, capsys):
    from torchmetrics.image import StructuralSimilarityIndexMeasure
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    root, sq = setup
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    out = root / "res" / "metrics.json"
    rc = evaluate.main(["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--paired",
                        "--metrics", "ssim,lpips", "--json", str(out), "--batch-size", "8",
                        "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "SSIM" in printed and "LPIPS" in printed
    res = json.loads(out.read_text())
    assert res["counts"] == {"pairs": 3, "unmatched_predictions": 0}
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left

    to_t = torchvision_shim.ToTensor()
    pairs = [(root / "gt" / f"{i}.jpg", root / "pred" / f"x{i}.png")
             for i in ["01234_00", "01235_00", "01236_00"]]
    gts = torch.stack([to_t(Image.open(g)) for g, _ in pairs])
    preds = torch.stack([to_t(Image.open(p)) for _, p in pairs])
    want_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(preds, gts).item()
    lp = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")  # shipped linear layers
    lp.net.net.load_state_dict(ref.torchmetrics_squeeze_keys(sq))
    with torch.no_grad():
        want_lpips = lp(gts * 2 - 1, preds * 2 - 1).item()
    assert abs(res["metrics"]["ssim"] - want_ssim) <= 1e-5
    assert abs(res["metrics"]["lpips"] - want_lpips) <= 1e-5


def test_cli_usage_errors(setup, tmp_path, monkeypatch, capsys):
    root, _ = setup
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no weights there
    base = ["--pred", str(root / "pred"), "--gt", str(root / "gt"), "--no-progress"]
    assert evaluate.main(base + ["--metrics", "ssim"]) == 2
    assert "add --paired" in capsys.readouterr().err
    assert evaluate.main(base + ["--metrics", "psnr"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert evaluate.main(["--pred", str(tmp_path / "none"), "--gt", str(root / "gt")]) == 2
    assert "not a folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    if not any(os.path.isfile(p) for p in ("/tmp/inception-2015-12-05.pt",)):
        assert evaluate.main(base + ["--metrics", "kid"]) == 2
        err = capsys.readouterr().err
        assert "inception-2015-12-05.pt" in err and "never downloads" in err
    assert not list(tmp_path.glob("*.json"))
    np.testing.assert_equal(evaluate.main(base + ["--paired", "--metrics", "lpips"]), 2)
    assert "squeezenet1_1" in capsys.readouterr().err


def test_model_mode_samples_split_then_evaluates(setup, tmp_path, monkeypatch):
    """--model: the tiny model samples a synthetic VITON-HD test split through the Grain
    pipeline, the GT (64x48 JPEGs) is resized to the 32x24 samples as VtonEval does, and the
    paired SSIM equals torchmetrics' on VtonEval's resized copy."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    from leffa_jax.data.synthetic import make_synthetic_dataset
    from leffa_jax.model import random_official_checkpoint, tiny_config_dir

    root, _ = setup
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    data = make_synthetic_dataset(tmp_path / "data", "viton_hd", num_train=1, num_test=3,
                                  height=64, width=48)
    ckpt = random_official_checkpoint(tiny_config_dir(), str(tmp_path / "tiny.safetensors"))
    out = tmp_path / "run"
    rc = evaluate.main(["--model", ckpt, "--base-config", tiny_config_dir(), "--dataset",
                        "viton_hd", "--data-root", str(data), "--paired", "--out", str(out),
                        "--height", "32", "--width", "24", "--steps", "2",
                        "--sample-batch-size", "2", "--metrics", "ssim,lpips",
                        "--json", str(out / "metrics.json"), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    preds = sorted((out / "pred").iterdir())
    assert len(preds) == 3 and res["counts"]["pairs"] == 3
    assert len(list((out / "gt").iterdir())) == 3

    gt32 = ref.vton_copy_resize_gt(str(out / "gt"), 32)  # VtonEval's own resize step
    to_t = torchvision_shim.ToTensor()
    gts = torch.stack([to_t(Image.open(os.path.join(gt32, p.name.split("__")[0] + ".jpg")))
                       for p in preds])
    prs = torch.stack([to_t(Image.open(p)) for p in preds])
    want = StructuralSimilarityIndexMeasure(data_range=1.0)(prs, gts).item()
    assert abs(res["metrics"]["ssim"] - want) <= 1e-5
    assert np.isfinite(res["metrics"]["lpips"])


def test_default_metrics_are_the_papers_and_never_need_clip():
    for extra, expected in ((["--paired"], ["fid", "kid", "ssim", "lpips"]), ([], ["fid", "kid"])):
        args = evaluate.build_parser().parse_args(["--pred", "p", "--gt", "g", *extra])
        assert evaluate._metrics(args) == expected
