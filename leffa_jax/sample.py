"""Command line sampling: `python -m leffa_jax.sample`.

    # virtual try-on, official checkpoint + base config
    python -m leffa_jax.sample --task tryon \\
        --checkpoint ckpts/virtual_tryon.pth --base-config configs/stable-diffusion-inpainting \\
        --person person.jpg --garment shirt.jpg --mask mask.png --densepose densepose.png \\
        --out results/ --grid
    # the mask from a parse map + OpenPose keypoints instead of --mask
        ... --parse parse.png --keypoints pose.json --garment-type upper_body
    # pose transfer (mask = everything), a leffa_jax checkpoint folder, many pairs in batches
    python -m leffa_jax.sample --task pose --checkpoint ckpts/pose_transfer_flax \\
        --pairs pairs.txt --batch-size 4 --out results/

Every image is resized and centred on white padding as the official demo does (masks and
densepose with nearest neighbours, padded with 0). `--pairs FILE`: one pair per line,
whitespace- or comma-separated columns `person garment densepose [mask]` (paths relative to the
file; `#` starts a comment; try-on lines need the mask column). Batches are padded to
--batch-size so that one compiled program serves them all. Outputs `<person>__<garment>.png` and, with --grid,
`<person>__<garment>_grid.png` (person | garment | mask | result).
Errors (missing or non-image files, masks that are not black/white, unknown garment types,
checkpoints that do not fit the config) exit with status 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leffa_jax import imageio

GARMENT_TYPES = ("upper_body", "lower_body", "dresses")


class UsageError(ValueError):
    """A problem with the command line or its files (reported without a traceback)."""


@dataclass
class Pair:
    person: str
    garment: str
    densepose: str
    mask: str | None = None
    parse: str | None = None
    keypoints: str | None = None

    @property
    def name(self) -> str:
        stem = lambda p: os.path.splitext(os.path.basename(p))[0]
        return f"{stem(self.person)}__{stem(self.garment)}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m leffa_jax.sample",
        description="Leffa virtual try-on / pose transfer sampling.",
    )
    ap.add_argument("--task", choices=("tryon", "pose"), default="tryon")
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="official .pth/.safetensors (with --base-config) or a leffa_jax folder",
    )
    ap.add_argument(
        "--base-config",
        help="base model config folder (unet/ vae/ scheduler/), "
        "e.g. configs/stable-diffusion-inpainting; needed for official checkpoints",
    )
    ap.add_argument("--person", help="person image (try-on) / source person (pose)")
    ap.add_argument("--garment", help="garment image (try-on) / reference person (pose)")
    ap.add_argument("--mask", help="black/white mask, white = region to generate (try-on)")
    ap.add_argument("--densepose", help="densepose image of the person (target pose for pose)")
    ap.add_argument("--parse", help="human-parsing label map (instead of --mask, with --keypoints)")
    ap.add_argument("--parse-schema", choices=("atr", "lip"), default="atr")
    ap.add_argument("--keypoints", help="OpenPose json of the person (pixels of --person)")
    ap.add_argument(
        "--garment-type",
        choices=GARMENT_TYPES,
        default="upper_body",
        help="garment category for the agnostic mask (with --parse/--keypoints)",
    )
    ap.add_argument(
        "--mask-variant",
        choices=("hd", "dc"),
        default="hd",
        help="agnostic-mask variant: VITON-HD ('hd') or DressCode ('dc') model",
    )
    ap.add_argument(
        "--binarize-mask",
        action="store_true",
        help="threshold a grey mask at 128 instead of rejecting it",
    )
    ap.add_argument("--pairs", help="file with one pair per line (see module docstring)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=2.5)
    ap.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="phi of rescale_noise_cfg (default: = --guidance, as official; 0 = off)",
    )
    ap.add_argument("--scheduler", choices=("ddpm", "ddim", "dpmpp_2m"), default="ddpm")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--ref-acceleration", action="store_true")
    ap.add_argument("--repaint", action="store_true")
    ap.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="UNet compute dtype (auto: bfloat16 on accelerators, float32 on CPU)",
    )
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--grid", action="store_true", help="also write person|garment|mask|result")
    ap.add_argument("--no-progress", action="store_true")
    return ap


# ----------------------------------------------------------------------------- inputs


def read_pairs(path: str) -> list[Pair]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            cols = [c for c in line.replace(",", " ").split() if c]
            if len(cols) not in (3, 4):
                raise UsageError(
                    f"{path}:{n}: expected 'person garment densepose [mask]', got "
                    f"{len(cols)} columns"
                )
            cols = [c if os.path.isabs(c) else os.path.join(root, c) for c in cols]
            pairs.append(Pair(cols[0], cols[1], cols[2], cols[3] if len(cols) == 4 else None))
    if not pairs:
        raise UsageError(f"{path}: no pairs")
    return pairs


def _keypoints_json(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"keypoints file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
        kp = (
            data["people"][0]["pose_keypoints_2d"]
            if "people" in data
            else data["pose_keypoints_2d"]
        )
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: not an OpenPose json with one person ({e!r})") from None
    return np.asarray(kp, np.float64).reshape(-1, 3)[:, :2]


def agnostic_mask_for(
    pair: Pair,
    person_hw: tuple[int, int],
    height: int,
    width: int,
    garment_type: str,
    variant: str,
    schema: str,
) -> np.ndarray:
    """Build the official garment-agnostic mask in the target frame, (height, width) {0, 1}."""
    import cv2

    from leffa_jax.data import masks

    parse = imageio.load_image(pair.parse, "L")
    if schema == "lip":
        parse = masks.lip_to_atr(parse)
    parse_t = imageio.resize_and_center(
        cv2.resize(parse, person_hw[::-1], interpolation=cv2.INTER_NEAREST),
        height,
        width,
        fill=0,
        interpolation="nearest",
    )
    f = imageio.fit(*person_hw, height, width)
    kp = _keypoints_json(pair.keypoints)
    missing = (kp[:, 0] <= 1) & (kp[:, 1] <= 1)
    kp = kp * f.scale + [f.left, f.top]
    kp *= [masks.MASK_SIZE[0] / width, masks.MASK_SIZE[1] / height]
    kp[missing] = 0
    m = masks.agnostic_mask(parse_t, kp, garment_type, variant)
    m = cv2.resize((m * 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return (m >= 128).astype(np.float32)


def load_pair(pair: Pair, args) -> dict[str, np.ndarray]:
    """-> uint8 person/garment/densepose (H, W, 3) and float mask (H, W) in {0, 1}."""
    h, w = args.height, args.width
    person_raw = imageio.load_image(pair.person)
    person = imageio.resize_and_center(person_raw, h, w)
    garment = imageio.resize_and_center(imageio.load_image(pair.garment), h, w)
    densepose = imageio.resize_and_center(
        imageio.load_image(pair.densepose), h, w, fill=0, interpolation="nearest"
    )
    if args.task == "pose":
        mask = np.ones((h, w), np.float32)
    elif pair.mask is not None:
        raw = imageio.load_image(pair.mask, "L")
        mask = imageio.mask_to_binary(raw, pair.mask, args.binarize_mask)
        mask = (
            imageio.resize_and_center(
                (mask * 255).astype(np.uint8), h, w, fill=0, interpolation="nearest"
            )
            / 255.0
        )
    elif pair.parse is not None and pair.keypoints is not None:
        mask = agnostic_mask_for(
            pair,
            person_raw.shape[:2],
            h,
            w,
            args.garment_type,
            args.mask_variant,
            args.parse_schema,
        )
    else:
        raise UsageError(
            f"{pair.name}: try-on needs a mask: give --mask, or --parse with "
            "--keypoints (and --garment-type)"
        )
    return {
        "person": person,
        "garment": garment,
        "densepose": densepose,
        "mask": mask.astype(np.float32),
    }


def load_model(args):
    from leffa_jax.model import LeffaModel

    ckpt = args.checkpoint
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    if os.path.isdir(ckpt):
        return LeffaModel.from_pretrained(ckpt)
    if not args.base_config:
        raise UsageError(
            f"{ckpt} is an official checkpoint file: pass --base-config (the "
            "stable-diffusion-inpainting config folder for try-on, "
            "stable-diffusion-xl-1.0-inpainting-0.1 for pose transfer)"
        )
    if not os.path.isdir(os.path.join(args.base_config, "unet")):
        raise FileNotFoundError(f"--base-config {args.base_config}: no unet/config.json there")
    return LeffaModel.from_pretrained(ckpt, args.base_config)


# ----------------------------------------------------------------------------- running


def _dtype(name: str) -> str:
    if name != "auto":
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def run(args) -> list[str]:
    from tqdm import tqdm

    from leffa_jax import pipeline as pl

    if args.batch_size < 1 or args.steps < 1:
        raise UsageError("--batch-size and --steps must be >= 1")
    if args.height % 8 or args.width % 8:
        raise UsageError(f"--height/--width must be multiples of 8, got {args.height}x{args.width}")
    if args.pairs:
        pairs = read_pairs(args.pairs)
    else:
        missing = [f"--{n}" for n in ("person", "garment", "densepose") if not getattr(args, n)]
        if missing:
            raise UsageError(f"missing {', '.join(missing)} (or give --pairs FILE)")
        pairs = [
            Pair(args.person, args.garment, args.densepose, args.mask, args.parse, args.keypoints)
        ]
    # read every input first: bad files fail before the (slow) model load
    loaded = [load_pair(p, args) for p in pairs]
    model = load_model(args)
    dtype = _dtype(args.dtype)
    bs = args.batch_size
    written = []
    bar = tqdm(
        total=-(-len(pairs) // bs) * args.steps,  # denoising steps over all batches
        unit="step",
        disable=args.no_progress,
        desc=f"{len(pairs)} image(s)",
    )
    for start in range(0, len(pairs), bs):
        chunk = loaded[start : start + bs]
        # pad the last batch by repeating, so one compiled program serves every batch
        padded = chunk + [chunk[-1]] * (bs - len(chunk))
        arr = lambda k, pad=padded: np.stack(
            [imageio.to_model(c[k]) if k != "mask" else c[k] for c in pad]
        )
        done = [0]

        def tick(i, done=done):
            if i + 1 > done[0]:
                bar.update(i + 1 - done[0])
                done[0] = i + 1

        out = pl.generate(
            model,
            arr("person"),
            arr("garment"),
            arr("mask")[..., None],
            arr("densepose"),
            steps=args.steps,
            guidance=args.guidance,
            guidance_rescale=args.guidance_rescale,
            ref_acceleration=args.ref_acceleration,
            repaint=args.repaint,
            seed=args.seed + start,
            dtype=dtype,
            scheduler=args.scheduler,
            progress=tick,
        )
        bar.update(args.steps - done[0])
        for j, (pair, c) in enumerate(zip(pairs[start : start + bs], chunk, strict=True)):
            path = os.path.join(args.out, pair.name + ".png")
            imageio.save_png(path, out.images[j])
            written.append(path)
            if args.grid:
                row = imageio.grid_row(
                    c["person"], c["garment"], (c["mask"] * 255).astype(np.uint8), out.images[j]
                )
                imageio.save_png(os.path.join(args.out, pair.name + "_grid.png"), row)
    bar.close()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from leffa_jax.convert import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        written = run(args)
    except (UsageError, FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"leffa_jax.sample: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} image(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
