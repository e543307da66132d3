"""The component table: every kind of model the library builds and converts, and the named
components of each system.

A *kind* (`KINDS`) says how to build a module from its config folder (the folder holding the
reference library's `config.json`), how its PyTorch tensors map to Flax parameters (leaf rules),
which build options a checkpoint records (e.g. a UNet's `in_channels`, read back from the
tensors), where its weights sit in a diffusers folder, and the dtype it runs in by default.
A *component* (`Component`) is one named model of a system: its kind, the config subfolder of
the base model folder it is built from, its build options, its role and whether it trains.

Conversion (`leffa_jax.weights`), `LeffaModel`, the trainer and the sampler read this table;
adding a kind (a text or image encoder, a resampler, LoRA weights) is one `ComponentKind` entry
in `KINDS`, plus the components that use it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from leffa_jax.weights.leaf_rules import LeafRule, flax_to_torch_leaf, torch_to_flax_leaf
from leffa_jax.weights.tensor_io import CheckpointError

# Weight files of a diffusers model subfolder, in order of preference.
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
# Weight files of a transformers model folder (text_encoder/, image_encoder/, plain CLIP folders).
TRANSFORMERS_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "model.fp16.safetensors", "pytorch_model.fp16.bin")


def _no_options(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    return {}


def _same_key(key: str) -> str | None:
    return key


@dataclasses.dataclass(frozen=True)
class ComponentKind:
    """How one kind of model is built and converted.

    build(config_folder, *, rngs, **options) -> nnx.Module; config_folder holds config.json.
    torch_to_flax / flax_to_torch: the leaf rules (`leffa_jax.weights.leaf_rules`).
    options: build options recorded in a leffa_jax checkpoint (read from `module.config`).
    options_from_tensors({torch key: shape}) -> options found in a PyTorch state dict.
    default_dtype: None = the run's compute dtype; else the dtype it runs in by default.
    canonical_key(file key) -> the torch key the leaf rules know, or None for a buffer that is
    dropped (e.g. CLIP's `position_ids`); writing back always uses the canonical names.
    """

    name: str
    build: Callable[..., Any]
    config_folder: str
    torch_to_flax: LeafRule = torch_to_flax_leaf
    flax_to_torch: LeafRule = flax_to_torch_leaf
    options: tuple[str, ...] = ()
    options_from_tensors: Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any]] = _no_options
    weight_files: tuple[str, ...] = DIFFUSERS_WEIGHT_FILES
    default_dtype: str | None = None
    canonical_key: Callable[[str], str | None] = _same_key


@dataclasses.dataclass(frozen=True)
class Component:
    """One named model of a system. `config`: its config subfolder in the base model folder
    (default: the kind's); `options`: build options (e.g. {"in_channels": 12}); `inputs`: what
    its input is made of, for error messages; `optional`: a folder layout may lack it."""

    name: str
    kind: str
    config: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    role: str = ""
    trainable: bool = False
    inputs: str = ""
    optional: bool = False

    @property
    def config_folder(self) -> str:
        return self.config or kind_of(self).config_folder


# ----------------------------------------------------------------------------- kinds

def _build_unet(config_folder: str, *, rngs, in_channels: int | None = None):
    from leffa_jax.nn.config import UNetConfig
    from leffa_jax.nn.unet import UNet

    return UNet(UNetConfig.from_json(config_folder, in_channels=in_channels), rngs=rngs)


def _build_vae(config_folder: str, *, rngs):
    from leffa_jax.nn.config import VAEConfig
    from leffa_jax.nn.vae import AutoencoderKL

    return AutoencoderKL(VAEConfig.from_json(config_folder), rngs=rngs)


# diffusers < 0.18 VAE attention names (AttentionBlock; e.g. SD1.5's vae/ and the Face-diffuser
# checkpoints) -> the current ones; diffusers converts them the same way when it loads.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def legacy_vae_key(key: str) -> str:
    """A VAE file key with the pre-0.18 attention names (`.attentions.0.query.weight`) renamed
    to the current ones (`.attentions.0.to_q.weight`); other keys unchanged."""
    parts = key.split(".")
    if len(parts) >= 3 and "attentions" in parts[:-2] and parts[-2] in LEGACY_VAE_ATTENTION:
        return ".".join(parts[:-2] + [LEGACY_VAE_ATTENTION[parts[-2]], parts[-1]])
    return key


def _unet_options(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    shape = shapes.get("conv_in.weight")
    return {"in_channels": shape[1]} if shape is not None else {}


def _build_clip(class_name: str):
    """build(config_folder, *, rngs) of one transformers CLIP class (leffa_jax.nn.clip)."""

    def build(config_folder: str, *, rngs):
        from leffa_jax.nn import clip
        from leffa_jax.nn.clip_config import CLIPTextConfig, CLIPVisionConfig

        config = (CLIPTextConfig if "Text" in class_name else CLIPVisionConfig)
        return clip.CLIP_MODELS[class_name](config.from_json(config_folder), rngs=rngs)

    return build


def _clip_to_flax(key: str, array):
    from leffa_jax.nn.clip import clip_torch_to_flax_leaf

    return clip_torch_to_flax_leaf(key, array)


def _clip_to_torch(path: str, array):
    from leffa_jax.nn.clip import clip_flax_to_torch_leaf

    return clip_flax_to_torch_leaf(path, array)


def _clip_key(tower: str) -> Callable[[str], str | None]:
    """CLIP file key -> canonical key: transformers 5 saves a plain CLIPTextModel /
    CLIPVisionModel without the `text_model.` / `vision_model.` prefix that 4.x and diffusers
    folders have; old files carry `position_ids` buffers (dropped)."""

    def canonical(key: str) -> str | None:
        if key.endswith("embeddings.position_ids"):
            return None
        if key.startswith(tower) or key.split(".", 1)[0] in ("text_projection", "visual_projection"):
            return key
        return tower + key

    return canonical


def _clip_kind(name: str, class_name: str, folder: str, tower: str) -> ComponentKind:
    return ComponentKind(name, _build_clip(class_name), folder, _clip_to_flax, _clip_to_torch,
                         weight_files=TRANSFORMERS_WEIGHT_FILES, canonical_key=_clip_key(tower))


KINDS: dict[str, ComponentKind] = {
    "unet": ComponentKind("unet", _build_unet, "unet", options=("in_channels",),
                          options_from_tensors=_unet_options),
    "vae": ComponentKind("vae", _build_vae, "vae", default_dtype="float32",
                         canonical_key=lambda key: legacy_vae_key(key)),
    # transformers CLIP (leffa_jax.nn.clip): the class each kind builds
    "clip_text": _clip_kind("clip_text", "CLIPTextModel", "text_encoder", "text_model."),
    "clip_text_projection": _clip_kind("clip_text_projection", "CLIPTextModelWithProjection",
                                       "text_encoder_2", "text_model."),
    "clip_vision": _clip_kind("clip_vision", "CLIPVisionModel", "image_encoder",
                              "vision_model."),
    "clip_vision_projection": _clip_kind("clip_vision_projection",
                                         "CLIPVisionModelWithProjection", "image_encoder",
                                         "vision_model."),
}


def _build_postfuse(config_folder: str, *, rngs):
    from leffa_jax.nn.postfuse import build_postfuse

    return build_postfuse(config_folder, rngs=rngs)


# Face-diffuser's post-fusion MLP (leffa_jax.nn.postfuse; config.json {"embed_dim": D}).
KINDS["postfuse"] = ComponentKind("postfuse", _build_postfuse, "postfuse",
                                  weight_files=("postfuse.safetensors",))
# transformers `architectures` -> kind (plain transformers CLIP folders).
CLIP_ARCHITECTURES = {"CLIPTextModel": "clip_text",
                      "CLIPTextModelWithProjection": "clip_text_projection",
                      "CLIPVisionModel": "clip_vision",
                      "CLIPVisionModelWithProjection": "clip_vision_projection"}

# ----------------------------------------------------------------------------- systems

# Leffa; the names are the official checkpoint's key prefixes.
LEFFA = (
    Component("vae", "vae", role="autoencoder"),
    Component("unet_encoder", "unet", config="unet", options={"in_channels": 4},
              role="reference", trainable=True, inputs="input: reference-image latent 4"),
    Component("unet", "unet", config="unet", options={"in_channels": 12},
              role="generative", trainable=True,
              inputs="input: noisy latent 4 | mask 1 | masked-image latent 4 | densepose 3"),
)

# A diffusers pipeline folder: one component per model subfolder (name == subfolder).
DIFFUSERS_FOLDER = (
    Component("unet", "unet", role="denoiser"),
    Component("vae", "vae", role="autoencoder"),
)
# A whole diffusers pipeline folder (what `convert to-flax --diffusers` reads): DIFFUSERS_FOLDER
# and the encoders present. Tokenizer folders have no weights: they are copied with the configs.
DIFFUSERS_PIPELINE = DIFFUSERS_FOLDER + (
    Component("text_encoder", "clip_text", role="text encoder", optional=True),
    Component("text_encoder_2", "clip_text_projection", role="second text encoder",
              optional=True),
    Component("image_encoder", "clip_vision_projection", role="image encoder", optional=True),
)


# ----------------------------------------------------------------------------- lookups

def kind_of(component: Component | str) -> ComponentKind:
    """The kind of a component (or a kind given by name); unknown kinds list the known ones."""
    name = component.kind if isinstance(component, Component) else component
    if name not in KINDS:
        raise CheckpointError(f"unknown component kind {name!r}; this version knows "
                              f"{sorted(KINDS)}")
    return KINDS[name]


def as_component(component: Component | str, in_channels: int | None = None) -> Component:
    """A Component, or one for a kind name ("unet") or a Leffa component name ("unet_encoder")
    with the kind's config folder; `in_channels`, when given, is set as a build option."""
    if isinstance(component, str):
        leffa = {c.name: c.kind for c in LEFFA}
        component = Component(component, leffa.get(component, component))
    if in_channels is not None:
        component = with_options(component, in_channels=in_channels)
    return component


def with_options(component: Component, **options) -> Component:
    return dataclasses.replace(component, options={**component.options, **options})


def find(system: tuple[Component, ...], name: str) -> Component:
    for component in system:
        if component.name == name:
            return component
    raise KeyError(f"no component {name!r}; have {[c.name for c in system]}")


def build(component: Component, config_dir: str, *, rngs):
    """The NNX module of `component`, built from `config_dir/<its config folder>`."""
    folder = os.path.join(config_dir, component.config_folder)
    return kind_of(component).build(folder, rngs=rngs, **component.options)


def recorded_options(component: Component, module) -> dict[str, Any]:
    """The build options a checkpoint records for `module` (read from `module.config`)."""
    return {name: getattr(module.config, name) for name in kind_of(component).options}


def leffa_components(generative_in_channels: int | None = None,
                     reference_in_channels: int | None = None) -> tuple[Component, ...]:
    """LEFFA, with the UNets' input channels replaced where given."""
    channels = {"generative": generative_in_channels, "reference": reference_in_channels}
    return tuple(c if channels.get(c.role) is None
                 else with_options(c, in_channels=channels[c.role]) for c in LEFFA)
