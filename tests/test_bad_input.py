"""Bad inputs a user will give (issue 16): each must fail early with one clear message naming the
problem and the fix, and leave nothing half-written on disk (files and folders are compared
before and after). One section per part of the library; keep each test small and fast.

Sections: convert / weights (`leffa_jax.convert`, `leffa_jax.weights`, `LeffaModel` loading);
sample / viz (`leffa_jax.sample`, `leffa_jax.viz`, `pipeline.generate`).
"""

import hashlib
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
from conftest import shared_dir

from leffa_jax import convert
from leffa_jax.model import LeffaModel, random_official_checkpoint, tiny_config_dir
from leffa_jax.weights import base_configs, plans
from leffa_jax.weights import folder as weights_folder
from leffa_jax.weights.leaf_rules import flax_to_torch_leaf
from leffa_jax.weights.modules import expected_params
from leffa_jax.weights.tensor_io import (
    CheckpointError,
    CheckpointNotFoundError,
    TensorSource,
    write_safetensors,
)


def snapshot(path) -> dict[str, str]:
    """{relative path: sha1} of every file under `path` (or of the file itself)."""
    path = pathlib.Path(path)
    if path.is_file():
        return {".": hashlib.sha1(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file()
            else "dir" for p in sorted(path.rglob("*"))}


def run_convert(capsys, *argv) -> tuple[int, str]:
    """`python -m leffa_jax.convert ARGV` in-process -> (exit status, stdout + stderr)."""
    try:
        code = convert.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors and --help
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def no_leftovers(folder) -> bool:
    """No temporary `.X.partial-*` / `.X.old-*` siblings were left in `folder`."""
    return not [p for p in os.listdir(folder) if re.match(r"\..*\.(partial|old)-", p)]


# ============================================================================ convert / weights


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A random Leffa checkpoint in the official layout (tiny config) and its tensors."""
    path = tmp_path_factory.mktemp("official") / "leffa.safetensors"
    random_official_checkpoint(tiny_config_dir(), str(path))
    source = TensorSource(path)
    return path, {k: source[k] for k in source.keys()}


@pytest.fixture(scope="module")
def flax_checkpoint(official, tmp_path_factory):
    """The official file converted to a leffa_jax folder (read-only use)."""
    out = tmp_path_factory.mktemp("flax") / "ckpt"
    plans.official_to_flax(str(official[0]), "tiny", str(out))
    return out


def test_to_torch_refuses_output_inside_the_checkpoint(flax_checkpoint, capsys):
    before = snapshot(flax_checkpoint)
    for out in (flax_checkpoint / "params.safetensors", flax_checkpoint / "config" / "x.pth"):
        code, msg = run_convert(capsys, "to-torch", "--flax", flax_checkpoint, "--out", out)
        assert code == 2 and "is inside the source" in msg and "choose an output" in msg, msg
    assert snapshot(flax_checkpoint) == before


def test_to_torch_checks_the_output_folder_before_the_work(flax_checkpoint, tmp_path, capsys,
                                                           monkeypatch):
    def no_work(*_):
        raise AssertionError("the conversion started before the output was checked")

    monkeypatch.setattr(plans, "flax_to_torch_state", no_work)
    code, msg = run_convert(capsys, "to-torch", "--flax", flax_checkpoint,
                            "--out", tmp_path / "missing" / "x.pth")
    assert code == 2 and "does not exist" in msg and "mkdir -p" in msg, msg
    (tmp_path / "file").write_text("")
    code, msg = run_convert(capsys, "to-torch", "--flax", flax_checkpoint,
                            "--out", tmp_path / "file" / "x.pth")
    assert code == 2 and "is a file, not a folder" in msg, msg
    code, msg = run_convert(capsys, "to-torch", "--flax", flax_checkpoint, "--out", tmp_path)
    assert code == 2 and "output must end in" in msg, msg
    if os.geteuid() == 0:  # root writes into read-only folders: use one nobody can write to
        read_only = pathlib.Path("/proc")
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
    code, msg = run_convert(capsys, "to-torch", "--flax", flax_checkpoint,
                            "--out", read_only / "x.pth")
    assert code == 2 and "cannot write into" in msg, msg
    assert sorted(os.listdir(tmp_path)) == sorted(["file"] + (["ro"] if os.geteuid() else []))


@pytest.mark.parametrize("formats", ["", " , ", "safetensors,pickle"])
def test_to_flax_needs_a_known_format(official, tmp_path, capsys, formats):
    code, msg = run_convert(capsys, "to-flax", "--checkpoint", official[0], "--base-config",
                            "tiny", "--out", tmp_path / "out", "--formats", formats)
    assert code == 2 and ("no output format" in msg or "unknown output formats" in msg), msg
    assert "safetensors" in msg and not (tmp_path / "out").exists()


def test_to_flax_into_an_existing_folder(official, flax_checkpoint, tmp_path, capsys):
    """Refused without --overwrite; with it the folder is replaced as a whole (the earlier
    orbax/ does not survive); a folder that is not a checkpoint is never replaced."""
    out = tmp_path / "ckpt"
    shutil.copytree(flax_checkpoint, out)
    (out / "orbax").mkdir()  # an earlier model's Orbax copy
    (out / "orbax" / "tree").write_text("earlier model")
    before = snapshot(out)
    args = ("to-flax", "--checkpoint", official[0], "--base-config", "tiny", "--out", out)
    code, msg = run_convert(capsys, *args)
    assert code == 2 and "not empty" in msg and "--overwrite" in msg, msg
    assert snapshot(out) == before
    code, msg = run_convert(capsys, *args, "--overwrite")
    assert code == 0, msg
    assert sorted(os.listdir(out)) == ["config", "leffa_jax.json", "params.safetensors"]
    assert no_leftovers(tmp_path)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    code, msg = run_convert(capsys, "to-flax", "--checkpoint", official[0], "--base-config",
                            "tiny", "--out", other, "--overwrite")
    assert code == 2 and "not a checkpoint" in msg, msg
    assert snapshot(other) == {"todo.txt": hashlib.sha1(b"mine").hexdigest()}


def test_to_flax_failure_midway_leaves_the_folder_as_it_was(official, flax_checkpoint, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "ckpt"
    shutil.copytree(flax_checkpoint, out)
    before = snapshot(out)

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights_folder, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        plans.official_to_flax(str(official[0]), "tiny", str(out), overwrite=True)
    assert snapshot(out) == before and no_leftovers(tmp_path)
    with pytest.raises(OSError, match="No space"):
        plans.official_to_flax(str(official[0]), "tiny", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists() and no_leftovers(tmp_path)


def test_to_flax_refuses_an_output_holding_its_source(official, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(official[0].parent, src)
    (src / weights_folder.META_FILE).write_text("{}")  # looks like a checkpoint folder
    before = snapshot(src)
    with pytest.raises(CheckpointError, match="contains the source"):
        plans.official_to_flax(str(src / official[0].name), "tiny", str(src), overwrite=True)
    assert snapshot(src) == before


def _rewrite(official, path, change):
    tensors = dict(official[1])
    change(tensors)
    write_safetensors(str(path), tensors.items())
    return path


def test_extra_key_is_named_as_in_the_file(official, tmp_path):
    def add(tensors):
        tensors["unet.extra_thing.weight"] = np.ones(3, np.float32)

    bad = _rewrite(official, tmp_path / "extra.safetensors", add)
    files = [bad]
    try:
        import torch
    except ImportError:  # the .pth half needs the torch extra
        torch = None
    if torch is not None:
        source = TensorSource(bad)
        torch.save({k: torch.from_numpy(source[k]) for k in source.keys()}, tmp_path / "extra.pth")
        files.append(tmp_path / "extra.pth")
    for path in files:
        with pytest.raises(CheckpointError) as e:
            plans.official_to_flax(str(path), "tiny", str(tmp_path / "out"))
        msg = str(e.value)
        assert "1 unexpected" in msg and "unet.extra_thing.weight" in msg, msg
        assert "extra_thing.scale" not in msg and "missing" not in msg
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,channels,want", [("unet", 13, 12), ("unet_encoder", 5, 4)])
def test_wrong_unet_input_channels_are_refused_at_conversion(official, tmp_path, capsys, name,
                                                             channels, want):
    def widen(tensors):
        weight = tensors[f"{name}.conv_in.weight"]  # (C, in, 3, 3)
        tensors[f"{name}.conv_in.weight"] = np.zeros(
            (weight.shape[0], channels, *weight.shape[2:]), weight.dtype)

    bad = _rewrite(official, tmp_path / "wide.safetensors", widen)
    code, msg = run_convert(capsys, "to-flax", "--checkpoint", bad, "--base-config", "tiny",
                            "--out", tmp_path / "out")
    assert code == 2 and f"in_channels={channels}" in msg and f"in_channels={want}" in msg, msg
    assert ("densepose" if name == "unet" else "reference") in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=f"in_channels={want}"):
        LeffaModel.from_pretrained(bad, "tiny")


def test_from_pretrained_missing_path(tmp_path):
    for base in (None, "tiny"):
        with pytest.raises(CheckpointNotFoundError, match="does not exist") as e:
            LeffaModel.from_pretrained(tmp_path / "nope.pth", base)
        assert "official checkpoint file" not in str(e.value)
        assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError, match="base config .*nowhere.* does not exist.*"
                                                      "sd15-inpainting"):
        LeffaModel.from_pretrained(pathlib.Path(__file__), tmp_path / "nowhere")


def test_from_pretrained_training_workdir_points_at_export(flax_checkpoint, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="training workdir without an exported model yet"):
        LeffaModel.from_pretrained(workdir)
    shutil.copytree(flax_checkpoint, workdir / "export")
    with pytest.raises(CheckpointError, match=f"training workdir.*give its exported model "
                                              f"{re.escape(str(workdir / 'export'))}"):
        LeffaModel.from_pretrained(workdir)


def test_corrupt_checkpoint_json_names_the_file(flax_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(flax_checkpoint, ckpt)
    meta = ckpt / weights_folder.META_FILE
    for text, problem in (('{"format": "leffa_jax", ', "not valid JSON"),
                          ("\xff\xfe", "not valid JSON"),
                          ('{"format": "leffa_jax", "components": [1]}', "components")):
        meta.write_text(text, encoding="latin-1")
        with pytest.raises(CheckpointError, match=re.escape(str(meta)) + ".*" + problem):
            LeffaModel.from_pretrained(ckpt)


def test_base_configs_ship_with_the_package_and_resolve_by_name(tmp_path):
    from leffa_jax.nn.config import UNetConfig, VAEConfig
    from leffa_jax.schedulers import uses_zero_terminal_snr

    upstream = {"sd15-inpainting": "stable-diffusion-inpainting",
                "sdxl-inpainting": "stable-diffusion-xl-1.0-inpainting-0.1"}
    for name, folder in upstream.items():
        path = pathlib.Path(base_configs.resolve_base_config(name))
        assert path.is_relative_to(base_configs.ASSETS_DIR) and path.name == folder
        assert base_configs.resolve_base_config(folder) == str(path)
        reference = shared_dir() / "configs" / folder
        if reference.is_dir():  # byte-identical to the shared copies of the upstream configs
            assert snapshot(path) == snapshot(reference)
        UNetConfig.from_json(path / "unet"), VAEConfig.from_json(path / "vae")
        assert uses_zero_terminal_snr(path) is (name == "sdxl-inpainting")  # the official rule
    assets = pathlib.Path(base_configs.ASSETS_DIR)
    assert sum(f.stat().st_size for f in assets.rglob("*.json")) < 20_000  # configs only
    # weights: only the demos' tiny baselines (float16), kept small
    weights = {f.relative_to(assets).as_posix(): f.stat().st_size
               for f in assets.rglob("*") if f.is_file() and f.suffix != ".json"}
    assert sorted(weights) == ["tiny_magic_clothing/denoiser.safetensors",
                               "tiny_magic_clothing/garment_extractor.safetensors",
                               "tiny_tryon_baseline/params.safetensors"]
    assert max(weights.values()) < 4_000_000 and sum(weights.values()) < 10_000_000
    assert base_configs.resolve_base_config(tmp_path) == str(tmp_path)  # a folder wins
    with pytest.raises(CheckpointNotFoundError, match="'sd21'.*sd15-inpainting, sdxl-inpainting"):
        base_configs.resolve_base_config("sd21")


def test_diffusers_conversion_is_a_start_of_training(tmp_path, capsys):
    """README: `convert to-flax --diffusers` output is the start of training: it loads as the
    Leffa initialisation (training `init=leffa:DIR`, sampling) with the closed-form conv_in."""
    import ml_collections

    from leffa_jax.systems.leffa import init_model

    folder, rng = tmp_path / "sd", np.random.default_rng(0)
    torch_unet = {}
    for kind, channels in (("unet", 9), ("vae", None)):
        shutil.copytree(pathlib.Path(tiny_config_dir()) / kind, folder / kind)
        items = []
        for path, (shape, _) in expected_params(kind, tiny_config_dir(), channels).items():
            key, tensor = flax_to_torch_leaf(path, rng.standard_normal(shape).astype(np.float32))
            items.append((key, np.ascontiguousarray(tensor)))
        write_safetensors(str(folder / kind / "diffusion_pytorch_model.safetensors"), items)
        torch_unet = dict(items) if kind == "unet" else torch_unet
    shutil.copytree(pathlib.Path(tiny_config_dir()) / "scheduler", folder / "scheduler")
    code, msg = run_convert(capsys, "to-flax", "--diffusers", folder, "--out", tmp_path / "flax")
    assert code == 0, msg

    config = ml_collections.ConfigDict({"model": {"init": f"leffa:{tmp_path / 'flax'}",
                                                  "base": "tiny"}, "train": {"seed": 0}})
    model = init_model(config)
    conv_in = torch_unet["conv_in.weight"].transpose(2, 3, 1, 0)  # (3, 3, 9, C)
    generative = np.asarray(model.unet.conv_in.kernel[...])
    assert generative.shape[2] == 12 and not generative[:, :, 9:].any()
    np.testing.assert_array_equal(generative[:, :, :9], conv_in)
    np.testing.assert_array_equal(np.asarray(model.unet_encoder.conv_in.kernel[...]),
                                  conv_in[:, :, :4])
    np.testing.assert_array_equal(np.asarray(model.unet_encoder.conv_out.kernel[...]),
                                  torch_unet["conv_out.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("command", [[], ["to-flax"], ["to-torch"], ["verify"]])
def test_convert_help_documents_every_flag_and_its_default(capsys, command):
    code, text = run_convert(capsys, *command, "--help")
    assert code == 0
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]
    assert options or not command
    for option in options:
        if option.startswith("-h,"):
            continue
        flat = " ".join(option.split())
        assert re.search(r"\((default: [^)]*|required|no default)\)$", flat), flat
        assert len(flat.split()) > 4, f"no help text: {flat}"


def test_sample_cli_accepts_a_bundled_base_config_name(official):
    from argparse import Namespace

    from leffa_jax.sample import load_model

    model = load_model(Namespace(checkpoint=str(official[0]), base_config="tiny"))
    assert model.config_dir == base_configs.resolve_base_config("tiny")


# ============================================================================ sample / viz
# `python -m leffa_jax.sample`, `python -m leffa_jax.viz`, `pipeline.generate` (issue 16 items
# 1-5, 10-12, 15, 20, 21). Runs that sample share one compiled program: 32x24, 1 step, batch 1.

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

from PIL import Image  # noqa: E402

from leffa_jax import cli, sample, sample_inputs, viz  # noqa: E402
from leffa_jax import pipeline as pl  # noqa: E402
from leffa_jax.data import masks  # noqa: E402

H, W = 32, 24


def run_cli(module, capsys, *argv) -> tuple[int, str]:
    """`python -m leffa_jax.{sample,viz} ARGV` in-process -> (exit status, stdout + stderr)."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    """Small input files: person/densepose/mask 40x28, garment 30x30, odd-aspect 40x40 ones."""
    d = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    files = {}
    for name, shape in {"person": (40, 28, 3), "garment": (30, 30, 3), "densepose": (40, 28, 3),
                        "square_densepose": (40, 40, 3)}.items():
        files[name] = d / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(files[name])
    for name, shape in {"mask": (40, 28), "square_mask": (40, 40), "half_mask": (20, 14)}.items():
        m = np.zeros(shape, np.uint8)
        m[shape[0] // 4:-shape[0] // 4, 2:-2] = 255
        files[name] = d / f"{name}.png"
        Image.fromarray(m).save(files[name])
    return d, files


def sample_args(checkpoint, out, files, *extra, base_config="tiny", size=True):
    args = ["--checkpoint", checkpoint, "--out", out, "--steps", "1", "--no-progress"]
    args += ["--base-config", base_config] if base_config else []
    args += ["--height", H, "--width", W] if size else []
    for name in ("person", "garment", "densepose", "mask"):
        if name in files:
            args += [f"--{name}", files[name]]
    return args + list(extra)


def single(files):
    return {k: files[k] for k in ("person", "garment", "densepose", "mask")}


def refuses(capsys, module, argv, *needles, out=None) -> str:
    """The command exits 2 with every needle in its message and no traceback; `out` (a path)
    is left as it was."""
    before = snapshot(out) if out is not None and os.path.exists(out) else None
    code, text = run_cli(module, capsys, *argv)
    assert code == 2 and "Traceback" not in text, text
    for needle in needles:
        assert re.search(needle, text), (needle, text)
    if out is not None:
        assert (snapshot(out) if os.path.exists(out) else None) == before
    return text


# ---------------------------------------------------------------- 1: parse maps


def body_labels() -> np.ndarray:
    """A standing person in ATR labels, 512x384: hair, head, neck, upper clothes, arms, pants,
    legs, shoes."""
    p = np.zeros((512, 384), np.uint8)
    p[20:50, 150:234] = masks.HAIR
    p[50:110, 160:224] = masks.HEAD
    p[110:130, 175:209] = masks.NECK
    p[130:280, 120:264] = masks.UPPER
    p[140:300, 90:120] = masks.LEFT_ARM
    p[140:300, 264:294] = masks.RIGHT_ARM
    p[280:330, 130:254] = masks.PANTS
    p[330:470, 135:190] = masks.LEFT_LEG
    p[330:470, 194:249] = masks.RIGHT_LEG
    p[470:500, 130:190] = masks.LEFT_SHOE
    p[470:500, 194:254] = masks.RIGHT_SHOE
    return p


def save_palette_png(path, labels):
    """A palette PNG as VITON-HD's image-parse-v3: indices = labels, colours = LIP's palette."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    lip = [0, 0, 0, 128, 0, 0, 254, 0, 0, 0, 85, 0, 169, 0, 51, 254, 85, 0, 0, 0, 85, 0, 119, 221,
           85, 85, 0, 0, 85, 85, 85, 51, 0, 52, 86, 128, 0, 128, 0, 0, 0, 254, 51, 169, 220, 0,
           254, 254, 85, 254, 169, 169, 254, 85, 254, 254, 0, 254, 169, 0]
    im.putpalette(lip + [0] * (768 - len(lip)))
    im.save(path)


