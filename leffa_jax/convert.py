"""`python -m leffa_jax.convert`: weights between PyTorch and leffa_jax checkpoints.

    to-flax   --checkpoint FILE --base-config DIR|NAME | --diffusers DIR  --out DIR
              [--formats safetensors,orbax] [--overwrite]
    to-torch  --flax DIR --out FILE.pth|.safetensors
    to-diffusers --flax DIR --out DIR  (a diffusers folder, or a transformers CLIP folder)
    verify    --checkpoint FILE --base-config DIR|NAME  (PyTorch -> Flax -> PyTorch is bit-exact)

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
    verify = commands.add_parser(
        "verify", formatter_class=formatter,
        help="check that a PyTorch file and a PyTorch->Flax->PyTorch round trip of it are "
             "bit-identical (writes only a temporary folder)")
    verify.add_argument("--checkpoint", required=True,
                        help="official Leffa checkpoint (.pth or .safetensors)")
    verify.add_argument("--base-config", required=True, help=BASE_CONFIG_HELP)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "to-flax":
            _to_flax(parser, args)
        elif args.cmd == "to-diffusers":
            written = flax_to_folder(args.flax, args.out, overwrite=args.overwrite)
            print(f"wrote {args.out}: {written}")
        elif args.cmd == "to-torch":
            count = flax_to_torch(args.flax, args.out)
            print(f"wrote {args.out}: {count} tensors")
        else:
            return _verify(args)
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError, unwritable outputs
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
