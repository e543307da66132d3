"""Whole model folders both ways: diffusers pipeline folders and plain transformers CLIP folders.

    folder_to_flax(folder, out_dir)   a diffusers pipeline folder (unet/, vae/ and the
                                      text_encoder/, text_encoder_2/, image_encoder/ present;
                                      tokenizer/, tokenizer_2/, scheduler/, feature_extractor/
                                      copied as files) or a transformers CLIP folder (config.json
                                      + model.safetensors / pytorch_model.bin, tokenizer files)
                                      -> leffa_jax checkpoint
    flax_to_folder(checkpoint, out)   back: every component as <config folder>/<its kind's first
                                      weight file name> in the original key names, shapes and
                                      dtypes, with its configs, the tokenizers, scheduler and
                                      model_index.json; a checkpoint holding one CLIP model (from a
                                      transformers folder) becomes a plain transformers folder.

Key names written back are the diffusers / transformers 4.x layout: a plain CLIPTextModel or
CLIPVisionModel saved by transformers 5 lacks the `text_model.` / `vision_model.` prefix, which
is read and written back with it (transformers 5 loads both). Old `position_ids` buffers are
dropped. Tensors stream one at a time both ways.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable

from flax import nnx

from leffa_jax import components as components_lib
from leffa_jax.components import Component
from leffa_jax.weights import folder as folder_lib
from leffa_jax.weights import outputs
from leffa_jax.weights.leaf_rules import apply_to_shape
from leffa_jax.weights.plans import (
    Plan,
    _plan_component,
    diffusers_to_flax,
    find_weights,
    save_plan,
)
from leffa_jax.weights.tensor_io import (
    CheckpointError,
    CheckpointNotFoundError,
    LazyTensor,
    TensorSource,
    write_safetensors,
)

__all__ = ["TOKENIZER_FILES", "is_transformers_folder", "is_clip_model", "transformers_component",
           "plan_transformers_folder", "load_transformers_clip",
           "load_image_encoder", "folder_to_flax", "flax_to_folder"]

# Files of a transformers tokenizer / image processor kept beside a plain CLIP model.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json", "added_tokens.json")
PROCESSOR_FILE = "preprocessor_config.json"


def is_transformers_folder(folder: str) -> bool:
    """A plain transformers model folder: config.json at the top, no model_index.json/unet/."""
    return (os.path.isfile(os.path.join(folder, "config.json"))
            and not os.path.isfile(os.path.join(folder, "model_index.json"))
            and not os.path.isdir(os.path.join(folder, "unet")))


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the model config ({e})") from None


def is_clip_model(config: dict) -> bool:
    """A full transformers CLIPModel config (both towers), e.g. openai/clip-vit-large-patch14."""
    return "CLIPModel" in (config.get("architectures") or []) or config.get("model_type") == "clip"


# The tower of a full CLIPModel a system reads: component, and the file keys that belong to it.
CLIP_MODEL_TOWERS = {
    "vision": (Component("image_encoder", "clip_vision_projection", config="image_encoder",
                         role="CLIPModel vision tower"), ("vision_model.", "visual_projection.")),
    "text": (Component("text_encoder", "clip_text_projection", config="text_encoder",
                       role="CLIPModel text tower"), ("text_model.", "text_projection.")),
}


def transformers_component(folder: str, tower: str | None = None) -> Component:
    """The component of a transformers CLIP folder, its kind from config.json `architectures`
    (or `model_type`): named text_encoder (text models) or image_encoder (vision models). A full
    CLIPModel needs `tower` ("vision" or "text"): the other tower is left out."""
    path = os.path.join(folder, "config.json")
    config = _read_config(folder)
    if is_clip_model(config):
        if tower not in CLIP_MODEL_TOWERS:
            raise CheckpointError(
                f"{path}: a full CLIPModel (both towers); converting it needs one tower: save "
                "its text or vision model alone (e.g. CLIPVisionModelWithProjection"
                ".from_pretrained(...).save_pretrained(...)), or give it where a system reads "
                "one tower of it (Face-diffuser's model.clip, StoryMaker's image encoder)")
        return CLIP_MODEL_TOWERS[tower][0]
    archs = config.get("architectures") or []
    by_type = {"clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel"}
    if not archs and config.get("model_type") in by_type:
        archs = [by_type[config["model_type"]]]
    kinds = [components_lib.CLIP_ARCHITECTURES[a] for a in archs
             if a in components_lib.CLIP_ARCHITECTURES]
    if len(kinds) != 1:
        raise CheckpointError(
            f"{path}: architectures {archs} (model_type {config.get('model_type')!r}): a "
            f"transformers folder converts when it holds one of "
            f"{sorted(components_lib.CLIP_ARCHITECTURES)} or a CLIPModel")
    name = "text_encoder" if kinds[0].startswith("clip_text") else "image_encoder"
    return Component(name, kinds[0], config=name, role=archs[0])


def _stage_configs(folder: str, component: Component, staging: str) -> None:
    """A diffusers-like config folder for a plain transformers folder: <name>/config.json,
    tokenizer/ and feature_extractor/ (only the small json/text files are copied)."""
    os.makedirs(os.path.join(staging, component.config_folder))
    shutil.copy(os.path.join(folder, "config.json"),
                os.path.join(staging, component.config_folder, "config.json"))
    tokenizer = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    if tokenizer:
        os.makedirs(os.path.join(staging, "tokenizer"))
        for name in tokenizer:
            shutil.copy(os.path.join(folder, name), os.path.join(staging, "tokenizer", name))
    if os.path.isfile(os.path.join(folder, PROCESSOR_FILE)):
        os.makedirs(os.path.join(staging, "feature_extractor"))
        shutil.copy(os.path.join(folder, PROCESSOR_FILE),
                    os.path.join(staging, "feature_extractor", PROCESSOR_FILE))


def plan_transformers_folder(folder: str, staging: str, tower: str | None = None) -> Plan:
    """A checked Plan of a transformers CLIP folder; its configs are staged in `staging` (an
    empty folder the caller removes afterwards), which becomes the plan's config folder. For a
    full CLIPModel, `tower` ("vision" | "text") picks the tower read; the other one's tensors
    (and `logit_scale`) are left in the file."""
    component = transformers_component(folder, tower)
    weights = find_weights(folder, components_lib.kind_of(component).weight_files, ())
    _stage_configs(folder, component, staging)
    source = TensorSource(weights)
    keys = source.keys()
    if is_clip_model(_read_config(folder)):
        prefixes = CLIP_MODEL_TOWERS[tower][1]
        keys = [k for k in keys if k.startswith(prefixes)]
    where = f"{weights} with config {folder}/config.json"
    checked, mapping = _plan_component(component, source, keys, "", staging, where,
                                       "a transformers CLIP folder")
    return Plan(staging, {checked.name: checked}, {checked.name: source},
                {checked.name: mapping})


def load_transformers_clip(folder: str, tower: str | None = None) -> nnx.Module:
    """The `nn.clip` module of a transformers CLIP folder (for a full CLIPModel: its `tower`,
    "vision" or "text", with the projection)."""
    from leffa_jax.weights.modules import module_from_flat

    with tempfile.TemporaryDirectory(prefix="leffa_jax_configs-") as staging:
        plan = plan_transformers_folder(folder, staging, tower)
        name = next(iter(plan.components))
        return module_from_flat(plan.components[name], staging,
                                folder_lib.split_params(plan.read_params(), name))


def load_image_encoder(path: str, *, projection: bool = False,
                       example: str = "openai/clip-vit-large-patch14") -> nnx.Module:
    """CLIP vision encoder (`nn.clip`) from a transformers folder (CLIPVisionModel[WithProjection],
    or a full CLIPModel whose vision tower is read), a leffa_jax checkpoint with an
    image_encoder, or a diffusers folder with an image_encoder/. `projection`: the visual
    projection is required (an encoder without one is refused). `example` names a suitable
    download in the errors."""
    from leffa_jax.weights import plans
    from leffa_jax.weights.modules import module_from_flat

    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, folder_lib.META_FILE)):
        meta, flat = folder_lib.read_flax_checkpoint(path)
        found = folder_lib.checkpoint_components(meta)
        if "image_encoder" not in found:
            raise CheckpointError(f"{path}: this leffa_jax checkpoint has no image_encoder "
                                  f"(components {sorted(found)})")
        component, config_dir = found["image_encoder"], os.path.join(path, folder_lib.CONFIG_FOLDER)
        params = folder_lib.split_params(flat, "image_encoder")
    elif os.path.isdir(os.path.join(path, "image_encoder")):  # a diffusers folder with one
        plan = plans.plan_folder(path, (Component("image_encoder", "clip_vision_projection"),))
        component, config_dir = plan.components["image_encoder"], path
        params = folder_lib.split_params(plan.read_params(), "image_encoder")
    elif is_transformers_folder(path):
        component, config_dir, params = transformers_component(path, "vision"), None, None
        if component.name != "image_encoder":
            raise CheckpointError(f"{path} holds a CLIP text model; a CLIP vision model is "
                                  f"needed here (e.g. {example})")
    else:
        raise CheckpointNotFoundError(
            f"image encoder {path}: not a transformers CLIP vision folder (config.json + "
            "model.safetensors), a leffa_jax checkpoint or a diffusers folder with "
            f"image_encoder/: give e.g. a download of {example}")
    if projection and component.kind != "clip_vision_projection":
        raise CheckpointError(f"{path}: a CLIP vision model without the visual projection; the "
                              "projection is needed here: give the CLIPVisionModelWithProjection "
                              f"or the whole CLIPModel folder (e.g. {example})")
    if params is None:  # a transformers folder: read (and its configs staged) only now
        return load_transformers_clip(path, "vision")
    return module_from_flat(component, config_dir, params)


def folder_to_flax(folder: str, out_dir: str, formats: Iterable[str] = ("safetensors",), *,
                   overwrite: bool = False) -> dict:
    """A diffusers pipeline folder or a plain transformers CLIP folder -> leffa_jax checkpoint;
    -> the components' leffa_jax.json entries."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointNotFoundError(f"model folder {folder} does not exist (give a diffusers "
                                      "folder with unet/ and vae/, or a transformers CLIP folder)")
    if not is_transformers_folder(folder):
        return diffusers_to_flax(folder, out_dir, formats, overwrite=overwrite)
    formats = folder_lib.check_save(out_dir, formats, [folder], overwrite)
    with tempfile.TemporaryDirectory(prefix="leffa_jax_configs-") as staging:
        plan = plan_transformers_folder(folder, staging)
        return save_plan(plan, out_dir, formats, overwrite=overwrite, sources=[folder])