def keypoints_file(path):
    kp = np.zeros((18, 3))
    kp[:, 2] = 1
    kp[1], kp[2], kp[5] = (192, 120, 1), (130, 140, 1), (254, 140, 1)
    kp[3], kp[4], kp[6], kp[7] = (105, 220, 1), (105, 290, 1), (279, 220, 1), (279, 290, 1)
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": kp.ravel().tolist()}]}))
    return kp[:, :2]


def test_parse_palette_png_keeps_its_labels_and_the_schema_is_detected(tmp_path, capsys):
    """Item 1: a VITON-HD palette parse map (LIP) gives the mask of its labels, not of its
    colours' luminance; the default schema follows the data; a wrong explicit one is named."""
    atr = body_labels()
    lip = masks.atr_to_lip(atr)
    save_palette_png(tmp_path / "parse_lip.png", lip)
    kp = keypoints_file(tmp_path / "kp.json")
    want = masks.agnostic_mask(masks.lip_to_atr(lip), kp, "upper_body", "hd").astype(np.float32)
    pair = sample_inputs.Pair("person.png", "g", "d", parse=str(tmp_path / "parse_lip.png"),
                              keypoints=str(tmp_path / "kp.json"))
    got = sample_inputs.agnostic_mask_for(pair, (512, 384), 512, 384, "upper_body", "hd", "auto")
    np.testing.assert_array_equal(got, want)
    with pytest.raises(cli.UsageError, match="parse map .* another aspect ratio"):
        sample_inputs.agnostic_mask_for(pair, (512, 512), 512, 384, "upper_body", "hd", "auto")
    luminance = np.asarray(Image.open(tmp_path / "parse_lip.png").convert("L"))
    assert not np.array_equal(luminance, lip)  # what convert("L") read before
    assert sample.build_parser().get_default("parse_schema") == "auto"
    # the data pipeline decodes with the same function
    from leffa_jax.data import transforms

    data = (tmp_path / "parse_lip.png").read_bytes()
    np.testing.assert_array_equal(transforms.decode_image(data, "x.png", "P"), lip)
    # detection both ways, also without the LIP-only label 19 (an upper-body crop)
    upper = lip[:330].copy()
    assert sample_inputs.detect_parse_schema(upper)[0] == "lip"
    assert sample_inputs.detect_parse_schema(atr)[0] == "atr"
    assert sample_inputs.detect_parse_schema(atr[:330])[0] == "atr"
    save_palette_png(tmp_path / "upper_lip.png", upper)
    save_palette_png(tmp_path / "parse_atr.png", atr)
    with pytest.raises(ValueError, match=r"looks like a LIP label map, not ATR.*label 13"):
        sample_inputs.read_parse(str(tmp_path / "upper_lip.png"), "atr")
    with pytest.raises(ValueError, match=r"looks like a ATR label map, not LIP"):
        sample_inputs.read_parse(str(tmp_path / "parse_atr.png"), "lip")
    Image.open(tmp_path / "parse_lip.png").convert("RGB").save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="not parsing labels"):
        sample_inputs.read_parse(str(tmp_path / "colour.png"), "auto")


