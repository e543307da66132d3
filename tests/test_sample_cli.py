"""`python -m leffa_jax.sample` end to end on the embedded tiny model, plus its error messages,
and the resize-and-centre helper against a transcription of the official demo's."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from leffa_jax import imageio
from leffa_jax.model import random_official_checkpoint, tiny_config_dir
from leffa_jax.sample import main

H, W = 32, 24  # tiny VAE downsamples by 2 -> 16x12 latents


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    ckpt = random_official_checkpoint(tiny_config_dir(), str(d / "tiny.safetensors"))
    paths = {}
    for name, (h, w) in {"person": (40, 28), "garment": (30, 30), "densepose": (40, 28)}.items():
        paths[name] = d / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[name])
    m = np.zeros((40, 28), np.uint8)
    m[10:30, 5:20] = 255
    paths["mask"] = d / "mask.png"
    Image.fromarray(m).save(paths["mask"])
    paths["grey_mask"] = d / "grey.png"
    Image.fromarray(np.full((40, 28), 128, np.uint8)).save(paths["grey_mask"])
    paths["not_image"] = d / "notes.png"
    paths["not_image"].write_text("not an image")
    return d, ckpt, paths


def base_args(ckpt, out, **extra):
    args = [
        "--checkpoint",
        ckpt,
        "--base-config",
        tiny_config_dir(),
        "--height",
        str(H),
        "--width",
        str(W),
        "--steps",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def test_single_pair_with_grid(files, tmp_path):
    d, ckpt, p = files
    rc = main(
        base_args(
            ckpt,
            tmp_path,
            person=p["person"],
            garment=p["garment"],
            mask=p["mask"],
            densepose=p["densepose"],
            grid=True,
        )
    )
    assert rc == 0
    res = np.asarray(Image.open(tmp_path / "person__garment.png"))
    assert res.shape == (H, W, 3) and res.dtype == np.uint8
    grid = np.asarray(Image.open(tmp_path / "person__garment_grid.png"))
    assert grid.shape == (H, 4 * W, 3)
    np.testing.assert_array_equal(grid[:, 3 * W :], res)
    # columns: the person and garment as resized-and-centred, the mask
    person = official_resize_and_center(np.asarray(Image.open(p["person"])), W, H)
    np.testing.assert_array_equal(grid[:, :W], person)
    assert set(np.unique(grid[:, 2 * W : 3 * W]).tolist()) <= {0, 255}


def test_pairs_in_batches(files, tmp_path):
    d, ckpt, p = files
    lines = [
        f"{p['person']} {p['garment']} {p['densepose']} {p['mask']}",
        "# a comment",
        f"{p['garment']},{p['person']},{p['densepose']},{p['mask']}",
        f"{p['densepose']} {p['garment']} {p['densepose']} {p['mask']}",
    ]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    # line 3's person is the square garment photo: its mask and densepose are stretched onto it
    rc = main(base_args(ckpt, tmp_path / "out", pairs=pairs, batch_size=2, repaint=True,
                        stretch_to_person=True))
    assert rc == 0
    names = sorted(x.name for x in (tmp_path / "out").iterdir())
    assert names == ["densepose__garment.png", "garment__person.png", "person__garment.png"]


def test_pose_task_needs_no_mask(files, tmp_path):
    d, ckpt, p = files
    rc = main(
        base_args(
            ckpt,
            tmp_path,
            task="pose",
            person=p["person"],
            garment=p["garment"],
            densepose=p["densepose"],
        )
    )
    assert rc == 0 and (tmp_path / "person__garment.png").exists()


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing_file", "image file not found"),
        ("not_image", "not a readable image file"),
        ("grey_mask", "mask must be black/white"),
        ("no_mask", "try-on needs a mask"),
        ("no_base_config", "pass --base-config"),
        ("wrong_config", "fixtures"),
        ("missing_checkpoint", "checkpoint not found"),
    ],
)
def test_errors(files, tmp_path, capsys, case, needle):
    d, ckpt, p = files
    kw = dict(person=p["person"], garment=p["garment"], mask=p["mask"], densepose=p["densepose"])
    args = None
    if case == "missing_file":
        kw["garment"] = d / "nope.png"
    elif case == "not_image":
        kw["densepose"] = p["not_image"]
    elif case == "grey_mask":
        kw["mask"] = p["grey_mask"]
    elif case == "no_mask":
        del kw["mask"]
    elif case == "missing_checkpoint":
        ckpt = str(d / "absent.pth")
    args = base_args(ckpt, tmp_path, **kw)
    if case == "no_base_config":
        i = args.index("--base-config")
        del args[i : i + 2]
    elif case == "wrong_config":
        from conftest import shared_path

        cfg = shared_path(
            "fixtures",
            "leffa_official",
            "sdxl_tiny",
            "config",
            "stable-diffusion-xl-1.0-inpainting-0.1-tiny",
        )
        args[args.index("--base-config") + 1] = str(cfg)
        needle = "does not fit|missing|unexpected|shape"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "leffa_jax.sample: error:" in err
    import re

    assert re.search(needle, err), err


def test_unknown_garment_type(files, tmp_path, capsys):
    d, ckpt, p = files
    with pytest.raises(SystemExit) as e:
        main(
            base_args(
                ckpt,
                tmp_path,
                person=p["person"],
                garment=p["garment"],
                densepose=p["densepose"],
                garment_type="hat",
            )
        )
    assert e.value.code == 2
    assert "invalid choice: 'hat'" in capsys.readouterr().err


def test_agnostic_mask_from_parse_and_keypoints(files, tmp_path):
    """--parse/--keypoints/--garment-type build the official agnostic mask (in the target frame)."""
    from leffa_jax.data import masks
    from leffa_jax.sample import Pair, agnostic_mask_for

    # person photo already 384x512-shaped (3:4), so the target frame is a pure rescale
    parse = np.zeros((512, 384), np.uint8)
    parse[150:350, 110:270] = masks.UPPER
    parse[60:150, 150:230] = masks.HEAD
    parse[350:500, 120:260] = masks.PANTS
    Image.fromarray(parse).save(tmp_path / "parse.png")
    kp = np.zeros((18, 2))
    kp[1], kp[2], kp[5] = (190, 150), (130, 160), (250, 160)
    kp[3], kp[4], kp[6], kp[7] = (120, 240), (115, 320), (260, 240), (265, 320)
    kp[8], kp[11] = (150, 350), (230, 350)
    json.dump(
        {"people": [{"pose_keypoints_2d": np.c_[kp, np.ones(18)].ravel().tolist()}]},
        open(tmp_path / "kp.json", "w"),
    )
    pair = Pair(
        "p", "g", "d", parse=str(tmp_path / "parse.png"), keypoints=str(tmp_path / "kp.json")
    )
    got = agnostic_mask_for(pair, (512, 384), 512, 384, "upper_body", "hd", "atr")
    want = masks.agnostic_mask(parse, kp, "upper_body", "hd").astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert got[250, 190] == 1 and got[100, 190] == 0


def official_resize_and_center(image, target_width, target_height):
    """Transcription of the official leffa_utils.utils.resize_and_center (cv2, white pad)."""
    import cv2

    img = np.array(image)
    original_height, original_width = img.shape[:2]
    scale = min(target_height / original_height, target_width / original_width)
    new_height = int(original_height * scale)
    new_width = int(original_width * scale)
    resized_img = cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_CUBIC)
    padded_img = np.ones((target_height, target_width, 3), dtype=np.uint8) * 255
    top = (target_height - new_height) // 2
    left = (target_width - new_width) // 2
    padded_img[top : top + new_height, left : left + new_width] = resized_img
    return padded_img


@pytest.mark.parametrize("src", [(1024, 768), (700, 900), (333, 250), (40, 28)])
def test_resize_and_center_matches_official(src):
    img = np.random.default_rng(0).integers(0, 256, src + (3,), dtype=np.uint8)
    for h, w in ((1024, 768), (32, 24)):
        np.testing.assert_array_equal(
            imageio.resize_and_center(img, h, w), official_resize_and_center(img, w, h)
        )


def test_module_entry_point_help():
    r = subprocess.run(
        [sys.executable, "-m", "leffa_jax.sample", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "--garment-type" in r.stdout and "--pairs" in r.stdout


def test_prompt_loop_writes_every_image_and_a_row_per_prompt(tmp_path):
    """`cli.sample_prompts`, the loop of the text2image/characters commands: names, grid layout
    and progress counted once per step even when the callback repeats or overshoots."""
    import argparse
    import io

    from leffa_jax import cli

    args = argparse.Namespace(prompt=["A red cat!", ""], steps=3, no_progress=False,
                              out=str(tmp_path))
    seen = []

    def sample(index, prompt, progress):
        for i in (0, 0, 1, 5):  # a repeat and an overshoot
            progress(i)
        seen.append((index, prompt))
        return [np.full((4, 6, 3), 40 * index + j, np.uint8) for j in range(2)]

    written = cli.sample_prompts(args, sample)
    names = [p.rsplit("/", 1)[1] for p in written]
    assert names == ["000_a_red_cat.png", "001_a_red_cat.png", "002_empty.png",
                     "003_empty.png", "grid.png"]
    assert seen == [(0, "A red cat!"), (1, "")]
    assert np.asarray(Image.open(written[3]))[0, 0, 0] == 41
    grid = np.asarray(Image.open(written[-1]))
    assert grid.shape == (2 * (4 + 2) + 2, 2 * (6 + 2) + 2, 3)  # two rows of two, 2-px pad
    assert grid[2 + 6, 2 + 8 + 1, 0] == 41  # row 2, tile 2
    bar = cli.progress_bar(3, "t", file=io.StringIO())
    tick = cli.step_ticker(bar, 3)
    for i in (0, 0, 2, 7, 1):
        tick(i)
    assert bar.n == 3
