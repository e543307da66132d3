"""Metric parity: each JAX metric against the authors' reference packages run here on the same
images with the same random (perturbed) weights, loaded from files written the way users have
them (pytorch-fid .pth, clean-fid TorchScript, torchvision squeezenet .pth, LPIPS squeeze.pth).

FID's 2048x2048 `scipy.linalg.sqrtm` takes minutes on a 2-core machine, so FID values are
compared on pytorch-fid's 64-d block (its `dims=64`, full rank with 80 images) end to end, and on
leading feature columns elsewhere; the 2048-d features themselves are compared directly.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from conftest import require_module

require_module("torch")
for _pkg in ("pytorch_fid", "cleanfid", "torchmetrics"):
    require_module(_pkg, "metric references: pip install --no-deps -r requirements-metrics.txt")

import jax.numpy as jnp  # noqa: E402
import metrics_reference as ref  # noqa: E402
import torch  # noqa: E402
import torchvision_shim  # noqa: E402
from PIL import Image  # noqa: E402

from leffa_jax.metrics import extract, fid, images, ssim, weights  # noqa: E402

# 8 paired images per side, ids 00000_00 ..; GT at another height (VtonEval resizes it).
IDS = [f"{i:05d}_00" for i in range(8)]
BATCH = 8  # one jit shape per network; a multiple of the 8 host devices


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(scope="module", autouse=True)
def _torchvision_stand_in():
    """The reference packages' torchvision, only while this module's tests run."""
    torchvision_shim.install()
    yield
    torchvision_shim.uninstall()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Users' weight files in a fake TORCH_HOME / clean-fid folder, and the image folders."""
    root = tmp_path_factory.mktemp("metrics")
    hub = root / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    calib = ref.write_images(str(root / "calib"), [f"c{i}" for i in range(4)], (64, 64), 9)
    calib_t = torch.stack([torch.from_numpy(images.load_rgb(p).astype(np.float32) / 255)
                           .permute(2, 0, 1) for p in calib])
    state = ref.random_inception_state(0, calibration=calib_t)
    torch.save(state, hub / "pt_inception-2015-12-05-6726825d.pth")
    clean_dir = root / "cleanfid"
    clean_dir.mkdir()
    ref.clean_fid_torchscript(state, str(clean_dir / "inception-2015-12-05.pt"))
    sq = ref.random_squeezenet_state()
    torch.save(sq, hub / "squeezenet1_1-b8a52dc0.pth")
    lins = ref.perturbed_lpips_lins()
    torch.save(lins, root / "squeeze.pth")
    gt = str(root / "gt")
    pred = str(root / "pred")
    ref.write_images(gt, IDS, (128, 96), 1, ext=".jpg")
    ref.write_images(pred, [f"p{i}" for i in IDS], (64, 48), 2)
    return {"root": root, "hub": str(hub), "state": state, "gt": gt, "pred": pred,
            "clean": str(clean_dir / "inception-2015-12-05.pt"), "lins": str(root / "squeeze.pth"),
            "squeeze_state": sq, "pth": str(hub / "pt_inception-2015-12-05-6726825d.pth"),
            "squeezenet": str(hub / "squeezenet1_1-b8a52dc0.pth")}


@pytest.fixture(scope="module")
def inception(files):
    saved = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(files["root"] / "torch")
    try:
        return weights.load_inception()  # found in $TORCH_HOME/hub/checkpoints
    finally:
        if saved is None:
            del os.environ["TORCH_HOME"]
        else:
            os.environ["TORCH_HOME"] = saved


def test_missing_weights_error_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05.*never downloads"):
        weights.find("inception")
    with pytest.raises(FileNotFoundError, match="squeezenet1_1"):
        weights.find("squeezenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.load_inception(str(tmp_path / "nope.pth"))


def test_clean_fid_layout_is_pytorch_fid_network(files):
    """The re-declared TorchScript module tree computes pytorch-fid's network (same weights)."""
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(3))
    pf = ref.build_pytorch_fid(files["state"]).eval()
    scripted = torch.jit.load(files["clean"])
    with torch.no_grad():
        a = pf.blocks[3](pf.blocks[2](pf.blocks[1](pf.blocks[0](2 * x - 1)))).flatten(1)
        b = scripted.layers(2 * x - 1).flatten(1)
    assert rel(b, a) < 1e-5