# ---------------------------------------------------------------- 2: non-finite values


@pytest.fixture(scope="module")
def tiny_model(official):
    return LeffaModel.from_pretrained(str(official[0]), "tiny")


@pytest.mark.parametrize("flag,value", [("--guidance", "nan"), ("--guidance", "inf"),
                                        ("--guidance-rescale", "-inf")])
def test_non_finite_settings_are_refused(official, pics, tmp_path, capsys, flag, value):
    _, files = pics
    argv = sample_args(official[0], tmp_path / "out", single(files), f"{flag}={value}")
    refuses(capsys, sample, argv, f"{flag} must be a finite number")
    assert not (tmp_path / "out").exists()


def test_non_finite_inputs_are_named(tiny_model):
    rng = np.random.default_rng(0)
    person, garment, densepose = rng.uniform(-1, 1, (3, 1, H, W, 3)).astype(np.float32)
    mask = np.ones((1, H, W, 1), np.float32)
    for name in ("person", "garment", "densepose"):
        inputs = {"person": person, "garment": garment, "mask": mask, "densepose": densepose}
        inputs[name] = inputs[name].copy()
        inputs[name][0, 3, 4, 1] = np.nan
        with pytest.raises(ValueError, match=rf"{name} holds 1 non-finite .* \(0, 3, 4, 1\)"):
            pl.generate(tiny_model, **inputs, steps=1)
    for kw in ({"guidance": float("nan")}, {"guidance_rescale": float("inf")}):
        with pytest.raises(ValueError, match="must be a finite number"):
            pl.generate(tiny_model, person, garment, mask, densepose, steps=1, **kw)


