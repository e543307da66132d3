"""The Magic Clothing garment-extractor file, both ways.

Released layout (`magic_clothing_768_vitonhd_joint.safetensors`, the fixtures'
`garment_extractor.safetensors`): ONE flat diffusers `UNet2DConditionModel` state dict, fp32, no
prefix, every UNet key. The official loader deep-copies the denoiser and calls
`load_state_dict(file, strict=False)`: keys absent from the file keep the denoiser's values.

`read_extractor` reproduces that fallback but is strict where the official code is silent or
crashes late: a key of another architecture (e.g. an SDXL UNet file, issue #82), a mis-shaped
key or a file without any UNet key is a `CheckpointError` naming the keys and the fix.
`write_extractor` writes a UNet module back in the released layout (sorted keys, the dtype of
the parameters): the official `ClothAdapter` loads it, and a file read and written again is
byte-identical.
"""

from __future__ import annotations

import os

import numpy as np

from leffa_jax import components as components_lib
from leffa_jax.components import Component
from leffa_jax.weights import outputs
from leffa_jax.weights.leaf_rules import apply_to_shape
from leffa_jax.weights.modules import (
    check_keys,
    module_from_flat,
    module_to_flat,
    module_with_params,
)
from leffa_jax.weights.tensor_io import CheckpointError, TensorSource, write_safetensors

EXTRACTOR = Component("extractor", "unet", config="unet", role="garment extractor",
                      trainable=True, inputs="input: garment latent 4")


def _show(keys, limit=8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _architecture_hint(keys) -> str:
    if any(k.startswith("add_embedding.") for k in keys) or any(
            ".transformer_blocks.1." in k for k in keys):
        return (" It looks like an SDXL UNet (add_embedding / several transformer layers per "
                "block): Magic Clothing's extractor is an SD1.5 UNet; use an SD1.5 base and an "
                "SD1.5 extractor file.")
    return (" Is it the extractor of another base model? Its UNet must have the base folder's "
            "unet/config.json.")


def _torch_layout(flat: dict[str, np.ndarray], in_channels: int | None = None
                  ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """torch key -> (flax path, torch shape) of a UNet's flat parameters in the diffusers layout;
    `in_channels` overrides conv_in's input channels."""
    kind = components_lib.kind_of(EXTRACTOR)
    want = {}
    for flax_path, array in flat.items():
        shape = array.shape
        if in_channels is not None and flax_path == "conv_in.kernel":
            shape = shape[:2] + (in_channels,) + shape[3:]
        key, torch_shape = apply_to_shape(kind.flax_to_torch, flax_path, shape)
        want[key] = (flax_path, torch_shape)
    return want


def _converted(source: TensorSource, keys, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{flax path: array} of the file's torch `keys`, in the dtypes of `base` (the UNet's)."""
    kind = components_lib.kind_of(EXTRACTOR)
    flat = {}
    for key in keys:
        flax_path, array = kind.torch_to_flax(key, source[key])
        flat[flax_path] = np.asarray(array).astype(base[flax_path].dtype, copy=False)
    return flat


def read_denoiser(path: str | os.PathLike, denoiser):
    """The base UNet `denoiser` with every weight replaced from `path`, a flat diffusers UNet
    state dict (.safetensors; e.g. a fine-tune's unet/diffusion_pytorch_model.safetensors or the
    tiny demo's shipped denoiser). Strict: every key of the base UNet, in its shape, and nothing
    else (a CheckpointError lists the differences); stored float16 is read into the base's dtype."""
    source = TensorSource(path)
    kind = components_lib.kind_of(EXTRACTOR)
    base = module_to_flat(denoiser)
    want = _torch_layout(base)
    keys = [k for k in source.keys() if kind.canonical_key(k) is not None]
    check_keys({k: tuple(source.shape(k)) for k in keys}, {k: v[1] for k, v in want.items()},
               f"denoiser file {path}")
    return module_with_params(denoiser, _converted(source, keys, base), f"denoiser file {path}")


def read_extractor(path: str | os.PathLike, denoiser, config_dir: str):
    """-> (extractor UNet, tuple of the torch keys that fell back to the denoiser's values).

    denoiser: the loaded base UNet (its parameters are the fallback); config_dir: the base folder
    (its unet/config.json builds the extractor). An inpainting base (in_channels != 4) gets a
    4-channel extractor, whose conv_in must then be in the file."""
    source = TensorSource(path)
    kind = components_lib.kind_of(EXTRACTOR)
    base = module_to_flat(denoiser)
    in_channels = denoiser.config.in_channels
    want = _torch_layout(base, 4 if in_channels != 4 else None)
    keys = [k for k in source.keys() if kind.canonical_key(k) is not None]
    unexpected = sorted(k for k in keys if k not in want)
    misshaped = sorted(k for k in keys if k in want and tuple(source.shape(k)) != want[k][1])
    where = f"{path}: not a garment-extractor file for the base UNet"
    if unexpected or misshaped:
        parts = [where + ":"]
        if unexpected:
            parts.append(f"  {len(unexpected)} keys the UNet does not have: {_show(unexpected)}")
        if misshaped:
            parts.append(f"  {len(misshaped)} keys with another shape (file vs UNet): " + _show(
                [f"{k} {tuple(source.shape(k))} vs {want[k][1]}" for k in misshaped]))
        raise CheckpointError("\n".join(parts) + "\n " + _architecture_hint(keys))
    if not keys:
        raise CheckpointError(f"{where}: it holds no UNet tensor (a flat diffusers UNet state "
                              "dict such as magic_clothing_768_vitonhd_joint.safetensors is "
                              "expected)")
    if in_channels != 4 and "conv_in.weight" not in keys:
        raise CheckpointError(f"{path}: the base UNet has {in_channels} input channels "
                              "(inpainting), so the 4-channel extractor needs conv_in.weight "
                              "from the file, which lacks it")
    flat = {**base, **_converted(source, keys, base)}
    fallback = tuple(sorted(k for k in want if k not in set(keys)))
    component = components_lib.with_options(EXTRACTOR, in_channels=4)
    return module_from_flat(component, config_dir, flat), fallback


def extractor_items(module) -> list[tuple[str, np.ndarray]]:
    """(diffusers key, array) of a UNet module in the released layout, sorted by key."""
    kind = components_lib.kind_of(EXTRACTOR)
    items = [kind.flax_to_torch(path, array) for path, array in module_to_flat(module).items()]
    return sorted(((k, np.ascontiguousarray(a)) for k, a in items), key=lambda kv: kv[0])


def write_extractor(module, out_path: str | os.PathLike, *, overwrite: bool = False,
                    sources=()) -> int:
    """Write a UNet (the trained extractor) as a released-layout `.safetensors` (atomic: a temp
    file renamed). Returns the tensor count. The output must not be one of `sources`; an
    existing file needs `overwrite`."""
    out_path = os.fspath(out_path)
    if not out_path.endswith(".safetensors"):
        raise CheckpointError(f"{out_path}: the garment-extractor file is a .safetensors file "
                              "(the official code reads it with safe_open)")
    if os.path.exists(out_path) and not overwrite:
        raise CheckpointError(f"{out_path} exists: choose a new name or pass overwrite")
    outputs.check_output_file(out_path, list(sources), (".safetensors",))
    items = extractor_items(module)
    write_safetensors(out_path, items)
    return len(items)