def test_vton_eval_pipeline(files, monkeypatch):
    """VtonEval end to end on a synthetic folder vs `leffa_jax.evaluate.evaluate_folders`: GT of
    another height resized (Lanczos, re-saved) to the prediction height, clean-fid features and
    KID x1000 (clean-fid's code and model object), pytorch-fid features (its loader and model),
    FID (both packages' Frechet distance on the leading 4 feature columns: the 2048-d sqrtm is
    too slow here), paired SSIM / LPIPS (torchmetrics) over id-matched pairs."""
    import cleanfid.fid as cfid
    import pytorch_fid.fid_score as pfid
    from cleanfid.inception_torchscript import InceptionV3W
    from torchmetrics.image import StructuralSimilarityIndexMeasure
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from leffa_jax import evaluate

    # -- VtonEval's steps with the reference packages
    pred_h = images.vton_first_height(files["pred"])
    assert pred_h != images.vton_first_height(files["gt"])
    gt_resized = ref.vton_copy_resize_gt(files["gt"], pred_h)
    model = InceptionV3W(os.path.dirname(files["clean"]), download=False)
    kw = dict(num_workers=0, batch_size=BATCH, device=torch.device("cpu"), mode="clean",
              verbose=False)
    ref_gt = cfid.get_folder_features(gt_resized, model, **kw)
    ref_pred = cfid.get_folder_features(files["pred"], model, **kw)
    np.random.seed(0)
    ref_kid = cfid.kernel_distance(ref_gt, ref_pred) * 1000
    ref_clean_fid4 = cfid.fid_from_feats(ref_gt[:, :4], ref_pred[:, :4])

    pf = ref.build_pytorch_fid(files["state"])
    pf_files = [sorted(pathlib.Path(d).glob("*.jpg")) + sorted(pathlib.Path(d).glob("*.png"))
                for d in (gt_resized, files["pred"])]
    ref_pf = [pfid.get_activations(f, pf, batch_size=BATCH, dims=2048, device="cpu",
                                   num_workers=0) for f in pf_files]
    ref_pf_fid4 = pfid.calculate_frechet_distance(
        *(x for a in ref_pf for x in (a[:, :4].mean(0), np.cov(a[:, :4], rowvar=False))))

    gt_ids = {ref.vton_extract_id(f): os.path.join(gt_resized, f) for f in os.listdir(gt_resized)}
    pairs = [(gt_ids[ref.vton_extract_id(f)], os.path.join(files["pred"], f))
             for f in sorted(os.listdir(files["pred"]))]
    to_t = torchvision_shim.ToTensor()
    gts = torch.stack([to_t(ref.vton_resize(Image.open(g), pred_h)) for g, _ in pairs])
    preds = torch.stack([to_t(ref.vton_resize(Image.open(p), pred_h)) for _, p in pairs])
    ssim_ref = StructuralSimilarityIndexMeasure(data_range=1.0)(preds, gts).item()
    lp = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    lp.net.net.load_state_dict(ref.torchmetrics_squeeze_keys(files["squeeze_state"]))
    lp.net.load_state_dict(torch.load(files["lins"]), strict=False)
    with torch.no_grad():
        lpips_ref = lp(gts * 2 - 1, preds * 2 - 1).item()

    # -- leffa_jax (FID on the same leading 4 columns, through our own fid.fid)
    full_fid = fid.fid
    monkeypatch.setattr(fid, "fid", lambda a, b: full_fid(a[:, :4], b[:, :4]))
    ours = evaluate.evaluate_folders(
        files["pred"], files["gt"], paired=True, metrics=evaluate.PAPER_METRICS, batch_size=BATCH,
        weight_paths={"inception": files["pth"], "clean_inception": files["clean"],
                      "squeezenet": files["squeezenet"], "lpips_lins": files["lins"]},
        progress=False, return_features=True)
    feats, m = ours["features"], ours["metrics"]
    errors = {
        "clean-fid features (gt, pred)": (rel(feats["clean_fid_gt"], ref_gt),
                                          rel(feats["clean_fid_pred"], ref_pred)),
        "pytorch-fid features (gt, pred)": (rel(feats["pytorch_fid_gt"], ref_pf[0]),
                                            rel(feats["pytorch_fid_pred"], ref_pf[1])),
        "clean KID x1000": abs(m["clean_kid_x1000"] - ref_kid) / abs(ref_kid),
        "clean FID[:4]": abs(m["clean_fid"] - ref_clean_fid4) / abs(ref_clean_fid4),
        "pytorch FID[:4]": abs(m["pytorch_fid"] - ref_pf_fid4) / abs(ref_pf_fid4),
        "SSIM abs": abs(m["ssim"] - ssim_ref), "LPIPS abs": abs(m["lpips"] - lpips_ref)}
    print("parity:", errors, "reference:", ref_kid, ssim_ref, lpips_ref)
    assert ours["gt_resized_to_height"] and ours["counts"]["pairs"] == len(IDS)
    assert max(errors["clean-fid features (gt, pred)"]) <= 1e-4
    assert max(errors["pytorch-fid features (gt, pred)"]) <= 1e-4
    assert errors["clean KID x1000"] <= 1e-4
    assert errors["clean FID[:4]"] <= 1e-4 and errors["pytorch FID[:4]"] <= 1e-4
    assert errors["SSIM abs"] <= 1e-5 and errors["LPIPS abs"] <= 1e-5


