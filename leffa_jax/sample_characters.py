"""`python -m leffa_jax.sample --task characters`: StoryMaker, consistent characters in SDXL.

    python -m leffa_jax.sample --task characters --base models/YamerMIX_v11 \\
        --adapter ckpts/mask.bin --image-encoder models/CLIP-ViT-H-14-laion2B-s32B-b79K \\
        --prompt "a person is taking a selfie, and a volcano is in the distance" \\
        --character person.jpg:person_mask.png:person_face.npz --out results/
    # two characters, the official demo's settings
        ... --character a.jpg:a_mask.png:a_face.npz --character b.jpg:b_mask.png:b_face.npz \\
            --height 1280 --width 960 --steps 25 --guidance 7.5 --ip-scale 0.8 --lora-scale 0.8

--base: a diffusers SDXL folder or its leffa_jax conversion. --adapter: the released mask.bin
(read with torch.load(weights_only=True)), a .safetensors with its keys, or a leffa_jax adapter
file (`python -m leffa_jax.convert storymaker-to-flax`). --image-encoder: the CLIP ViT-H vision
folder (default: the base folder's image_encoder/). --character IMAGE:MASK:FACE, once per
character in slot order: an RGB photo, its person mask (same size; non-zero = the person) and
the insightface face as .npz / .json with `kps` (5, 2) and `normed_embedding` (512,)
(`np.savez(path, kps=face.kps, normed_embedding=face.normed_embedding)`). Writes
`<nnn>_<prompt>.png` per image and `grid.png` (atomic writes). Errors exit with status 2 and a
message naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from leffa_jax import cli
from leffa_jax.cli import UsageError, run_reporting_errors

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
NEGATIVE = "bad quality, NSFW, low quality, ugly, disfigured, deformed"  # infer.py


def build_parser() -> argparse.ArgumentParser:
    from leffa_jax.sampling.steppers import STEPPERS

    parser = argparse.ArgumentParser(
        prog="python -m leffa_jax.sample --task characters", description=__doc__,
        formatter_class=cli.HelpFormatter)
    arg = parser.add_argument
    arg("--task", choices=("characters",), default="characters",
        help="characters (StoryMaker); other tasks: python -m leffa_jax.sample --help")
    arg("--base", required=True, help="SDXL diffusers folder or its leffa_jax conversion")
    arg("--adapter", required=True,
        help="StoryMaker mask.bin, its .safetensors, or a leffa_jax adapter file")
    arg("--image-encoder", default=None,
        help="CLIP ViT-H vision folder (default: BASE/image_encoder)")
    arg("--adapter-config", default=None,
        help="storymaker_adapter.json for non-standard widths (default: read from the tensors)")
    arg("--prompt", action="append", required=True, help="the prompt; repeat for several")
    arg("--negative-prompt", default=NEGATIVE, help="negative prompt (the demo's by default)")
    arg("--character", action="append", required=True, metavar="IMAGE:MASK:FACE",
        help="one character: photo, person mask and insightface face file; repeat in slot order")
    arg("--steps", type=int, default=25, help="sampling steps")
    arg("--guidance", type=float, default=7.5, help="classifier-free guidance scale (> 1)")
    arg("--ip-scale", type=float, default=0.8, help="image-prompt attention scale")
    arg("--lora-scale", type=float, default=0.8, help="LoRA scale")
    arg("--merge-lora", action="store_true",
        help="fold the LoRA into the UNet weights before sampling (faster, same images up to "
             "float rounding)")
    arg("--scheduler", choices=tuple(STEPPERS), default="unipc",
        help="sampler (unipc as the official demo, with the base's scheduler config)")
    arg("--seed", type=int, default=0, help="random seed of the first prompt (+1 per prompt)")
    arg("--height", type=int, default=None, help="image height, a multiple of 8")
    arg("--width", type=int, default=None, help="image width, a multiple of 8")
    arg("--batch-size", type=int, default=1, help="images per prompt")
    arg("--dtype", choices=DTYPE_CHOICES, default="auto",
        help="compute dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    arg("--out", required=True, help="output folder (created)")
    arg("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_character(spec: str) -> tuple[str, str, str]:
    """'IMAGE:MASK:FACE' -> the three paths (split at the last two colons), each existing."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise UsageError(f"--character {spec!r}: expected IMAGE:MASK:FACE (photo, person mask, "
                         "insightface face .npz/.json)")
    for what, path in zip(("photo", "mask", "face file"), parts, strict=True):
        if not os.path.isfile(path):
            raise UsageError(f"--character {spec!r}: the {what} {path} does not exist")
    if not parts[2].endswith((".npz", ".json")):
        raise UsageError(f"--character {spec!r}: the face file must be .npz or .json with kps "
                         "and normed_embedding (insightface Face fields)")
    return parts[0], parts[1], parts[2]


def _check_args(args) -> list[tuple[str, str, str]]:
    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch-size must be >= 1")
    cli.finite("--guidance", args.guidance)
    if args.guidance <= 1:
        raise UsageError(f"--guidance {args.guidance}: StoryMaker samples with classifier-free "
                         "guidance; give a scale > 1 (the demo uses 7.5)")
    cli.finite("--ip-scale", args.ip_scale)
    cli.finite("--lora-scale", args.lora_scale)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"--{name} {value} is not a multiple of 8: use "
                             f"{max(8, value // 8 * 8)} or {(value // 8 + 1) * 8}")
    if not os.path.isdir(args.base):
        raise UsageError(f"--base {args.base} is not a folder: give an SDXL diffusers folder "
                         "or its leffa_jax conversion")
    if not os.path.isfile(args.adapter):
        raise UsageError(f"--adapter {args.adapter} does not exist (the released StoryMaker "
                         "checkpoint is RED-AIGC/StoryMaker mask.bin)")
    if args.image_encoder is None and not os.path.isdir(os.path.join(args.base, "image_encoder")):
        raise UsageError(f"{args.base} has no image_encoder/: give --image-encoder (CLIP "
                         "ViT-H/14, laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    characters = [parse_character(c) for c in args.character]
    cli.check_output_folder(args.out)
    return characters


def run(args) -> list[str]:
    """Sample every prompt with the characters; -> the PNG paths written."""
    from leffa_jax.nn.lora import merge_lora
    from leffa_jax.systems import storymaker as sm
    from leffa_jax.systems.storymaker_inputs import load_character

    specs = _check_args(args)
    try:
        characters = [load_character(*spec) for spec in specs]
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    system = sm.load_storymaker(args.base, args.adapter, args.image_encoder,
                                adapter_config=args.adapter_config, lora_scale=args.lora_scale)
    if args.merge_lora:
        merge_lora(system.model.unet)
    dtype = cli.compute_dtype(args.dtype)

    def sample(index, prompt, progress):
        return sm.generate(system, prompt, characters, negative_prompt=args.negative_prompt,
                           steps=args.steps, guidance=args.guidance, ip_scale=args.ip_scale,
                           height=args.height, width=args.width,
                           num_images_per_prompt=args.batch_size, scheduler=args.scheduler,
                           seed=args.seed + index, dtype=dtype, progress=progress).images

    return cli.sample_prompts(args, sample)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(run, args, lambda written: f"wrote {len(written) - 1} image(s) "
                                f"and grid.png to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