# ----------------------------------------------------------------------------- back

def _lazy_torch_items(checkpoint_dir: str, name: str, component: Component):
    """(torch key, LazyTensor) of one component, read from params.safetensors one at a time
    (orbax-only checkpoints are read whole)."""
    rule = components_lib.kind_of(component).flax_to_torch
    path = os.path.join(checkpoint_dir, "params.safetensors")
    prefix = name + "."
    if not os.path.isfile(path):
        _, flat = folder_lib.read_flax_checkpoint(checkpoint_dir)
        return [rule(k[len(prefix):], v) for k, v in flat.items() if k.startswith(prefix)]
    source = TensorSource(path)
    items = []
    for key in source.keys():
        if key.startswith(prefix):
            flax_path = key[len(prefix):]
            torch_key, shape = apply_to_shape(rule, flax_path, source.shape(key))
            read = (lambda p=flax_path, k=key: rule(p, source[k])[1])
            items.append((torch_key, LazyTensor(shape, source.numpy_dtype(key), read)))
    return items


def _copy_tree_files(src: str, dst: str, names: Iterable[str] | None = None) -> None:
    if not os.path.isdir(src):
        return
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)) if names is None else names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def _check_layout(checkpoint_dir: str, found: dict[str, Component]) -> None:
    folders: dict[str, str] = {}
    for name, component in found.items():
        other = folders.setdefault(component.config_folder, name)
        if other != name:
            raise CheckpointError(
                f"{checkpoint_dir}: components {other!r} and {name!r} share the config folder "
                f"{component.config_folder!r}, so they cannot be laid out as a diffusers folder; "
                "write a single state dict with `convert to-torch` instead")