def test_non_finite_weights_fail_naming_the_parameter(tiny_model, pics, tmp_path, capsys):
    """NaN weights: exit 2 naming the tensor, no (black) PNG written."""
    import jax.numpy as jnp

    bias = tiny_model.unet.conv_out.bias
    saved = bias.value
    bias.value = jnp.full_like(saved, jnp.nan)
    try:
        tiny_model.save_pretrained(str(tmp_path / "nan_ckpt"))
    finally:
        bias.value = saved
    out = tmp_path / "out"
    refuses(capsys, sample, sample_args(tmp_path / "nan_ckpt", out, single(pics[1]),
                                        base_config=None),
            r"non-finite values.*unet\.conv_out\.bias", "damaged")
    assert not out.exists() or not list(out.iterdir())


# ---------------------------------------------------------------- 3: frames


@pytest.mark.parametrize("name", ["mask", "densepose"])
def test_mask_or_densepose_of_another_aspect_ratio(official, pics, tmp_path, capsys, name):
    _, files = pics
    chosen = dict(single(files), **{name: files[f"square_{name}"]})
    refuses(capsys, sample, sample_args(official[0], tmp_path / "o", chosen),
            "another aspect ratio", "--stretch-to-person", "40x40")
    args = argparse.Namespace(height=H, width=W, task="tryon", binarize_mask=False,
                              stretch_to_person=True)
    pair = sample_inputs.Pair(chosen["person"], chosen["garment"], chosen["densepose"],
                              chosen["mask"])
    loaded = sample_inputs.load_pair(pair, args)
    assert loaded["mask"].shape == (H, W) and loaded["densepose"].shape == (H, W, 3)
    # the same aspect ratio at another size is fine
    args.stretch_to_person = False
    pair.mask = str(files["half_mask"])
    pair.densepose = str(files["densepose"])
    assert sample_inputs.load_pair(pair, args)["mask"].shape == (H, W)


