"""Command line sampling: `python -m leffa_jax.sample`.

    # virtual try-on, official checkpoint + bundled base config
    python -m leffa_jax.sample --task tryon \\
        --checkpoint ckpts/virtual_tryon.pth --base-config sd15-inpainting \\
        --person person.jpg --garment shirt.jpg --mask mask.png --densepose densepose.png \\
        --out results/ --grid
    # the mask from a parse map + OpenPose keypoints instead of --mask
        ... --parse parse.png --keypoints pose.json --garment-type upper_body
    # pose transfer (mask = everything), a leffa_jax checkpoint folder, many pairs in batches
    python -m leffa_jax.sample --task pose --checkpoint ckpts/pose_transfer_flax \\
        --pairs pairs.txt --batch-size 4 --out results/

Every image is resized and centred on white padding as the official demo does (masks and
densepose with nearest neighbours, padded with 0); masks, densepose and parse maps must show the
person photo's frame (same aspect ratio) unless --stretch-to-person. The resolution defaults to
the one a leffa_jax checkpoint records (`resolution` in leffa_jax.json), else 1024x768; a request
that cannot fit the device's memory is refused before compiling. Outputs
`<person>__<garment>.png` (a repeated name gets `-2`, `-3`, ...) and, with --grid,
`<name>_grid.png` (person | garment | mask | result). Errors exit with status 2 and one message.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from leffa_jax import cli, imageio
from leffa_jax.cli import UsageError, run_reporting_errors
from leffa_jax.sample_inputs import (  # noqa: F401  (re-exported: the CLI's input API)
    Pair,
    agnostic_mask_for,
    load_pair,
    output_names,
    read_pairs,
)

TASKS = ("tryon", "pose")
# Tasks with their own command line, each a module with `main(argv) -> int` whose parser also
# takes --task: python -m leffa_jax.sample --task garment2image --help.
TASK_MODULES = {
    "text2image": "leffa_jax.sample_text2image",        # SD1.5 / SDXL from a prompt
    "garment2image": "leffa_jax.sample_garment2image",  # Magic Clothing
    "subject2image": "leffa_jax.sample_subject2image",  # Face-diffuser
    "characters": "leffa_jax.sample_characters",        # StoryMaker
}
GARMENT_TYPES = ("upper_body", "lower_body", "dresses")
DEFAULT_RESOLUTION = (1024, 768)  # the official demo's (height, width)

PAIRS_HELP = (
    "file with one pair per line instead of --person/--garment/--densepose/--mask: columns "
    "'person garment densepose [mask]' separated by spaces, tabs or commas; paths relative to "
    "the file; quote paths holding spaces, commas or quotes as in a shell (\"my photo.jpg\"); "
    "'#' starts a comment; try-on lines need the mask column")


def build_parser() -> argparse.ArgumentParser:
    from leffa_jax.sampling.steppers import STEPPERS

    ap = argparse.ArgumentParser(prog="python -m leffa_jax.sample", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    arg = ap.add_argument
    arg("--task", choices=TASKS + tuple(TASK_MODULES), default="tryon",
        help="tryon: garment onto the person inside the mask; pose: the reference person "
             "(--garment) in the pose of --densepose, mask = everything; text2image (SD1.5/SDXL "
             "from a prompt), garment2image (Magic Clothing), subject2image (Face-diffuser), "
             "characters (StoryMaker): their own flags (--task NAME --help)")
    arg("--checkpoint", required=True,
        help="official .pth/.safetensors (with --base-config) or a leffa_jax checkpoint folder")
    arg("--base-config", help="base model config folder (unet/ vae/ scheduler/) or a bundled "
                              "name: sd15-inpainting (try-on), sdxl-inpainting (pose); needed "
                              "for official checkpoints")
    arg("--person", help="person image (try-on) / source person (pose)")
    arg("--garment", help="garment image (try-on) / reference person (pose); any size")
    arg("--mask", help="black/white mask in the person's frame, white = region to generate")
    arg("--densepose", help="densepose image in the person's frame (target pose for pose)")
    arg("--parse", help="human-parsing label map (palette PNG kept as indices), instead of "
                        "--mask, with --keypoints")
    arg("--parse-schema", choices=("auto", "lip", "atr"), default="auto",
        help="labels of --parse: lip (VITON-HD image-parse-v3), atr (Leffa's human parser); "
             "auto detects them (LIP when undecidable); a contradicting choice is an error")
    arg("--keypoints", help="OpenPose json of the person (pixels of --person)")
    arg("--garment-type", choices=GARMENT_TYPES, default="upper_body",
        help="garment category for the agnostic mask (with --parse/--keypoints)")
    arg("--mask-variant", choices=("hd", "dc"), default="hd",
        help="agnostic-mask variant: VITON-HD ('hd') or DressCode ('dc') model")
    arg("--binarize-mask", action="store_true",
        help="threshold a grey mask at 128 instead of rejecting it")
    arg("--stretch-to-person", action="store_true",
        help="stretch a mask, densepose or parse map of another aspect ratio onto the person "
             "photo instead of rejecting it")
    arg("--pairs", help=PAIRS_HELP)
    arg("--batch-size", type=int, default=1,
        help="pairs per compiled call (the last batch is padded)")
    arg("--steps", type=int, default=30, help="denoising steps")
    arg("--guidance", type=float, default=2.5, help="classifier-free guidance scale")
    arg("--guidance-rescale", type=float, default=None,
        help="phi of rescale_noise_cfg; unset = --guidance, as the official code; 0 = off")
    arg("--scheduler", choices=tuple(STEPPERS), default="ddpm",
        help="sampler (ddpm: the official one)")
    arg("--seed", type=int, default=42, help="random seed; batch k uses seed + k * batch size")
    arg("--height", type=int, default=None,
        help="output height, a multiple of 8; unset: the checkpoint's recorded resolution, "
             f"else {DEFAULT_RESOLUTION[0]}")
    arg("--width", type=int, default=None,
        help="output width, a multiple of 8; unset: the checkpoint's recorded resolution, "
             f"else {DEFAULT_RESOLUTION[1]}")
    arg("--ref-acceleration", action="store_true",
        help="run the reference UNet once, at the middle step")
    arg("--repaint", action="store_true",
        help="paste the result into the person through the blurred mask (official repaint)")
    arg("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
        help="UNet compute dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    arg("--attention-kernel", choices=("xla", "dot_product", "cudnn", "chunked"),
        default="xla",
        help="attention implementation; cudnn (NVIDIA GPUs, bf16/fp16) never materialises the "
             "attention scores, so large images need far less memory; chunked (any device) "
             "holds them one block of 512 queries at a time")
    arg("--out", required=True, help="output folder (created; checked writable first)")
    arg("--grid", action="store_true", help="also write person|garment|mask|result")
    arg("--no-progress", action="store_true", help="no progress bar")
    return ap


# ----------------------------------------------------------------------------- set-up


def recorded_resolution(checkpoint: str) -> tuple[int, int] | None:
    """(height, width) a leffa_jax checkpoint folder records (`"resolution": [H, W]` in
    leffa_jax.json, the size it was trained at), or None."""
    from leffa_jax.weights import folder

    if not os.path.isdir(checkpoint) or not os.path.isfile(
            os.path.join(checkpoint, folder.META_FILE)):
        return None
    value = folder.read_meta(checkpoint).get("resolution")
    if value is None:
        return None
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise UsageError(f"{os.path.join(checkpoint, folder.META_FILE)}: 'resolution' must be "
                         f"[height, width] in pixels, got {value!r}")
    return int(value[0]), int(value[1])


def check_args(args) -> None:
    """Numbers and file combinations, before anything is read."""
    if args.batch_size < 1 or args.steps < 1:
        raise UsageError("--batch-size and --steps must be >= 1")
    cli.positive_multiple("--height", args.height, 8)
    cli.positive_multiple("--width", args.width, 8)
    cli.finite("--guidance", args.guidance)
    cli.finite("--guidance-rescale", args.guidance_rescale)
    if args.pairs:
        given = [f"--{n}" for n in ("person", "garment", "densepose", "mask", "parse",
                                    "keypoints") if getattr(args, n)]
        if given:
            raise UsageError(f"--pairs takes every file from {args.pairs}; {', '.join(given)} "
                             "would be ignored: drop them (the mask is the file's 4th column)")
    cli.check_output_folder(args.out)


def collect_pairs(args) -> list[Pair]:
    if args.pairs:
        return read_pairs(args.pairs)
    missing = [f"--{n}" for n in ("person", "garment", "densepose") if not getattr(args, n)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (or give --pairs FILE)")
    return [Pair(args.person, args.garment, args.densepose, args.mask, args.parse, args.keypoints)]


def load_model(args):
    from leffa_jax.model import LeffaModel

    ckpt = args.checkpoint
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    if os.path.isdir(ckpt):
        return LeffaModel.from_pretrained(ckpt)
    if not args.base_config:
        raise UsageError(
            f"{ckpt} is an official checkpoint file: pass --base-config (a bundled name: "
            "sd15-inpainting for try-on, sdxl-inpainting for pose transfer, or a base config "
            "folder)")
    from leffa_jax.weights.base_configs import resolve_base_config

    base = resolve_base_config(args.base_config)
    if not os.path.isdir(os.path.join(base, "unet")):
        raise FileNotFoundError(f"--base-config {args.base_config}: no unet/config.json there")
    return LeffaModel.from_pretrained(ckpt, base)


def _dtype(name: str) -> str:
    if name != "auto":
        return name
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def check_fits(model, args, trained_at) -> None:
    """Refuse, before compiling, a request whose lower-bound memory exceeds the device's."""
    import jax
    import jax.numpy as jnp

    from leffa_jax import checks

    devices = len(jax.local_devices())
    per_device = args.batch_size // devices if devices > 1 and args.batch_size % devices == 0 \
        else args.batch_size
    where = (f"this checkpoint was trained at {trained_at[0]}x{trained_at[1]}" if trained_at
             else f"the official models sample at {DEFAULT_RESOLUTION[0]}x{DEFAULT_RESOLUTION[1]}")
    fix = f"lower --height/--width ({where})" + (" or --batch-size" if per_device > 1 else "")
    if jax.default_backend() == "gpu" and args.attention_kernel != "cudnn":
        fix += ", or use --attention-kernel cudnn with --dtype bfloat16"
    checks.check_memory(model, per_device, args.height, args.width,
                        jnp.dtype(_dtype(args.dtype)).itemsize, args.attention_kernel, fix=fix)


