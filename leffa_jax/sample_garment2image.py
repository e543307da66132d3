"""`python -m leffa_jax.sample --task garment2image`: Magic Clothing, a prompt-described person
wearing a given garment.

    python -m leffa_jax.sample --task garment2image --base models/Realistic_Vision_V4.0_noVAE \\
        --vae models/sd-vae-ft-mse \\
        --extractor ckpts/magic_clothing_768_vitonhd_joint.safetensors \\
        --garment shirt.png --prompt "a photography of a model" --height 768 --width 576 \\
        --out results/
    # the 512 weights (plain CFG, garment and text dropped together)
        ... --extractor ckpts/oms_diffusion_512_100000.safetensors --mode standard --guidance 2.5

--base: an SD1.5 diffusers folder (or its leffa_jax conversion); --vae: a separate VAE folder
(the official demo uses stabilityai/sd-vae-ft-mse); --extractor: the released garment-extractor
file (flat diffusers UNet state dict); --denoiser: optionally, a flat UNet file replacing the
base's denoiser weights. The garment mask: --garment-mask, else the garment's
alpha channel, else a plain-background threshold (see `magic_clothing.background_mask`).
Writes `garment2image_<nnn>.png` per image, `garment_mask.png` (the mask used) and, with
--grid, `grid.png`; each file is written to a temporary name and renamed. Errors exit with
status 2 and a message naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from leffa_jax import cli, imageio
from leffa_jax.cli import UsageError, run_reporting_errors

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    from leffa_jax.sampling.steppers import STEPPERS
    from leffa_jax.systems.magic_clothing import DEFAULT_A_PROMPT, DEFAULT_NEGATIVE, DEFAULT_PROMPT

    ap = argparse.ArgumentParser(prog="python -m leffa_jax.sample --task garment2image",
                                 description=__doc__, formatter_class=cli.HelpFormatter)
    arg = ap.add_argument
    arg("--task", choices=("garment2image",), default="garment2image",
        help="garment2image (other tasks: python -m leffa_jax.sample --help)")
    arg("--base", required=True, help="SD1.5 diffusers folder (or its leffa_jax conversion)")
    arg("--vae", default=None, help="separate diffusers VAE folder (e.g. sd-vae-ft-mse)")
    arg("--extractor", required=True, help="garment-extractor .safetensors (released layout)")
    arg("--denoiser", default=None,
        help="flat diffusers UNet .safetensors replacing the base UNet's weights (e.g. the tiny "
             "demo's leffa_jax/assets/tiny_magic_clothing/denoiser.safetensors)")
    arg("--garment", required=True, help="garment image (any size; stretched to the output)")
    arg("--garment-mask", default=None,
        help="garment mask (white = garment); unset: alpha channel, else background threshold")
    arg("--prompt", default=DEFAULT_PROMPT, help="the person / scene")
    arg("--a-prompt", default=DEFAULT_A_PROMPT,
        help="appended to the prompt after ', ' as officially ('' = nothing)")
    arg("--negative-prompt", default=DEFAULT_NEGATIVE, help="the text 'uncond'")
    arg("--mode", choices=("joint", "standard"), default="joint",
        help="joint: garment + text guidance (768 weights); standard: plain CFG (512 weights)")
    arg("--garment-scale", type=float, default=2.5, help="sG (joint mode)")
    arg("--guidance", type=float, default=7.5, help="sT; <= 1: no guidance at all")
    arg("--steps", type=int, default=20, help="sampling steps")
    arg("--scheduler", choices=tuple(STEPPERS), default="unipc",
        help="sampler (unipc: the official one, ending at sigma_min)")
    arg("--height", type=int, default=512, help="output height, a multiple of 8")
    arg("--width", type=int, default=384, help="output width, a multiple of 8")
    arg("--num-images", type=int, default=1, help="images of the prompt")
    arg("--seed", type=int, default=0, help="random seed")
    arg("--no-fp16-garment", action="store_true",
        help="keep the garment pixels float32 (the official code rounds them to float16)")
    arg("--dtype", choices=DTYPE_CHOICES, default="auto",
        help="UNets' and text encoder's compute dtype (auto: bfloat16 on accelerators, float32 "
             "on CPU)")
    arg("--vae-dtype", choices=DTYPE_CHOICES[1:], default="float32", help="the VAE's dtype")
    arg("--grid", action="store_true", help="also write grid.png (garment | mask | images)")
    arg("--out", required=True, help="output folder (created)")
    arg("--no-progress", action="store_true", help="no progress bar")
    return ap


def load_garment(path: str):
    """The garment image as PIL, alpha kept (RGBA / LA), else RGB."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UsageError(f"--garment {path} not found (give an image file)")
    try:
        with Image.open(path) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA") or "transparency" in img.info
            return img.convert("RGBA" if has_alpha else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--garment {path} is not a readable image ({e})") from None


def _check_args(args) -> None:
    if args.steps < 1 or args.num_images < 1:
        raise UsageError("--steps and --num-images must be >= 1")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 8 or value % 8:
            lower, upper = max(8, value // 8 * 8), (value // 8 + 1) * 8
            raise UsageError(f"--{name} {value} is not a multiple of 8 (the VAE's downsampling "
                             f"factor): use --{name} {lower} or {upper}")
    cli.finite("--guidance", args.guidance)
    cli.finite("--garment-scale", args.garment_scale)
    if not os.path.isdir(args.base):
        raise UsageError(f"--base {args.base} is not a folder: give an SD1.5 diffusers folder "
                         "(unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
    if not os.path.isfile(args.extractor):
        raise UsageError(f"--extractor {args.extractor} not found: give the garment-extractor "
                         ".safetensors (e.g. magic_clothing_768_vitonhd_joint.safetensors)")
    if args.denoiser is not None and not os.path.isfile(args.denoiser):
        raise UsageError(f"--denoiser {args.denoiser} not found: give a flat diffusers UNet "
                         ".safetensors of the base's architecture, or leave it out")
    if args.garment_mask is not None and not os.path.isfile(args.garment_mask):
        raise UsageError(f"--garment-mask {args.garment_mask} not found")
    cli.check_output_folder(args.out)


def run(args) -> list[str]:
    from leffa_jax.systems import magic_clothing as mc_lib

    _check_args(args)
    garment = load_garment(args.garment)
    mask = (imageio.load_image(args.garment_mask, mode="L") if args.garment_mask else None)
    mc = mc_lib.load_magic_clothing(args.base, args.extractor, vae=args.vae,
                                    denoiser=args.denoiser)
    bar = cli.progress_bar(args.steps, "garment2image", not args.no_progress)
    tick = cli.step_ticker(bar, args.steps)
    out = mc_lib.generate(
        mc, garment, args.prompt, garment_mask_image=mask, negative_prompt=args.negative_prompt,
        a_prompt=args.a_prompt, mode=args.mode, garment_scale=args.garment_scale,
        guidance=args.guidance, steps=args.steps, height=args.height, width=args.width,
        num_images_per_prompt=args.num_images, scheduler=args.scheduler, seed=args.seed,
        fp16_garment=not args.no_fp16_garment, dtype=cli.compute_dtype(args.dtype),
        vae_dtype=args.vae_dtype, progress=None if args.no_progress else tick)
    tick(args.steps - 1)
    bar.close()
    written = []
    for j, image in enumerate(out.images):
        path = os.path.join(args.out, f"garment2image_{j:03d}.png")
        imageio.save_png(path, image)
        written.append(path)
    mask_png = (out.garment_masks[0] * 255).astype("uint8")
    path = os.path.join(args.out, "garment_mask.png")
    imageio.save_png(path, mask_png)
    written.append(path)
    if args.grid:
        garment_png = imageio.to_uint8(out.garment_pixels[0])
        path = os.path.join(args.out, "grid.png")
        imageio.save_png(path, imageio.grid([[garment_png, mask_png, *out.images]]))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(run, args, lambda written: f"wrote {len(written)} file(s) to "
                                f"{args.out}")


if __name__ == "__main__":
    sys.exit(main())