# ---------------------------------------------------------------- 4, 10: runs that sample


def test_pairs_sharing_stems_get_unique_names(flax_checkpoint, pics, tmp_path, capsys):
    d, files = pics
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for name in ("person", "garment", "densepose", "mask"):
            shutil.copy(files[name], tmp_path / sub / f"{name}.png")
    (tmp_path / "pairs.txt").write_text(
        "a/person.png a/garment.png a/densepose.png a/mask.png\n"
        "b/person.png b/garment.png b/densepose.png b/mask.png\n")
    code, text = run_cli(sample, capsys, "--checkpoint", flax_checkpoint, "--pairs",
                         tmp_path / "pairs.txt", "--out", tmp_path / "out", "--steps", 1,
                         "--height", H, "--width", W, "--no-progress")
    assert code == 0, text
    assert sorted(os.listdir(tmp_path / "out")) == ["person__garment-2.png",
                                                     "person__garment.png"]
    assert "wrote 2 image(s)" in text


def test_resolution_defaults_to_the_checkpoints(flax_checkpoint, pics, tmp_path, capsys):
    """Item 10: a checkpoint recording `"resolution": [H, W]` samples at it by default."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(flax_checkpoint, ckpt)
    meta = json.loads((ckpt / "leffa_jax.json").read_text())
    (ckpt / "leffa_jax.json").write_text(json.dumps(dict(meta, resolution=[H, W])))
    code, text = run_cli(sample, capsys, *sample_args(ckpt, tmp_path / "out", single(pics[1]),
                                                      base_config=None, size=False))
    assert code == 0, text
    assert Image.open(tmp_path / "out" / "person__garment.png").size == (W, H)
    (ckpt / "leffa_jax.json").write_text(json.dumps(dict(meta, resolution="big")))
    refuses(capsys, sample, sample_args(ckpt, tmp_path / "o2", single(pics[1]), base_config=None,
                                        size=False), r"leffa_jax.json: 'resolution' must be")


def test_a_request_too_big_for_the_device_is_refused_before_compiling(official, pics, tiny_model,
                                                                     tmp_path, capsys):
    started = time.perf_counter()
    refuses(capsys, sample, sample_args(official[0], tmp_path / "out", single(pics[1]),
                                        size=False),
            r"at 1024x768 needs at least [\d.]+ TB \(attention scores", "free",
            "lower --height/--width")
    assert time.perf_counter() - started < 60  # no compilation of the 1024x768 program
    assert not (tmp_path / "out").exists()
    big = np.zeros((1, 1024, 768, 3), np.float32)
    with pytest.raises(ValueError, match="needs at least"):
        pl.generate(tiny_model, big, big, big[..., :1], big, steps=1)


def test_garment_of_another_size_is_resized_like_the_official_demo(tiny_model):
    """Item 5: a garment of another size is resized and centred onto the person's size."""
    import cv2

    rng = np.random.default_rng(1)
    person, densepose = rng.uniform(-1, 1, (2, 1, H, W, 3)).astype(np.float32)
    garment = rng.uniform(-1, 1, (1, 30, 30, 3)).astype(np.float32)
    mask = np.ones((1, H, W, 1), np.float32)
    # official resize_and_center (leffa_utils.utils) on the float image, white padding
    scale = min(H / 30, W / 30)
    size = int(30 * scale), int(30 * scale)
    ref = np.ones((1, H, W, 3), np.float32)
    top, left = (H - size[0]) // 2, (W - size[1]) // 2
    ref[0, top:top + size[0], left:left + size[1]] = cv2.resize(
        garment[0], size[::-1], interpolation=cv2.INTER_CUBIC)
    a = pl.generate(tiny_model, person, garment, mask, densepose, steps=1, seed=3)
    b = pl.generate(tiny_model, person, np.clip(ref, -1, 1), mask, densepose, steps=1, seed=3)
    np.testing.assert_array_equal(a.images, b.images)