# ----------------------------------------------------------------------------- running


def _write(args, name: str, inputs: dict, image: np.ndarray) -> list[str]:
    path = os.path.join(args.out, name + ".png")
    imageio.save_png(path, image)
    if args.grid:
        mask = (inputs["mask"] * 255).astype(np.uint8)
        row = imageio.grid([[inputs["person"], inputs["garment"], mask, image]], pad=0)
        imageio.save_png(os.path.join(args.out, name + "_grid.png"), row)
    return [path]


def run(args) -> list[str]:
    """Sample every pair; -> the written result paths."""
    from leffa_jax import pipeline as pl

    check_args(args)
    pairs = collect_pairs(args)
    trained_at = recorded_resolution(args.checkpoint)
    default = trained_at or DEFAULT_RESOLUTION
    args.height = args.height or default[0]
    args.width = args.width or default[1]
    # read every input first: bad files fail before the (slow) model load
    loaded = [load_pair(p, args) for p in pairs]
    names = output_names(pairs)
    model = load_model(args)
    check_fits(model, args, trained_at)
    bs, written = args.batch_size, []
    bar = cli.progress_bar(-(-len(pairs) // bs) * args.steps, f"{len(pairs)} image(s)",
                           enabled=not args.no_progress)
    for start in range(0, len(pairs), bs):
        chunk = loaded[start:start + bs]
        padded = chunk + [chunk[-1]] * (bs - len(chunk))  # one compiled program for all batches
        arr = lambda k, pad=padded: np.stack(
            [imageio.to_model(c[k]) if k != "mask" else c[k] for c in pad])
        done = [0]

        def tick(i, done=done):
            if i + 1 > done[0]:
                bar.update(i + 1 - done[0])
                done[0] = i + 1

        out = pl.generate(model, arr("person"), arr("garment"), arr("mask")[..., None],
                          arr("densepose"), steps=args.steps, guidance=args.guidance,
                          guidance_rescale=args.guidance_rescale,
                          ref_acceleration=args.ref_acceleration, repaint=args.repaint,
                          seed=args.seed + start, dtype=_dtype(args.dtype),
                          scheduler=args.scheduler, attention_kernel=args.attention_kernel,
                          progress=tick)
        bar.update(args.steps - done[0])
        for j, inputs in enumerate(chunk):
            written += _write(args, names[start + j], inputs, out.images[j])
    bar.close()
    return written


def requested_task(argv: Sequence[str]) -> str | None:
    """The value of --task on a command line (None when absent)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    task = requested_task(argv)
    if task in TASK_MODULES:  # its own options, in its own module
        return importlib.import_module(TASK_MODULES[task]).main(argv)
    args = build_parser().parse_args(argv)
    return run_reporting_errors(run, args, lambda written: f"wrote {len(written)} image(s) to "
                                f"{args.out}")


if __name__ == "__main__":
    sys.exit(main())