def flax_to_folder(checkpoint_dir: str, out_dir: str, *, overwrite: bool = False) -> dict:
    """leffa_jax checkpoint -> diffusers pipeline folder (or a plain transformers folder for a
    checkpoint of one CLIP model alone); -> {component: weights file written}. The output is
    checked first (new or empty, or with `overwrite` a folder with a config.json or
    model_index.json) and written atomically."""
    meta = folder_lib.read_meta(checkpoint_dir)
    found = folder_lib.checkpoint_components(meta)
    _check_layout(checkpoint_dir, found)
    configs = os.path.join(checkpoint_dir, folder_lib.CONFIG_FOLDER)
    plain = (len(found) == 1 and next(iter(found.values())).kind in
             components_lib.CLIP_ARCHITECTURES.values()
             and not os.path.isfile(os.path.join(configs, "model_index.json")))
    marker = "config.json" if plain else "model_index.json"
    outputs.check_output_folder(out_dir, [checkpoint_dir], overwrite, marker)

    def write(target: str) -> dict:
        written = {}
        for name, component in found.items():
            kind = components_lib.kind_of(component)
            sub = target if plain else os.path.join(target, component.config_folder)
            _copy_tree_files(os.path.join(configs, component.config_folder), sub)
            path = os.path.join(sub, kind.weight_files[0])
            write_safetensors(path, _lazy_torch_items(checkpoint_dir, name, component),
                              metadata={"format": "pt"})
            written[name] = os.path.relpath(path, target)
        for extra in folder_lib.COPIED_FOLDERS:
            if plain:
                _copy_tree_files(os.path.join(configs, extra), target)
            else:
                _copy_tree_files(os.path.join(configs, extra), os.path.join(target, extra))
        if not plain:
            _copy_tree_files(configs, target, ["model_index.json"])
        return written

    return outputs.write_folder_atomically(out_dir, write)