# ---------------------------------------------------------------- 11, 12: outputs and numbers


def test_out_that_is_a_file_or_unwritable_fails_first(official, pics, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.setattr(sample, "load_model", lambda args: pytest.fail("model loaded"))
    files = single(pics[1])
    target = tmp_path / "results.png"
    target.write_bytes(b"keep me")
    refuses(capsys, sample, sample_args(official[0], target, files), "is a file", out=target)
    refuses(capsys, sample, sample_args(official[0], target / "sub", files),
            "cannot be created", out=target)
    (tmp_path / "ro").mkdir()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", read_only)
    refuses(capsys, sample, sample_args(official[0], tmp_path / "ro" / "new", files),
            "cannot write in .*ro", "Permission denied")
    assert os.listdir(tmp_path / "ro") == []


@pytest.mark.parametrize("flag,value", [("--height", 0), ("--height", -32), ("--width", 20)])
def test_bad_sizes(official, pics, tmp_path, capsys, flag, value):
    argv = sample_args(official[0], tmp_path / "o", single(pics[1]), size=False)
    refuses(capsys, sample, argv + [flag, value], f"{flag} must be a positive multiple of 8")


def huge_png(path, width=14000, height=14000):
    """A valid PNG header announcing width x height (195 megapixels) over a tiny file."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = zlib.compress(b"\0" * (width + 1))  # one row; the header check comes first
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_clear_error(official, pics, tmp_path, capsys):
    huge_png(tmp_path / "huge.png")
    files = dict(single(pics[1]), person=tmp_path / "huge.png")
    refuses(capsys, sample, sample_args(official[0], tmp_path / "o", files),
            "huge.png is too large to read", "downscale it first")


@pytest.mark.parametrize("extra,needle", [
    (["--layers", "99"], r"--layers '99': the model has \d+ transformer layers"),
    (["--layers", "a,b"], "comma list of integers"),
    (["--points", "0.5"], "'0.5' is not x,y"),
    (["--points", "0.5,0.2;1.5,0.2"], r"outside \[0, 1\]"),
    (["--t", "5000"], r"--t must be < 1000"),
    (["--t", "-1"], "--t must be >= 0"),
    (["--height", "0"], "--height must be positive"),
    (["--tau", "nan"], "--tau must be a finite"),
    (["--missing"], "image file not found"),
])
def test_viz_bad_arguments(official, pics, tmp_path, capsys, extra, needle):
    files = single(pics[1])
    if extra == ["--missing"]:
        files, extra = dict(files, garment=tmp_path / "nope.png"), []
    argv = ["--checkpoint", official[0], "--base-config", "tiny", "--out", tmp_path / "v"]
    argv += [a for k, v in files.items() for a in (f"--{k}", v)] + extra
    refuses(capsys, viz, argv, needle)
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------- 15: pairs files


def test_pairs_file_messages_and_quoted_paths(official, pics, tmp_path, capsys):
    d, files = pics
    (tmp_path / "my pics").mkdir()
    for name in ("person", "garment", "densepose", "mask"):
        shutil.copy(files[name], tmp_path / "my pics" / f"{name} 'x',1.png")
    q = lambda name: f"\"my pics/{name} 'x',1.png\""
    (tmp_path / "quoted.txt").write_text(
        f"{q('person')}, {q('garment')}, {q('densepose')}, {q('mask')}  # spaces, quotes, commas\n")
    pairs = sample_inputs.read_pairs(str(tmp_path / "quoted.txt"))
    assert pairs[0].mask == str(tmp_path / "my pics" / "mask 'x',1.png")
    args = argparse.Namespace(height=H, width=W, task="tryon", binarize_mask=False)
    assert sample_inputs.load_pair(pairs[0], args)["mask"].shape == (H, W)
    # no mask column: the message points at the file's line, not at --mask
    (tmp_path / "pairs.txt").write_text(f"{files['person']} {files['garment']} "
                                        f"{files['densepose']}\n")
    base = ["--checkpoint", official[0], "--base-config", "tiny", "--out", tmp_path / "o",
            "--pairs", tmp_path / "pairs.txt"]
    text = refuses(capsys, sample, base, r"pairs.txt:1: try-on needs a mask: add it as the 4th")
    assert "give --mask" not in text
    refuses(capsys, sample, base + ["--mask", files["mask"]], "--mask would be ignored")
    (tmp_path / "bad.txt").write_text('"unterminated a b\n')
    refuses(capsys, sample, base[:-1] + [tmp_path / "bad.txt"], r"bad.txt:1: No closing quot")


# ---------------------------------------------------------------- 20, 21: help and progress


@pytest.mark.parametrize("module", [sample, viz])
def test_help_documents_every_flag_and_its_default(capsys, module):
    code, text = run_cli(module, capsys, "--help")
    assert code == 0
    description, options = text.split("options:", 1)
    for option in re.split(r"\n  (?=-)", options)[1:]:
        if option.startswith("-h,"):
            continue
        flat = " ".join(option.split())
        assert re.search(r"\((default: [^)]*|required|no default|off)\)$", flat), flat
        assert len(flat.split()) > 4, f"no help text: {flat}"
    if module is sample:
        flat = " ".join(text.split())
        assert "see module docstring" not in flat and "person garment densepose [mask]" in flat
    else:
        assert "plus `overview.png`" in description  # the whole description, not its first line


def test_progress_bar_is_quiet_in_logs():
    """Item 21: a non-terminal stream gets a line per minute at most, not one per update."""
    log = io.StringIO()
    bar = cli.progress_bar(3000, "3 image(s)", file=log)
    for _ in range(3000):
        bar.update(1)
    bar.close()
    lines = [x for x in re.split(r"[\r\n]+", log.getvalue()) if x.strip()]
    assert 1 <= len(lines) <= 3 and "3000/3000" in lines[-1], lines
    disabled = io.StringIO()
    cli.progress_bar(10, "x", enabled=False, file=disabled).close()
    assert disabled.getvalue() == ""


# ============================================================================ train
# `python -m leffa_jax.train` (issue 16 items 9, 10, 13, 19, 20), in-process through
# `train.main`. Nothing here compiles a training step: the bad starts stop before, the
# non-finite case fakes the loop, and the export runs `train.steps=0` on purpose.

import ml_collections  # noqa: E402

from leffa_jax import train as train_cli  # noqa: E402
from leffa_jax.training import loop as train_loop  # noqa: E402

TINY_TRAIN = ("--config", "synthetic_tiny", "--config.data.synthetic.num_train=8",
              "--config.train.batch_size=8", "--config.log.progress_bar=False",
              f"--config.data.height={H}", f"--config.data.width={W}",
              f"--config.data.synthetic.height={H}", f"--config.data.synthetic.width={W}")


def run_train(capsys, *argv) -> tuple[int, str]:
    """`python -m leffa_jax.train ARGV` in-process -> (exit status, stdout + stderr)."""
    code = train_cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def one_line_error(code: int, text: str, *needles: str, status: int = 2) -> None:
    assert code == status and "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leffa_jax.train: error: "), text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture
def earlier_workdir(tmp_path):
    """The workdir of an earlier run: a failed start must leave it exactly as it was."""
    work = tmp_path / "work"
    (work / "checkpoints" / "2").mkdir(parents=True)
    (work / "config.json").write_text('{"train": {"steps": 2}}')
    (work / "checkpoints" / "2" / "state").write_bytes(b"earlier state")
    return work


@pytest.mark.parametrize("argv,needles", [
    (["--config", "leffa_jax/configs/synthetic_tny.py"],                      # item 9
     ["synthetic_tny.py: no such file", "synthetic_tiny"]),
    ([*TINY_TRAIN, "--config.train.bacth_size=4"],                            # item 13
     ["--config.train.bacth_size", "did you mean --config.train.batch_size?"]),
    ([*TINY_TRAIN, "--config.data.name=viton_hd", "--config.data.root=/no/such/viton"],
     ["data.root /no/such/viton does not exist", "--config.data.root"]),
    ([*TINY_TRAIN, "--config.train.steps=0"], ["untrained", "--config.train.steps",
                                               "--config.train.export_at_step_0=True"]),
    ([*TINY_TRAIN, "--config.train.steps=abc"], ["--config.train.steps=abc"]),
    ([*TINY_TRAIN, "--config.train.lr=nan"], ["train.lr must be a finite number"]),
    ([*TINY_TRAIN, "--config.model.init=leffa:/no/such/export"], ["/no/such/export not found"]),
    ([*TINY_TRAIN, "stray"], ["unexpected argument(s) stray"]),
    (["--config", "leffa_jax/configs/magic_clothing_tiny.py:big"],         # a config variant
     ["magic_clothing_tiny.py:big: the variants are", "'scratch'"]),
])
def test_train_bad_start_is_one_line_and_writes_nothing(earlier_workdir, tmp_path, capsys, argv,
                                                        needles):
    """Items 9, 13: exit 2 with one line naming the problem and the fix; an existing workdir
    (config.json included) is unchanged and a new one is not created."""
    before = snapshot(earlier_workdir)
    one_line_error(*run_train(capsys, *argv, "--workdir", earlier_workdir), *needles)
    assert snapshot(earlier_workdir) == before
    one_line_error(*run_train(capsys, *argv, "--workdir", tmp_path / "new"), *needles)
    assert not (tmp_path / "new").exists()


def test_train_config_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """Item 9: config.json goes through a temporary file and a rename; a failure while making
    or writing it keeps the earlier file and leaves no temporary file."""

    class Unserialisable:
        def to_json_best_effort(self, **kwargs):
            raise TypeError("cannot serialise")

    (tmp_path / "config.json").write_text("earlier")
    with pytest.raises(TypeError):
        train_loop.write_config(Unserialisable(), str(tmp_path))

    def failed_rename(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_loop.os, "replace", failed_rename)
    with pytest.raises(OSError):
        train_loop.write_config(ml_collections.ConfigDict({"a": 1}), str(tmp_path))
    assert os.listdir(tmp_path) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == "earlier"
    monkeypatch.undo()
    train_loop.write_config(ml_collections.ConfigDict({"a": 1}), str(tmp_path))
    assert os.listdir(tmp_path) == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


def test_train_non_finite_loss_is_one_line_with_its_own_status(tmp_path, capsys, monkeypatch):
    """Item 13: the loop's non-finite error (step, sample indices) is one line, exit status 3."""

    def diverging(task, config, workdir, **kwargs):
        metrics = {"finite": False, "step": 4, "loss": float("nan"), "grad_norm": float("inf")}
        train_loop.check_metrics(metrics, np.arange(8, 16))

    monkeypatch.setattr(train_loop, "train", diverging)
    code, text = run_train(capsys, *TINY_TRAIN, "--workdir", tmp_path / "work")
    one_line_error(code, text, "non-finite loss or gradient at step 5", "indices [8, 9",
                   status=train_cli.EXIT_NON_FINITE)
    assert train_cli.EXIT_NON_FINITE == 3 and "3 a step's loss" in train_cli.help_text()


def test_train_export_records_its_resolution_and_sampling_defaults_to_it(pics, tmp_path, capsys):
    """Items 10, 13: `train.steps=0` with the intent flag exports the initial model (the same
    export as at the end of training) with `"resolution": [H, W]` of the config; the sample CLI
    without --height/--width then samples at that size."""
    work = tmp_path / "work"
    code, text = run_train(capsys, *TINY_TRAIN, "--config.train.steps=0",
                           "--config.train.export_at_step_0=True", "--workdir", work)
    assert code == 0, text
    meta = json.loads((work / "export" / "leffa_jax.json").read_text())
    assert meta["resolution"] == [H, W]
    assert sample.recorded_resolution(str(work / "export")) == (H, W)
    code, text = run_cli(sample, capsys, *sample_args(work / "export", tmp_path / "out",
                                                      single(pics[1]), base_config=None,
                                                      size=False))
    assert code == 0, text
    assert Image.open(tmp_path / "out" / "person__garment.png").size == (W, H)


def test_train_help_documents_every_flag_and_its_default(capsys):
    """Item 20: --help exits 0 and gives each flag a line of help with its default."""
    code, text = run_train(capsys, "--help")
    assert code == 0
    entries = dict(re.findall(r"^  (--\S+)[^\n]*\n((?:      .*\n?)+)",
                              text.split("\nflags:\n", 1)[1], flags=re.M))
    assert set(entries) == {"--config", "--workdir", "--config.KEY=VALUE", "--flagfile",
                            "--help"}, text
    for flag, default in (("--config", "(required)"), ("--workdir", "(required)"),
                          ("--config.KEY=VALUE", "(default: the config file's values)"),
                          ("--flagfile", "(default: none)")):
        entry = " ".join(entries[flag].split())
        assert entry.endswith(default) and len(entry.split()) > 4, (flag, entry)
    assert "synthetic_tiny" in entries["--config"] and "Exit status: 0" in text


def test_tpu_doc_overrides_name_config_fields():
    """Item 19: every `--config.KEY` in docs/tpu.md, prose included, is a field of the configs
    (it said `--config.batch_size`; the field is `train.batch_size`)."""
    from leffa_jax.configs import get_config

    config = get_config("tryon_512")
    text = (pathlib.Path(__file__).parents[1] / "docs" / "tpu.md").read_text()
    keys = set(re.findall(r"--config\.([a-z_][\w.]*[a-z_0-9])", text)) - {"key", "a.b"}
    assert "train.batch_size" in keys
    for key in keys:
        node = config
        for part in key.split("."):
            assert part in node, f"docs/tpu.md: --config.{key} is not a config field"
            node = node[part]