def test_pytorch_fid_value_end_to_end(tmp_path, files, inception):
    """pytorch-fid's `calculate_fid_given_paths(dims=64)` (its loader, model, statistics and
    sqrtm) vs leffa_jax on two folders of 80 small images (full-rank 64-d covariances)."""
    import pytorch_fid.fid_score as pfid
    import pytorch_fid.inception as pi

    a = ref.write_images(str(tmp_path / "a"), [f"{i:03d}" for i in range(80)], (20, 24), 5)
    b = ref.write_images(str(tmp_path / "b"), [f"{i:03d}" for i in range(80)], (20, 24), 6)
    orig = pi.load_state_dict_from_url
    pi.load_state_dict_from_url = lambda url, progress=True: files["state"]
    try:
        ref_fid = pfid.calculate_fid_given_paths([str(tmp_path / "a"), str(tmp_path / "b")],
                                                 batch_size=16, device="cpu", dims=64,
                                                 num_workers=0)
    finally:
        pi.load_state_dict_from_url = orig
    run = extract.Runner(inception, lambda m, x: m.pytorch_fid_features(x, 64))
    fa = extract.stream(a, extract.load_pytorch_fid, run, 16)
    fb = extract.stream(b, extract.load_pytorch_fid, run, 16)
    ours = fid.fid(fa.astype(np.float64), fb.astype(np.float64))
    print("pytorch-fid FID(dims=64)", ref_fid, ours, abs(ours - ref_fid) / ref_fid)
    assert abs(ours - ref_fid) <= 1e-4 * abs(ref_fid)


def test_ssim_matches_torchmetrics_on_varied_images():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 40, 33, generator=g)
    pred = (target + 0.2 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    want = StructuralSimilarityIndexMeasure(data_range=1.0)(pred, target).item()
    got = float(jnp.mean(ssim.ssim(jnp.asarray(pred.permute(0, 2, 3, 1).numpy()),
                                   jnp.asarray(target.permute(0, 2, 3, 1).numpy()))))
    assert abs(got - want) <= 1e-5
