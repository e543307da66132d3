"""Face-diffuser's released checkpoints (`SDM/pytorch_model.bin`, `TDM/pytorch_model.bin`) into
leffa_jax checkpoint folders and back.

The files hold `FaceDiffuserModel.state_dict()` (official `model.py` / `model_text_only.py`):

    SDM  text_encoder.*     CLIP text tower without the `text_model.` prefix (+ position_ids)
         image_encoder.*    vision_model.* + visual_projection.weight (+ position_ids)
         vae.*, unet.*      diffusers 0.16 AutoencoderKL (attention query/key/value/proj_attn) /
                       UNet2DConditionModel keys
         postfuse_module.*  mlp1/mlp2/layer_norm (leffa_jax.nn.postfuse)
    TDM  text_encoder.*, vae.*, unet.*

Reading: `.bin`/`.pth` through `torch.load(weights_only=True)`, or `.safetensors`; the obsolete
`position_ids` buffers are accepted and dropped; a DDP `module.` prefix on every key is
stripped; anything else that does not fit the configs (missing, unexpected, mis-shaped keys) is
one error listing them. The configs come from the SD1.5 base folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/) and, for the SDM's image encoder, a CLIP ViT-L/14 `config.json` (default:
the openai/clip-vit-large-patch14 vision config below); the postfuse width is read from the
tensors. Writing back gives the official names, shapes and dtypes (position_ids re-added as
arange, int64, since transformers <= 4.30 - which the official code needs - loads them
strictly), so file -> leffa_jax -> file is bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np

from leffa_jax import components as components_lib
from leffa_jax.components import Component
from leffa_jax.weights import folder as folder_lib
from leffa_jax.weights import outputs
from leffa_jax.weights.plans import Plan, _plan_component, save_plan
from leffa_jax.weights.tensor_io import (
    CheckpointError,
    CheckpointNotFoundError,
    TensorSource,
    write_safetensors,
    write_torch,
)

SDM = (
    Component("text_encoder", "clip_text", role="text encoder"),
    Component("image_encoder", "clip_vision_projection", role="subject image encoder"),
    Component("vae", "vae", role="autoencoder"),
    Component("unet", "unet", role="denoiser", trainable=True),
    Component("postfuse_module", "postfuse", role="subject fusion MLP", trainable=True),
)
TDM = (
    Component("text_encoder", "clip_text", role="text encoder"),
    Component("vae", "vae", role="autoencoder"),
    Component("unet", "unet", role="denoiser", trainable=True),
)
LAYOUTS = {"sdm": SDM, "tdm": TDM}
# openai/clip-vit-large-patch14's vision tower (the official image_encoder_name_or_path).
CLIP_VIT_L14_VISION = {
    "model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"],
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 14,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
BASE_FOLDERS = ("unet", "vae", "text_encoder")
_POSITION_IDS = {"text_encoder": "text_encoder.embeddings.position_ids",
                 "image_encoder": "image_encoder.vision_model.embeddings.position_ids"}


def detect_layout(keys: Iterable[str]) -> str:
    """"sdm" when the file has image_encoder.* / postfuse_module.* tensors, else "tdm"."""
    tops = {k.removeprefix("module.").split(".", 1)[0] for k in keys}
    return "sdm" if tops & {"image_encoder", "postfuse_module"} else "tdm"


def _check_base(base_dir: str) -> None:
    if not os.path.isdir(base_dir):
        raise CheckpointNotFoundError(
            f"base folder {base_dir} does not exist: give the Stable Diffusion 1.5 diffusers "
            "folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs) the checkpoint "
            "was trained from, e.g. a download of runwayml/stable-diffusion-v1-5")
    missing = [f"{name}/config.json" for name in BASE_FOLDERS
               if not os.path.isfile(os.path.join(base_dir, name, "config.json"))]
    if missing:
        raise CheckpointError(f"base folder {base_dir} lacks {', '.join(missing)}: give the "
                              "Stable Diffusion 1.5 diffusers folder")


def stage_configs(staging: str, base_dir: str, layout: str, clip_dir: str | None = None,
                  postfuse_dim: int | None = None) -> str:
    """Write the config folder a layout is checked against into `staging`: the base folder's
    unet/, vae/, text_encoder/, tokenizer/, scheduler/ (+ model_index.json), and for the SDM
    image_encoder/config.json (the CLIP config, or ViT-L/14's) and postfuse/config.json."""
    from leffa_jax.nn.postfuse import write_postfuse_config

    _check_base(base_dir)
    for name in (*BASE_FOLDERS, "tokenizer", "scheduler"):
        src = os.path.join(base_dir, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(staging, name), ignore=shutil.ignore_patterns(
                "*.safetensors", "*.bin", "*.pth", "*.ckpt", "*.msgpack", "*.onnx"))
    if layout == "sdm":
        folder = os.path.join(staging, "image_encoder")
        os.makedirs(folder)
        if clip_dir is None:
            config = CLIP_VIT_L14_VISION
        else:
            path = clip_dir if clip_dir.endswith(".json") else os.path.join(clip_dir, "config.json")
            if not os.path.isfile(path):
                raise CheckpointNotFoundError(f"CLIP config {path} not found: give the folder of "
                                              "openai/clip-vit-large-patch14 (its config.json)")
            with open(path) as f:
                config = json.load(f)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        write_postfuse_config(os.path.join(staging, "postfuse"), postfuse_dim or 768)
    return staging


def _postfuse_dim(source: TensorSource, prefix: str) -> int | None:
    key = f"{prefix}postfuse_module.mlp2.fc1.weight"
    return source.shape(key)[0] if key in source else None


def plan_official(checkpoint: str, config_dir: str, layout: str | None = None) -> Plan:
    """Check an official SDM/TDM file against a staged config folder (`stage_configs`)."""
    source = TensorSource(checkpoint)
    keys = source.keys()
    ddp = bool(keys) and all(k.startswith("module.") for k in keys)
    prefix = "module." if ddp else ""
    layout = layout or detect_layout(keys)
    system = LAYOUTS[layout]
    names = {c.name for c in system}
    split: dict[str, list[str]] = {name: [] for name in names}
    stray = []
    for key in keys:
        top = key[len(prefix):].split(".", 1)[0]
        (split[top] if top in split else stray).append(key)
    what = f"a Face-diffuser {layout.upper()} checkpoint"
    if stray:
        raise CheckpointError(f"{checkpoint}: {len(stray)} keys outside the {layout.upper()} "
                              f"components {sorted(names)}: {stray[:8]}; is this {what}?")
    plan = Plan(config_dir, {}, {}, {})
    for component in system:
        if not split[component.name]:
            raise CheckpointError(f"{checkpoint}: no '{component.name}.*' tensors; {what} has "
                                  f"{sorted(names)}")
        where = f"{checkpoint} [{component.name}]"
        checked, mapping = _plan_component(component, source, split[component.name],
                                           f"{prefix}{component.name}.", config_dir, where, what)
        plan.components[component.name], plan.sources[component.name] = checked, source
        plan.keys[component.name] = mapping
    return plan


def official_to_flax(checkpoint: str, base_dir: str, out_dir: str, *, clip_dir: str | None = None,
                     layout: str | None = None, formats: Iterable[str] = ("safetensors",),
                     overwrite: bool = False) -> dict:
    """Released SDM/TDM file (+ the SD1.5 base folder, + the CLIP config for the SDM) ->
    leffa_jax checkpoint folder with components text_encoder, [image_encoder,] vae, unet,
    [postfuse_module] and their configs (+ tokenizer/, scheduler/). -> the components' entries.
    The output is checked before any work; written atomically."""
    checkpoint, base_dir = os.fspath(checkpoint), os.fspath(base_dir)
    sources = [checkpoint, base_dir] + ([clip_dir] if clip_dir else [])
    formats = folder_lib.check_save(out_dir, formats, sources, overwrite)
    source = TensorSource(checkpoint)
    layout = layout or detect_layout(source.keys())
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown Face-diffuser layout {layout!r}: choose sdm or tdm")
    prefix = "module." if source.keys() and all(k.startswith("module.") for k in source.keys()) \
        else ""
    with tempfile.TemporaryDirectory(prefix="leffa_jax_fd_configs-") as staging:
        stage_configs(staging, base_dir, layout, clip_dir, _postfuse_dim(source, prefix))
        plan = plan_official(checkpoint, staging, layout)
        return save_plan(plan, out_dir, formats, overwrite=overwrite, sources=sources)


_TO_LEGACY = {v: k for k, v in components_lib.LEGACY_VAE_ATTENTION.items()}


def _legacy_vae_name(key: str) -> str:
    """A current VAE key -> the diffusers 0.16 name the official files use (query, key, value,
    proj_attn in the mid-block attentions)."""
    for new, old in _TO_LEGACY.items():
        marker = f".{new}."
        if ".attentions." in key and marker in key:
            return key.replace(marker, f".{old}.")
    return key


def flax_to_official_state(checkpoint_dir: str, position_ids: bool = True
                           ) -> Iterator[tuple[str, np.ndarray]]:
    """leffa_jax SDM/TDM folder -> (official key, array): text_encoder keys without
    `text_model.`, the other components in their kinds' names; position_ids buffers added."""
    meta, flat = folder_lib.read_flax_checkpoint(checkpoint_dir)
    found = folder_lib.checkpoint_components(meta)
    layout = "sdm" if "postfuse_module" in found else "tdm"
    want = {c.name for c in LAYOUTS[layout]}
    if set(found) != want:
        raise CheckpointError(f"{checkpoint_dir}: components {sorted(found)} are not a "
                              f"Face-diffuser SDM ({sorted(c.name for c in SDM)}) or TDM "
                              f"({sorted(c.name for c in TDM)}) checkpoint")
    lengths = {}
    for name, array in flat.items():
        component, path = name.split(".", 1)
        key, tensor = components_lib.kind_of(found[component]).flax_to_torch(path, array)
        if component == "text_encoder":
            key = key.removeprefix("text_model.")
        if component == "vae":
            key = _legacy_vae_name(key)
        if key.endswith("embeddings.position_embedding.weight"):
            lengths[component] = tensor.shape[0]
        yield f"{component}.{key}", np.ascontiguousarray(tensor)
    if position_ids:
        for component, length in sorted(lengths.items()):
            yield _POSITION_IDS[component], np.arange(length, dtype=np.int64)[None]


def flax_to_official(checkpoint_dir: str, out_path: str, *, position_ids: bool = True) -> int:
    """Write the official `pytorch_model.bin` (torch.save; `.pth`/`.pt` too) or a
    `.safetensors` of a leffa_jax SDM/TDM folder. -> the tensor count."""
    outputs.check_output_file(out_path, [checkpoint_dir], (".bin", ".pth", ".pt", ".safetensors"))
    items = list(flax_to_official_state(checkpoint_dir, position_ids))
    (write_safetensors if out_path.endswith(".safetensors") else write_torch)(out_path, items)
    return len(items)
