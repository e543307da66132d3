"""`python -m leffa_jax.sample --task subject2image`: Face-diffuser, people from reference photos
in a scene from text.

    python -m leffa_jax.sample --task subject2image --sdm SDM_flax --tdm TDM_flax \\
        --base models/stable-diffusion-v1-5 \\
        --prompt "a man <|image|> and a woman <|image|> at the beach" \\
        --subject man.jpg --subject woman.jpg --out results/ [--save-masks]

--sdm / --tdm: converted folders (`python -m leffa_jax.convert face-diffuser --checkpoint
SDM/pytorch_model.bin --base DIR --out SDM_flax`) or the released `pytorch_model.bin` files read
directly (then --clip may name the CLIP ViT-L/14 folder; its vision config is built in). --base:
the SD1.5 diffusers folder (its VAE decodes, its tokenizer and PNDM scheduler are used). Put
`<|image|>` right after each subject's noun; the k-th --subject is the k-th `<|image|>`.
Sampling: PNDM with --steps N runs N + 1 loop steps; steps 0..--merge-start use the TDM, up to
--merge-end both fused per pixel (SNF), the rest the SDM (official defaults 50 / 15 / 30 / 5).
Writes `<nnn>_<prompt>.png` per image, `grid.png` (subjects | images) and with --save-masks
`masks/step<i>.png` per stage-2 step (white = the SDM's prediction, black = the TDM's; one row
per image). Files are written to temporary names and renamed. Errors exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from leffa_jax import cli, imageio
from leffa_jax.cli import UsageError, run_reporting_errors

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from leffa_jax.sampling.steppers import STEPPERS

    parser.add_argument("--sdm", required=True,
                        help="subject-augmented model: converted folder or pytorch_model.bin")
    parser.add_argument("--tdm", required=True,
                        help="text-driven model: converted folder or pytorch_model.bin")
    parser.add_argument("--base", required=True,
                        help="Stable Diffusion 1.5 diffusers folder (vae/, tokenizer/, "
                             "scheduler/) or its leffa_jax conversion")
    parser.add_argument("--clip", default=None,
                        help="CLIP ViT-L/14 folder (config.json), only for an official SDM file; "
                             "unset: the built-in ViT-L/14 vision config")
    parser.add_argument("--prompt", required=True,
                        help="caption with <|image|> after each subject's noun")
    parser.add_argument("--subject", action="append", default=[],
                        help="reference photo of a subject; repeat, in <|image|> order")
    parser.add_argument("--steps", type=int, default=50, help="inference steps N")
    parser.add_argument("--merge-start", type=int, default=15,
                        help="last loop step of the TDM-only stage")
    parser.add_argument("--merge-end", type=int, default=30,
                        help="last loop step of the fused (SNF) stage")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (> 1)")
    parser.add_argument("--scheduler", choices=tuple(STEPPERS), default=None,
                        help="sampler; unset: the base folder's scheduler (PNDM for SD1.5)")
    parser.add_argument("--height", type=int, default=512, help="image height, multiple of 8")
    parser.add_argument("--width", type=int, default=512, help="image width, multiple of 8")
    parser.add_argument("--object-resolution", type=int, default=512,
                        help="subject photos are padded to square and resized to this first")
    parser.add_argument("--batch-size", type=int, default=1, help="images for the prompt")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="compute dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--save-masks", action="store_true",
                        help="also write the stage-2 fusion masks (masks/step<i>.png)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m leffa_jax.sample --task subject2image", description=__doc__,
        formatter_class=cli.HelpFormatter)
    parser.add_argument("--task", choices=("subject2image",), default="subject2image",
                        help="subject2image (other tasks: python -m leffa_jax.sample --help)")
    return add_arguments(parser)


def _check_args(args) -> None:
    from leffa_jax.systems.face_diffuser import IMAGE_TOKEN

    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch-size must be >= 1")
    if not 0 <= args.merge_start <= args.merge_end:
        raise UsageError(f"need 0 <= --merge-start <= --merge-end, got {args.merge_start}, "
                         f"{args.merge_end}")
    for name in ("height", "width"):
        cli.positive_multiple(f"--{name}", getattr(args, name), 8)
    if args.object_resolution < 1:
        raise UsageError("--object-resolution must be >= 1")
    cli.finite("--guidance", args.guidance)
    if args.guidance <= 1:
        raise UsageError(f"--guidance must be > 1 (SNF compares the guidance deltas), got "
                         f"{args.guidance:g}")
    markers = args.prompt.count(IMAGE_TOKEN)
    if markers == 0:
        raise UsageError(f"--prompt has no {IMAGE_TOKEN}: put one after each subject's noun, "
                         f"e.g. 'a man {IMAGE_TOKEN} and a woman {IMAGE_TOKEN} at the beach'")
    if len(args.subject) < markers:
        raise UsageError(f"--prompt has {markers} {IMAGE_TOKEN} markers but {len(args.subject)} "
                         "--subject image(s) were given: give one per marker, in order")
    for flag in ("sdm", "tdm", "base"):
        if not os.path.exists(getattr(args, flag)):
            raise UsageError(f"--{flag} {getattr(args, flag)} does not exist")
    for path in args.subject:
        if not os.path.isfile(path):
            raise UsageError(f"--subject {path} is not a file")
    cli.check_output_folder(args.out)


def _mask_picture(masks: np.ndarray) -> np.ndarray:
    """(n, h, w) bool -> one uint8 RGB picture, a row per image (white = SDM)."""
    tiles = [np.repeat((m.astype(np.uint8) * 255)[..., None], 3, -1) for m in masks]
    return imageio.grid([tiles])


def run(args) -> list[str]:
    from leffa_jax.systems import face_diffuser as fd

    _check_args(args)
    subjects = [imageio.load_image(path) for path in args.subject]
    pipe = fd.load_face_diffuser(args.sdm, args.tdm, args.base, args.clip)
    bar = cli.progress_bar(args.steps + 1, "subject2image", not args.no_progress)
    out = fd.generate(pipe, args.prompt, subjects, steps=args.steps, guidance=args.guidance,
                      merge_start=args.merge_start, merge_end=args.merge_end,
                      height=args.height, width=args.width, num_images=args.batch_size,
                      seed=args.seed, scheduler=args.scheduler,
                      object_resolution=args.object_resolution, return_masks=args.save_masks,
                      dtype=cli.compute_dtype(args.dtype),
                      progress=None if args.no_progress else (lambda i: bar.update(1)))
    bar.close()
    os.makedirs(args.out, exist_ok=True)
    written = []
    for j, image in enumerate(out.images):
        path = os.path.join(args.out, f"{j:03d}_{cli.slug(args.prompt.replace(fd.IMAGE_TOKEN, ''))}"
                                      ".png")
        imageio.save_png(path, image)
        written.append(path)
    size = out.images.shape[1]
    thumbs = [imageio.resize_nearest(fd.pad_to_square(s), size, size) for s in subjects]
    grid_path = os.path.join(args.out, "grid.png")
    imageio.save_png(grid_path, imageio.grid([thumbs + list(out.images)]))
    written.append(grid_path)
    if args.save_masks:
        os.makedirs(os.path.join(args.out, "masks"), exist_ok=True)
        for step, masks in sorted((out.masks or {}).items()):
            path = os.path.join(args.out, "masks", f"step{step:03d}.png")
            imageio.save_png(path, _mask_picture(masks))
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(run, args, lambda written: f"wrote {len(written)} file(s) to "
                                f"{args.out}")


if __name__ == "__main__":
    sys.exit(main())
