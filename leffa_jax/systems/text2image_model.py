"""The models of a text-to-image system (SD1.5 / SDXL) and how they are loaded.

`load_text2image(path)` reads a diffusers pipeline folder (unet/, vae/, text_encoder/,
[text_encoder_2/], tokenizer/, [tokenizer_2/], scheduler/; weights streamed from safetensors, no
torch) or its leffa_jax conversion (`python -m leffa_jax.convert to-flax --diffusers DIR`), and
returns a `TextToImage`: the NNX modules (`TextToImageModel`), the tokenizers, the scheduler
config and the pipeline facts diffusers reads from model_index.json. Errors name the problem and
the fix (missing subfolder, tokenizer or scheduler config; an SDXL UNet without text_encoder_2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

from flax import nnx

from leffa_jax import components
from leffa_jax.nn.unet import UNet
from leffa_jax.text import CLIPTokenizer, TokenizerError
from leffa_jax.weights import folder as weights_folder
from leffa_jax.weights import plans
from leffa_jax.weights.modules import module_from_flat
from leffa_jax.weights.tensor_io import CheckpointError, CheckpointNotFoundError

# The components a text-to-image system loads (names = diffusers subfolders).
TEXT2IMAGE = tuple(c for c in components.DIFFUSERS_PIPELINE if c.name != "image_encoder")
ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


class TextToImageModel(nnx.Module):
    """unet, vae and the text encoders present (`encoder_names`, in diffusers' order)."""

    def __init__(self, modules: dict[str, nnx.Module], config_dir: str):
        for name, module in modules.items():
            setattr(self, name, module)
        self.encoder_names = tuple(n for n in ENCODERS if n in modules)
        self.config_dir = config_dir

    @property
    def sdxl(self) -> bool:
        """SDXL-style conditioning: the UNet has the text_time added embedding."""
        return self.unet.config.addition_time_embed_dim is not None

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def vae_factor(self) -> int:
        return self.vae.downsample_factor


@dataclasses.dataclass
class TextToImage:
    """A loaded text-to-image system. tokenizers: {encoder name: CLIPTokenizer}."""

    model: TextToImageModel
    tokenizers: dict[str, CLIPTokenizer]
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    sample_size: int  # the UNet's latent size: default image size = sample_size * vae factor
    path: str

    @property
    def sdxl(self) -> bool:
        return self.model.sdxl

    @property
    def default_size(self) -> int:
        return self.sample_size * self.model.vae_factor


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _read_weights(path: str) -> tuple[dict, str, set[str]]:
    """-> (flat '<component>.<flax path>' params, config folder, component names)."""
    if os.path.isfile(os.path.join(path, weights_folder.META_FILE)):
        meta, flat = weights_folder.read_flax_checkpoint(path)
        found = weights_folder.checkpoint_components(meta)
        return flat, os.path.join(path, weights_folder.CONFIG_FOLDER), set(found)
    if not os.path.isdir(os.path.join(path, "unet")):
        raise CheckpointError(
            f"{path} is neither a diffusers pipeline folder (unet/, vae/, text_encoder/, "
            "tokenizer/, scheduler/) nor a leffa_jax checkpoint (leffa_jax.json): give the folder "
            "of a Stable Diffusion 1.5 / SDXL model, e.g. a download of "
            "stable-diffusion-v1-5/stable-diffusion-v1-5")
    plan = plans.plan_folder(path, TEXT2IMAGE)
    return plan.read_params(), path, set(plan.components)


def _check_parts(path: str, config_dir: str, found: set[str]) -> list[str]:
    """The encoders to load; errors name a missing part and the fix."""
    missing = [c.name for c in TEXT2IMAGE if not c.optional and c.name not in found]
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(missing)} weights; a text-to-image model "
                              "needs unet/, vae/ and text_encoder/ (SDXL: text_encoder_2/ too)")
    encoders = [n for n in ENCODERS if n in found]
    if not encoders:
        raise CheckpointError(f"{path}: no text encoder (text_encoder/ or text_encoder_2/): a "
                              "text-to-image model needs one; convert the whole diffusers folder")
    for name in encoders:
        folder = os.path.join(config_dir, TOKENIZER_OF[name])
        if not any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json",
                                                                      "tokenizer.json")):
            raise CheckpointError(
                f"{path}: missing tokenizer for {name}: {folder} with vocab.json and merges.txt "
                f"(or tokenizer.json) not found; copy the model's {TOKENIZER_OF[name]}/ folder there (diffusers "
                "folders ship it beside the text encoder)")
    scheduler = os.path.join(config_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler):
        raise CheckpointError(f"{path}: missing scheduler config {scheduler}; copy the model's "
                              "scheduler/ folder there")
    return encoders


