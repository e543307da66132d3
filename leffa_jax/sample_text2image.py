"""`python -m leffa_jax.sample --task text2image`: Stable Diffusion 1.5 / SDXL text-to-image.

    python -m leffa_jax.sample --task text2image --model models/stable-diffusion-v1-5 \\
        --prompt "a photo of a cat" --negative-prompt "blurry" --steps 30 --out results/
    # several prompts, 4 images each, SDXL at its own size, the UniPC sampler
    python -m leffa_jax.sample --task text2image --model models/sdxl-base-flax \\
        --prompt "a red dress" --prompt "a blue coat" --batch-size 4 --scheduler unipc --out out/

--model: a diffusers folder (unet/ vae/ text_encoder/ [text_encoder_2/] tokenizer/ [tokenizer_2/]
scheduler/) or its leffa_jax conversion (`python -m leffa_jax.convert to-flax --diffusers DIR`).
Writes `<nnn>_<prompt>.png` per image (--batch-size images per prompt, seeds --seed, --seed + 1,
... per prompt) and `grid.png` (one row per prompt). Errors (a bad folder, a missing tokenizer, a
size that is not a multiple of 8) exit with status 2 and a message naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from leffa_jax import cli
from leffa_jax.cli import UsageError, run_reporting_errors

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The text2image options (without --task)."""
    from leffa_jax.sampling.steppers import STEPPERS

    parser.add_argument("--model", required=True,
                        help="diffusers SD1.5 / SDXL folder or its leffa_jax conversion")
    parser.add_argument("--prompt", action="append", required=True,
                        help="the prompt; repeat the flag for several prompts")
    parser.add_argument("--negative-prompt", default=None,
                        help="negative prompt for every prompt; unset: the empty prompt (SDXL: "
                             "zero embeddings, as diffusers)")
    parser.add_argument("--prompt-2", default=None, help="SDXL: prompt of the second encoder")
    parser.add_argument("--negative-prompt-2", default=None,
                        help="SDXL: negative prompt of the second encoder")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale; unset: 7.5 (SD1.5), 5.0 (SDXL); "
                             "<= 1: off")
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="phi of rescale_noise_cfg (0 = off)")
    parser.add_argument("--scheduler", choices=tuple(STEPPERS), default=None,
                        help="sampler; unset: the model's scheduler when it is one of these, "
                             "else dpmpp_2m")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the first prompt (the next prompts: +1, +2, ...)")
    parser.add_argument("--height", type=int, default=None,
                        help="image height, a multiple of 8; unset: the model's size")
    parser.add_argument("--width", type=int, default=None,
                        help="image width, a multiple of 8; unset: the model's size")
    parser.add_argument("--batch-size", type=int, default=1, help="images per prompt")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="text encoders' and UNet's compute dtype (auto: bfloat16 on "
                             "accelerators, float32 on CPU)")
    parser.add_argument("--vae-dtype", choices=DTYPE_CHOICES[1:], default="float32",
                        help="the VAE decoder's dtype")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m leffa_jax.sample --task text2image", description=__doc__,
        formatter_class=cli.HelpFormatter)
    parser.add_argument("--task", choices=("text2image",), default="text2image",
                        help="text2image (tryon / pose: python -m leffa_jax.sample --help)")
    return add_arguments(parser)


def _check_args(args) -> None:
    """Problems found before the (slow) model load."""
    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch-size must be >= 1")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            lower, upper = max(8, value // 8 * 8), (value // 8 + 1) * 8
            raise UsageError(f"--{name} {value} is not a multiple of 8 (the VAE's downsampling "
                             f"factor): use --{name} {lower} or {upper}")
    cli.finite("--guidance", args.guidance)
    cli.finite("--guidance-rescale", args.guidance_rescale, 0.0)
    if not os.path.exists(args.model):
        raise UsageError(f"--model {args.model} does not exist: give a diffusers Stable "
                         "Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) or "
                         "its leffa_jax conversion")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model} is a file: give the model folder (a single "
                         "checkpoint file is not a text-to-image model)")
    cli.check_output_folder(args.out)


def run(args) -> list[str]:
    """Sample every prompt; -> the PNG paths written (images, then grid.png)."""
    from leffa_jax.systems import text2image as t2i

    _check_args(args)
    system = t2i.load_text2image(args.model)
    dtype = cli.compute_dtype(args.dtype)

    def sample(index, prompt, progress):
        return t2i.generate(
            system, prompt, negative_prompt=args.negative_prompt, prompt_2=args.prompt_2,
            negative_prompt_2=args.negative_prompt_2, steps=args.steps, guidance=args.guidance,
            guidance_rescale=args.guidance_rescale, height=args.height, width=args.width,
            num_images_per_prompt=args.batch_size, scheduler=args.scheduler,
            seed=args.seed + index, dtype=dtype, vae_dtype=args.vae_dtype,
            progress=progress).images

    return cli.sample_prompts(args, sample)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(run, args, lambda written: f"wrote {len(written) - 1} image(s) "
                                f"and grid.png to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
