"""`python -m leffa_jax.convert`: weights between PyTorch and leffa_jax checkpoints.

    to-flax   --checkpoint FILE --base-config DIR|NAME | --diffusers DIR  --out DIR
              [--formats safetensors,orbax] [--overwrite]
    to-torch  --flax DIR --out FILE.pth|.safetensors
    to-diffusers --flax DIR --out DIR  (a diffusers folder, or a transformers CLIP folder)
    verify    --checkpoint FILE --base-config DIR|NAME  (PyTorch -> Flax -> PyTorch is bit-exact)
    face-diffuser --checkpoint SDM_or_TDM.bin --base SD15_DIR [--clip DIR] --out DIR
    face-diffuser-to-torch --flax DIR --out pytorch_model.bin
    storymaker-to-flax   --adapter mask.bin --base SDXL_DIR --out FILE.safetensors
                         [--adapter-config JSON] [--overwrite]   (StoryMaker adapter)
    storymaker-to-torch  --adapter FILE.safetensors --out mask.bin|.safetensors [--overwrite]
    verify-extractor --extractor FILE --base SD15_DIR [--out FILE]  (Magic Clothing)

Base config names (bundled, `leffa_jax.weights.base_configs`): sd15-inpainting, sdxl-inpainting.
Outputs are checked before any work and written so that a failure leaves nothing behind.

The work is done by `leffa_jax.weights` (see its docstring); the names below are re-exported
for callers of the previous single-module API.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from leffa_jax.weights.leaf_rules import flax_to_torch_leaf, torch_to_flax_leaf
from leffa_jax.weights.modules import expected_params, module_from_flat, module_to_flat
from leffa_jax.weights.pipeline_folders import flax_to_folder, folder_to_flax
from leffa_jax.weights.plans import (
    diffusers_to_flax,
    flax_to_torch,
    flax_to_torch_state,
    official_to_flax,
)
from leffa_jax.weights.tensor_io import CheckpointError, TensorSource, write_safetensors

__all__ = ["CheckpointError", "TensorSource", "diffusers_to_flax", "expected_params",
           "flax_to_torch", "flax_to_torch_leaf", "flax_to_torch_state", "main",
           "module_from_flat", "module_to_flat", "official_to_flax", "torch_to_flax_leaf",
           "write_safetensors"]


BASE_CONFIG_HELP = ("base model config folder (unet/ vae/ scheduler/) or a bundled name: "
                    "sd15-inpainting (virtual_tryon.pth, virtual_tryon_dc.pth), sdxl-inpainting "
                    "(pose_transfer.pth)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, "(required)" or "(no default)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if action.default is None:
            return f"{text} (no default)"
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m leffa_jax.convert", formatter_class=formatter,
        description="Convert Leffa / Stable Diffusion weights between PyTorch and Flax. Official "
                    "weights: Hugging Face repository franciszzj/Leffa.")
    commands = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    to_flax = commands.add_parser(
        "to-flax", formatter_class=formatter,
        help="official .pth/.safetensors (with --base-config) or a diffusers folder "
             "(--diffusers) -> leffa_jax checkpoint folder")
    to_flax.add_argument("--checkpoint", help="official Leffa checkpoint (.pth or .safetensors); "
                                              "needs --base-config")
    to_flax.add_argument("--base-config", help=BASE_CONFIG_HELP)
    to_flax.add_argument("--diffusers", help="diffusers-format model folder (unet/, vae/, "
                                             "[text_encoder/, text_encoder_2/, image_encoder/, "
                                             "tokenizer/, tokenizer_2/,] scheduler/) or a "
                                             "transformers CLIP folder, instead of --checkpoint")
    to_flax.add_argument("--out", required=True,
                         help="output checkpoint folder (new or empty; created with its parents)")
    to_flax.add_argument("--formats", default="safetensors",
                         help="comma list of output formats: safetensors, orbax (one or both)")
    to_flax.add_argument("--overwrite", action="store_true",
                         help="replace an existing leffa_jax checkpoint folder at --out as a "
                              "whole (other non-empty folders are always refused)")
    to_torch = commands.add_parser(
        "to-torch", formatter_class=formatter,
        help="leffa_jax checkpoint folder -> PyTorch state dict file")
    to_torch.add_argument("--flax", required=True, help="leffa_jax checkpoint folder")
    to_torch.add_argument("--out", required=True,
                          help="output .pth/.pt/.bin (torch.save) or .safetensors file, outside "
                               "the checkpoint folder; its folder must exist")
    to_diffusers = commands.add_parser(
        "to-diffusers", formatter_class=formatter,
        help="leffa_jax checkpoint folder (from --diffusers) -> diffusers folder (or a "
             "transformers folder for one CLIP model), original names, shapes and dtypes")
    to_diffusers.add_argument("--flax", required=True, help="leffa_jax checkpoint folder")
    to_diffusers.add_argument("--out", required=True, help="output folder (new or empty)")
    to_diffusers.add_argument("--overwrite", action="store_true",
                              help="replace an existing model folder at --out as a whole")
    face = commands.add_parser(
        "face-diffuser", formatter_class=formatter,
        help="released Face-diffuser SDM/TDM pytorch_model.bin (or .safetensors) -> leffa_jax "
             "checkpoint folder (configs from the SD1.5 base folder)")
    face.add_argument("--checkpoint", required=True, help="SDM/ or TDM/ pytorch_model.bin")
    face.add_argument("--base", required=True,
                      help="Stable Diffusion 1.5 diffusers folder (unet/ vae/ text_encoder/ "
                           "tokenizer/ scheduler/ configs)")
    face.add_argument("--clip", default=None,
                      help="SDM only: CLIP ViT-L/14 folder (config.json); unset: the built-in "
                           "openai/clip-vit-large-patch14 vision config")
    face.add_argument("--out", required=True, help="output checkpoint folder (new or empty)")
    face.add_argument("--formats", default="safetensors",
                      help="comma list of output formats: safetensors, orbax")
    face.add_argument("--overwrite", action="store_true",
                      help="replace an existing leffa_jax checkpoint folder at --out")
    face_back = commands.add_parser(
        "face-diffuser-to-torch", formatter_class=formatter,
        help="leffa_jax Face-diffuser SDM/TDM folder -> the official pytorch_model.bin layout")
    face_back.add_argument("--flax", required=True, help="leffa_jax SDM or TDM folder")
    face_back.add_argument("--out", required=True,
                           help="output .bin/.pth (torch.save) or .safetensors file")
    verify = commands.add_parser(
        "verify", formatter_class=formatter,
        help="check that a PyTorch file and a PyTorch->Flax->PyTorch round trip of it are "
             "bit-identical (writes only a temporary folder)")
    verify.add_argument("--checkpoint", required=True,
                        help="official Leffa checkpoint (.pth or .safetensors)")
    verify.add_argument("--base-config", required=True, help=BASE_CONFIG_HELP)
    extractor = commands.add_parser(
        "verify-extractor", formatter_class=formatter,
        help="Magic Clothing: read a garment-extractor .safetensors against an SD1.5 base "
             "(strict: another architecture or shape is an error; missing keys take the base "
             "UNet's values, as officially), check that writing it back is bit-exact, and with "
             "--out write the completed file (every key) in the released layout")
    extractor.add_argument("--extractor", required=True, help="garment-extractor .safetensors")
    extractor.add_argument("--base", required=True, help="SD1.5 diffusers folder")
    extractor.add_argument("--out", help="write the completed released-layout file here")
    sm_flax = commands.add_parser(
        "storymaker-to-flax", formatter_class=formatter,
        help="StoryMaker mask.bin (image_proj_model + ip_adapter) -> leffa_jax adapter file")
    sm_flax.add_argument("--adapter", required=True, help="the released mask.bin (or a "
                                                          ".safetensors with its keys)")
    sm_flax.add_argument("--base", required=True, help="the SDXL base folder (its unet config "
                                                       "gives the processor order)")
    sm_flax.add_argument("--adapter-config", default=None,
                         help="storymaker_adapter.json for non-standard widths (default: from "
                              "the tensor shapes, dim_head 64)")
    sm_flax.add_argument("--out", required=True, help="output .safetensors")
    sm_flax.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sm_torch = commands.add_parser(
        "storymaker-to-torch", formatter_class=formatter,
        help="leffa_jax StoryMaker adapter file -> the released mask.bin layout")
    sm_torch.add_argument("--adapter", required=True, help="leffa_jax adapter .safetensors")
    sm_torch.add_argument("--out", required=True,
                          help="output .bin/.pth (torch.save of {'image_proj_model', "
                               "'ip_adapter'}) or .safetensors (prefixed keys)")
    sm_torch.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def _storymaker(args: argparse.Namespace) -> None:
    from leffa_jax.weights import storymaker as sm_weights

    if args.cmd == "storymaker-to-flax":
        config = None
        if args.adapter_config:
            from leffa_jax.systems.storymaker import AdapterConfig

            config = AdapterConfig.from_json(args.adapter_config)
        count = sm_weights.official_to_adapter(args.adapter, args.base, args.out, config=config,
                                               overwrite=args.overwrite)
    else:
        count = sm_weights.adapter_to_official(args.adapter, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {count} tensors")


def _to_flax(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.checkpoint) == bool(args.diffusers):
        parser.error("give exactly one of --checkpoint (with --base-config) or --diffusers")
    if args.checkpoint and not args.base_config:
        parser.error("--checkpoint needs --base-config (a config folder, or sd15-inpainting / "
                     "sdxl-inpainting)")
    if args.diffusers and args.base_config:
        parser.error("--base-config goes with --checkpoint; a --diffusers folder has its configs")
    if args.checkpoint:
        entries = official_to_flax(args.checkpoint, args.base_config, args.out, args.formats,
                                   overwrite=args.overwrite)
    else:
        entries = folder_to_flax(args.diffusers, args.out, args.formats,
                                 overwrite=args.overwrite)
    print(f"wrote {args.out}: components {entries}")


def _verify(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        official_to_flax(args.checkpoint, args.base_config, tmp)
        back = dict(flax_to_torch_state(tmp))
        source = TensorSource(args.checkpoint)
        differing = [k for k in source.keys()
                     if k not in back or back[k].dtype != source[k].dtype
                     or back[k].shape != source[k].shape
                     or back[k].tobytes() != source[k].tobytes()]
    if differing or len(back) != len(source.keys()):
        print(f"round trip differs for {len(differing)} tensors: {differing[:10]}")
        return 1
    print(f"round trip bit-exact for all {len(back)} tensors")
    return 0


def _verify_extractor(args: argparse.Namespace) -> int:
    """Magic Clothing's extractor file (leffa_jax.weights.plan_magic_clothing)."""
    import os

    from leffa_jax.systems.magic_clothing import load_magic_clothing, save_extractor
    from leffa_jax.weights.plan_magic_clothing import extractor_items

    mc = load_magic_clothing(args.base, args.extractor)
    source = TensorSource(args.extractor)
    back = dict(extractor_items(mc.model.extractor))
    differing = [k for k in source.keys() if k in back and (
        back[k].dtype != source[k].dtype or back[k].tobytes() != source[k].tobytes())]
    print(f"{len(source.keys())} tensors read, {len(mc.fallback_keys)} missing keys taken from "
          f"the base UNet" + (f" (e.g. {mc.fallback_keys[:3]})" if mc.fallback_keys else ""))
    if differing:
        print(f"round trip differs for {len(differing)} tensors: {differing[:10]}")
        return 1
    print(f"round trip bit-exact for all {len(source.keys())} tensors of the file")
    if args.out:
        count = save_extractor(mc, os.fspath(args.out))
        print(f"wrote {args.out}: {count} tensors (released layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "to-flax":
            _to_flax(parser, args)
        elif args.cmd == "to-diffusers":
            written = flax_to_folder(args.flax, args.out, overwrite=args.overwrite)
            print(f"wrote {args.out}: {written}")
        elif args.cmd.startswith("storymaker-"):
            _storymaker(args)
        elif args.cmd == "face-diffuser":
            from leffa_jax.weights import plan_face_diffuser

            entries = plan_face_diffuser.official_to_flax(
                args.checkpoint, args.base, args.out, clip_dir=args.clip, formats=args.formats,
                overwrite=args.overwrite)
            print(f"wrote {args.out}: components {entries}")
        elif args.cmd == "face-diffuser-to-torch":
            from leffa_jax.weights import plan_face_diffuser

            count = plan_face_diffuser.flax_to_official(args.flax, args.out)
            print(f"wrote {args.out}: {count} tensors")
        elif args.cmd == "to-torch":
            count = flax_to_torch(args.flax, args.out)
            print(f"wrote {args.out}: {count} tensors")
        elif args.cmd == "verify-extractor":
            return _verify_extractor(args)
        else:
            return _verify(args)
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError, unwritable outputs
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