def load_tokenizer(folder: str) -> CLIPTokenizer:
    """A tokenizer folder: vocab.json + merges.txt (as the Hub's diffusers folders), or only
    tokenizer.json (what transformers 5 saves), whose BPE vocabulary and merges are staged as
    vocab.json / merges.txt beside the folder's configs."""
    if os.path.isfile(os.path.join(folder, "vocab.json")):
        return CLIPTokenizer.from_pretrained(folder)
    model = _read_json(os.path.join(folder, "tokenizer.json")).get("model") or {}
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise CheckpointError(f"{folder}/tokenizer.json holds no CLIP BPE model")
    with tempfile.TemporaryDirectory(prefix="leffa_jax_tokenizer-") as staging:
        with open(os.path.join(staging, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(model["vocab"], f)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        with open(os.path.join(staging, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copy(os.path.join(folder, name), os.path.join(staging, name))
        return CLIPTokenizer.from_pretrained(staging)


def _build_modules(flat: dict, config_dir: str, names: list[str]) -> dict[str, nnx.Module]:
    out = {}
    for component in TEXT2IMAGE:
        if component.name in names:
            params = weights_folder.split_params(flat, component.name)
            out[component.name] = module_from_flat(component, config_dir, params)
    return out


def _check_sdxl(path: str, unet: UNet, modules: dict) -> None:
    """SDXL's UNet needs the pooled projection of text_encoder_2 and 6 time ids."""
    cfg = unet.config
    if cfg.addition_time_embed_dim is None:
        return
    encoder = modules.get("text_encoder_2")
    if encoder is None or not hasattr(encoder, "text_projection"):
        raise CheckpointError(f"{path}: the UNet is SDXL's (addition_embed_type text_time), which "
                              "needs text_encoder_2/ (CLIPTextModelWithProjection) for the pooled "
                              "embedding")
    projection = encoder.config.projection_dim
    want = cfg.addition_time_embed_dim * 6 + projection
    if want != cfg.projection_class_embeddings_input_dim:
        raise CheckpointError(
            f"{path}: the UNet expects an added embedding of length "
            f"{cfg.projection_class_embeddings_input_dim}, but 6 time ids x "
            f"{cfg.addition_time_embed_dim} + the text_encoder_2 projection {projection} = {want}:"
            " the unet/ and text_encoder_2/ configs do not belong together")


def _check_context(path: str, model: TextToImageModel) -> None:
    if model.sdxl:
        width = sum(getattr(model, n).config.hidden_size for n in model.encoder_names)
    else:
        width = model.text_encoder.config.hidden_size
    if width != model.unet.config.cross_attention_dim:
        raise CheckpointError(f"{path}: the text encoders give a context of width {width}, the "
                              f"UNet's cross_attention_dim is {model.unet.config.cross_attention_dim}"
                              ": the folder mixes models of different families")


def load_text2image(path: str | os.PathLike) -> TextToImage:
    """A diffusers SD1.5 / SDXL pipeline folder, or its leffa_jax checkpoint -> TextToImage."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"model folder {path} does not exist (give a diffusers "
                                      "Stable Diffusion folder or its leffa_jax conversion)")
    flat, config_dir, found = _read_weights(path)
    encoders = _check_parts(path, config_dir, found)
    names = ["unet", "vae", *encoders]
    if "text_encoder" not in found and "text_encoder_2" in found:
        names = ["unet", "vae", "text_encoder_2"]
    modules = _build_modules(flat, config_dir, names)
    if not modules["unet"].config.addition_time_embed_dim and "text_encoder" not in modules:
        raise CheckpointError(f"{path}: an SD1.5-style UNet needs text_encoder/")
    if not modules["unet"].config.addition_time_embed_dim:
        modules.pop("text_encoder_2", None)  # SD1.5 conditions on text_encoder alone
    _check_sdxl(path, modules["unet"], modules)
    model = TextToImageModel(modules, config_dir)
    _check_context(path, model)
    try:
        tokenizers = {n: load_tokenizer(os.path.join(config_dir, TOKENIZER_OF[n]))
                      for n in model.encoder_names}
    except TokenizerError as e:
        raise CheckpointError(f"{path}: {e}") from None
    index = os.path.join(config_dir, "model_index.json")
    index = _read_json(index) if os.path.isfile(index) else {}
    unet_config = _read_json(os.path.join(config_dir, "unet", "config.json"))
    return TextToImage(
        model=model, tokenizers=tokenizers,
        scheduler_config=_read_json(os.path.join(config_dir, "scheduler", "scheduler_config.json")),
        force_zeros_for_empty_prompt=model.sdxl and bool(index.get("force_zeros_for_empty_prompt",
                                                                   True)),
        sample_size=int(unet_config.get("sample_size") or 64), path=path)
