"""Face-diffuser (arXiv 2311.10329): a subject-augmented model (SDM) and a text-driven model (TDM)
fused by saliency-adaptive noise fusion (SNF). Reference: ../shared/FACE_DIFFUSER_REFERENCE.md.

Models (`FaceDiffuserModel`, components named as the official state dict):
- SDM: text_encoder (CLIP text), image_encoder (CLIP vision + projection), postfuse_module
  (`nn/postfuse.py`), unet (SD1.5, text cross-attention), vae (training only);
- TDM: text_encoder, vae (training only), unet. At inference ALL prompts are encoded by the
  SDM's text encoder and the BASE model's VAE decodes (official `inference.py`).

Prompts (`prompt_inputs`): `<|image|>` (added to the tokenizer at the next free id, 49408 for
SD1.5) is removed from the ids and marks the token before it (the noun); clean ids padded with
the pad id (49407) to 77, no re-inserted EOS after truncation; the text-only prompt is the
caption with the marker removed (double spaces kept), the null prompt "". Subjects: k-th image
<-> k-th `<|image|>`, in the order given.

Subject preprocessing (`subject_pixels`, official DemoDataset with --no_object_augmentation):
zero-pad the short side by (|h - w|) // 2 on both sides, resize the uint8 image to (R, R)
(bilinear, antialias, float32 then round; torch's kernel), / 255. The image encoder then
resizes to the vision tower's size (bilinear, antialias) and applies CLIP mean/std.

Sampling (`generate`, traceable core `snf_stages`): stepper from the base scheduler config
(PNDM/PLMS for SD1.5: N + 1 loop steps), loop steps i <= merge_start: TDM alone (CFG null vs
text); merge_start < i <= merge_end: both, fused per pixel by `guidance.saliency_fusion` (SDM CFG
text vs augmented); later: SDM alone. `stage2="stacked"` runs the two stage-2 UNet calls as one
vmapped call over the stacked parameters (same result; a batching choice for accelerators).

Arrays are NHWC; latents (B, H/8, W/8, 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import components as components_lib
from leffa_jax.imageio import antialias_taps, pad_to_square, resize_bilinear, to_uint8
from leffa_jax.nn.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from leffa_jax.sampling import guidance as guidance_lib
from leffa_jax.sampling.loop import Stages, denoise, progress_reporting
from leffa_jax.sampling.steppers import STEPPERS, Stepper, make_stepper
from leffa_jax.schedulers import make_schedule
from leffa_jax.text import CLIPTokenizer
from leffa_jax.text.tokenizer import AddedToken
from leffa_jax.weights import folder as weights_folder
from leffa_jax.weights import plan_face_diffuser as fd_plan
from leffa_jax.weights import plans
from leffa_jax.weights.modules import module_from_flat
from leffa_jax.weights.tensor_io import CheckpointError, CheckpointNotFoundError

IMAGE_TOKEN = "<|image|>"
MAX_LENGTH = 77
_F32 = jnp.float32
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class FaceDiffuserModel(nnx.Module):
    """The components present (SDM: text_encoder, image_encoder, postfuse_module, vae, unet;
    TDM: text_encoder, vae, unet), as attributes named like the official state dict."""

    def __init__(self, modules: dict[str, nnx.Module]):
        for name, module in modules.items():
            setattr(self, name, module)
        self.component_names = tuple(modules)

    def encode_text(self, input_ids: jax.Array, dtype=_F32) -> jax.Array:
        """(B, 77) ids -> last hidden state (B, 77, D) (no attention mask, as the official)."""
        return self.text_encoder(input_ids, dtype=dtype).last_hidden_state

    def encode_objects(self, pixels: jax.Array, dtype=_F32) -> jax.Array:
        """(B, K, R, R, 3) subject crops in [0, 1] -> (B, K, D) image embeddings: resized to the
        vision tower's size (bilinear, antialias) when R differs, CLIP-normalised, pooled CLS,
        visual projection."""
        b, k, h, w, c = pixels.shape
        x = pixels.reshape(b * k, h, w, c).astype(_F32)
        size = self.image_encoder.config.image_size
        x = resize_antialias(x, (size, size))
        x = (x - jnp.asarray(OPENAI_CLIP_MEAN, _F32)) / jnp.asarray(OPENAI_CLIP_STD, _F32)
        embeds = self.image_encoder(x, dtype=dtype).image_embeds
        return embeds.reshape(b, k, -1)

    def augment(self, text_embeds: jax.Array, object_embeds: jax.Array, token_idx: jax.Array,
                token_valid: jax.Array) -> jax.Array:
        """Post-fusion: the text-encoder output with each valid object fused at its token."""
        return self.postfuse_module(text_embeds, object_embeds, token_idx, token_valid)


def load_model(path: str, base_dir: str | None = None, clip_dir: str | None = None,
               layout: str | None = None) -> FaceDiffuserModel:
    """A leffa_jax SDM/TDM folder (`python -m leffa_jax.convert face-diffuser ...`), or an
    official `pytorch_model.bin`/`.safetensors` read directly (needs `base_dir`, the SD1.5
    folder, and for the SDM optionally `clip_dir`). `layout` ("sdm"/"tdm") is checked."""
    path = os.fspath(path)
    if os.path.isdir(path):
        meta, flat = weights_folder.read_flax_checkpoint(path)
        found = weights_folder.checkpoint_components(meta)
        config_dir = os.path.join(path, weights_folder.CONFIG_FOLDER)
        return _build(found, flat, config_dir, path, layout)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"Face-diffuser checkpoint {path} does not exist: give the "
                                      "converted folder or the released pytorch_model.bin")
    if base_dir is None:
        raise CheckpointError(f"{path} is an official checkpoint file: its configs come from the "
                              "SD1.5 base folder (--base), or convert it first with "
                              "`python -m leffa_jax.convert face-diffuser`")
    source_layout = fd_plan.detect_layout(fd_plan.TensorSource(path).keys())
    with tempfile.TemporaryDirectory(prefix="leffa_jax_fd-") as staging:
        source = fd_plan.TensorSource(path)
        prefix = "module." if all(k.startswith("module.") for k in source.keys()) else ""
        fd_plan.stage_configs(staging, base_dir, source_layout, clip_dir,
                              fd_plan._postfuse_dim(source, prefix))
        plan = fd_plan.plan_official(path, staging, source_layout)
        flat = plan.read_params()
        return _build(plan.components, flat, staging, path, layout)


def _build(found: dict, flat: dict, config_dir: str, path: str, layout: str | None
           ) -> FaceDiffuserModel:
    names = set(found)
    is_sdm = "postfuse_module" in names
    want = {c.name for c in (fd_plan.SDM if is_sdm else fd_plan.TDM)}
    if names != want:
        raise CheckpointError(f"{path}: components {sorted(names)} are not a Face-diffuser SDM or "
                              "TDM checkpoint")
    if layout is not None and layout != ("sdm" if is_sdm else "tdm"):
        other = "TDM (text-only)" if is_sdm is False else "SDM (subject)"
        raise CheckpointError(f"{path} is a Face-diffuser {other} checkpoint, but a "
                              f"{layout.upper()} is needed here: check the --sdm / --tdm order")
    modules = {name: module_from_flat(found[name], config_dir,
                                      weights_folder.split_params(flat, name))
               for name in sorted(names)}
    return FaceDiffuserModel(modules)


@dataclasses.dataclass
class Base:
    """What the SD1.5 base folder gives at inference: its VAE (decoder), tokenizer and
    scheduler config."""

    vae: nnx.Module
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    path: str


def load_base(path: str) -> Base:
    """The SD1.5 base: a diffusers folder (vae/ weights, tokenizer/, scheduler/) or its leffa_jax
    conversion. Only the VAE is read."""
    from leffa_jax.systems.text2image_model import load_tokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"base folder {path} does not exist: give the Stable "
                                      "Diffusion 1.5 diffusers folder (vae/, tokenizer/, "
                                      "scheduler/)")
    if os.path.isfile(os.path.join(path, weights_folder.META_FILE)):
        meta, flat = weights_folder.read_flax_checkpoint(path)
        found = weights_folder.checkpoint_components(meta)
        if "vae" not in found:
            raise CheckpointError(f"{path}: no vae component; the base must hold SD1.5's VAE")
        config_dir = os.path.join(path, weights_folder.CONFIG_FOLDER)
        vae = module_from_flat(found["vae"], config_dir, weights_folder.split_params(flat, "vae"))
    else:
        component = components_lib.Component("vae", "vae", role="autoencoder")
        plan = plans.plan_folder(path, (component,))
        config_dir = path
        vae = module_from_flat(plan.components["vae"], path,
                               weights_folder.split_params(plan.read_params(), "vae"))
    for sub in ("tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(config_dir, sub)):
            raise CheckpointError(f"{path}: no {sub}/ folder; the SD1.5 base folder has it")
    with open(os.path.join(config_dir, "scheduler", "scheduler_config.json")) as f:
        scheduler_config = json.load(f)
    return Base(vae, load_tokenizer(os.path.join(config_dir, "tokenizer")), scheduler_config, path)


class Sampler(nnx.Module):
    """The modules sampling reads: the SDM's encoders, postfuse and UNet, the TDM's UNet and the
    base VAE (one nnx graph, so one split/merge per compiled program)."""

    def __init__(self, sdm: FaceDiffuserModel, tdm_unet: nnx.Module, vae: nnx.Module):
        self.text_encoder = sdm.text_encoder
        self.image_encoder = sdm.image_encoder
        self.postfuse_module = sdm.postfuse_module
        self.sdm_unet = sdm.unet
        self.tdm_unet = tdm_unet
        self.vae = vae

    def sdm(self) -> FaceDiffuserModel:
        return FaceDiffuserModel({"text_encoder": self.text_encoder,
                                  "image_encoder": self.image_encoder,
                                  "postfuse_module": self.postfuse_module, "unet": self.sdm_unet})


@dataclasses.dataclass
class FaceDiffuser:
    """A loaded Face-diffuser: models, the tokenizer with `<|image|>` and the scheduler config."""

    models: Sampler
    tokenizer: CLIPTokenizer           # the base tokenizer (null and text-only prompts)
    image_tokenizer: CLIPTokenizer     # the same with IMAGE_TOKEN added
    image_token_id: int
    scheduler_config: dict


def load_face_diffuser(sdm: str, tdm: str, base: str, clip_dir: str | None = None
                       ) -> FaceDiffuser:
    """SDM and TDM (converted folders or official files) + the SD1.5 base folder."""
    base_parts = load_base(base)
    sdm_model = load_model(sdm, base, clip_dir, layout="sdm")
    tdm_model = load_model(tdm, base, None, layout="tdm")
    return assemble(sdm_model, tdm_model.unet, base_parts.vae, base_parts.tokenizer,
                    base_parts.scheduler_config)


def assemble(sdm: FaceDiffuserModel, tdm_unet, vae, tokenizer: CLIPTokenizer,
             scheduler_config: dict) -> FaceDiffuser:
    image_tokenizer, token_id = add_image_token(tokenizer)
    return FaceDiffuser(Sampler(sdm, tdm_unet, vae), tokenizer, image_tokenizer, token_id,
                        dict(scheduler_config))


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def add_image_token(tokenizer: CLIPTokenizer, token: str = IMAGE_TOKEN
                    ) -> tuple[CLIPTokenizer, int]:
    """A copy of `tokenizer` with `token` added as a special token at the next free id
    (transformers' `add_tokens([token], special_tokens=True)`: 49408 for SD1.5)."""
    if token in tokenizer.tokens_to_ids:
        return tokenizer, tokenizer.tokens_to_ids[token]
    token_id = max(max(tokenizer.encoder.values()), *(t.id for t in tokenizer.added_tokens)) + 1
    merges = sorted(tokenizer.merge_ranks, key=tokenizer.merge_ranks.get)
    names = {"bos_token": tokenizer.bos_token_id, "eos_token": tokenizer.eos_token_id,
             "unk_token": tokenizer.unk_token_id, "pad_token": tokenizer.pad_token_id}
    by_id = {**tokenizer.decoder, **{t.id: t.content for t in tokenizer.added_tokens}}
    added = [*tokenizer.added_tokens, AddedToken(token, token_id)]
    new = CLIPTokenizer(tokenizer.encoder, merges, model_max_length=tokenizer.model_max_length,
                        added_tokens=added, **{k: by_id[v] for k, v in names.items()})
    return new, token_id


class PromptInputs(NamedTuple):
    """Token ids of one caption (numpy): input_ids (77,) clean ids; image_token_mask (77,) bool;
    image_token_idx (K,) positions zero-padded; image_token_idx_mask (K,) bool; num_objects;
    text_only_ids, null_ids (77,) from the base tokenizer; raw_ids: ids with the markers."""

    input_ids: np.ndarray
    image_token_mask: np.ndarray
    image_token_idx: np.ndarray
    image_token_idx_mask: np.ndarray
    num_objects: int
    text_only_ids: np.ndarray
    null_ids: np.ndarray
    raw_ids: np.ndarray


def text_only_prompt(caption: str) -> str:
    """The caption with every marker removed (double spaces kept), as `inference.py:115`."""
    return caption.replace(IMAGE_TOKEN, "")


def mask_image_tokens(raw_ids: Sequence[int], image_token_id: int, pad_id: int,
                      length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(clean ids (length,), mask (length,)): markers dropped, each marking the token before
    it; truncated (EOS not re-inserted) or padded with `pad_id` (official data.py:72-104)."""
    clean: list[int] = []
    mask: list[bool] = []
    for token in raw_ids:
        if token == image_token_id:
            if clean:
                mask[-1] = True
        else:
            clean.append(int(token))
            mask.append(False)
    clean, mask = clean[:length], mask[:length]
    pad = length - len(clean)
    return (np.asarray(clean + [pad_id] * pad, np.int64),
            np.asarray(mask + [False] * pad, bool))


def token_index(mask: np.ndarray, max_num_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """(image_token_idx (K,), valid (K,)) with K = max(max_num_objects, #tokens): positions of
    the mask, zero-padded (official prepare_image_token_idx; not truncated)."""
    positions = np.flatnonzero(mask)
    k = max(int(max_num_objects), len(positions))
    idx = np.zeros((k,), np.int64)
    idx[:len(positions)] = positions
    return idx, np.arange(k) < len(positions)


def prompt_inputs(pipe_or_tokenizers, caption: str, max_num_objects: int = 0) -> PromptInputs:
    """Token ids of a caption with `<|image|>` markers; see the module docstring."""
    tokenizer, image_tokenizer, token_id = _tokenizers(pipe_or_tokenizers)
    raw = image_tokenizer.encode(caption)
    ids, mask = mask_image_tokens(raw, token_id, image_tokenizer.pad_token_id)
    idx, valid = token_index(mask, max_num_objects)
    text_only = tokenizer(text_only_prompt(caption))["input_ids"][0]
    null = tokenizer("")["input_ids"][0]
    return PromptInputs(ids, mask, idx, valid, int(valid.sum()), text_only, null,
                        np.asarray(raw, np.int64))


def _tokenizers(obj):
    if isinstance(obj, FaceDiffuser):
        return obj.tokenizer, obj.image_tokenizer, obj.image_token_id
    image_tokenizer, token_id = add_image_token(obj)
    return obj, image_tokenizer, token_id


# --------------------------------------------------------------------------------------------
# Subject images
# --------------------------------------------------------------------------------------------


def antialias_weights(in_size: int, out_size: int) -> np.ndarray:
    """torch `interpolate(mode="bilinear", antialias=True, align_corners=False)` weights as a
    dense (out_size, in_size) float32 matrix (`imageio.antialias_taps`)."""
    idx, taps = antialias_taps(in_size, out_size)
    out = np.zeros((out_size, in_size), np.float32)
    np.add.at(out, (np.arange(out_size)[:, None], idx), taps)  # padded taps add 0
    return out


def resize_antialias(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) float -> (B, h, w, C), torch's antialiased bilinear (width pass, then
    height); the identity when the size already matches."""
    _, h, w, _ = x.shape
    if (h, w) == tuple(size):
        return x
    hi = jax.lax.Precision.HIGHEST
    if w != size[1]:
        x = jnp.einsum("ow,bhwc->bhoc", jnp.asarray(antialias_weights(w, size[1])), x, precision=hi)
    if h != size[0]:
        x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(antialias_weights(h, size[0])), x, precision=hi)
    return x


def subject_pixels(images: Sequence[np.ndarray], resolution: int) -> np.ndarray:
    """Subject photos (H, W, 3) uint8 -> (K, R, R, 3) float32 in [0, 1]: PadToSquare, uint8
    Resize((R, R)) (torchvision's bilinear antialias in float32, rounded:
    `imageio.resize_bilinear`), / 255."""
    out = []
    for k, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"subject {k}: expected an RGB uint8 image (H, W, 3), got "
                             f"{image.dtype} {image.shape}")
        x = resize_bilinear(pad_to_square(image), (resolution, resolution))
        out.append(x.astype(np.float32) / np.float32(255.0))
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# Sampling core (traceable)
# --------------------------------------------------------------------------------------------


# observe(model name "tdm" / "sdm", t, eps_uncond (B, h, w, 4), eps_cond): a host callback run
# after every UNet call of the sampler (jax.debug.callback; for tests and diagnostics).
Observer = Callable[[str, Any, Any, Any], None]


def guided(unet, x, t, context, scale, compute_dtype=_F32, attention_kernel="xla",
           observe: Observer | None = None, name: str = ""):
    """One model's CFG over its two branches (context (2B, 77, D) sample-major [uncond, cond])
    -> (guided eps, guidance delta), both (B, h, w, 4) float32."""
    x_in = guidance_lib.repeat_branches(x, 2).astype(compute_dtype)
    eps = unet(x_in, t, context.astype(compute_dtype), attention_kernel=attention_kernel
               ).sample.astype(_F32)
    eps_u, eps_c = guidance_lib.split_branches(eps, 2)
    if observe is not None:
        jax.debug.callback(functools.partial(observe, name), t, eps_u, eps_c)
    return (guidance_lib.classifier_free_guidance(eps_u, eps_c, scale),
            guidance_lib.guidance_delta(eps_u, eps_c, scale))


def _stacked_pair(unet_a, unet_b, x, t, contexts, scale, compute_dtype, attention_kernel):
    """Both models in ONE call: the UNet vmapped over the stacked parameters of a and b."""
    graphdef, state_a = nnx.split(unet_a)
    _, state_b = nnx.split(unet_b)
    stacked = jax.tree.map(lambda p, q: jnp.stack([p, q]), state_a, state_b)

    def one(state, context):
        return guided(nnx.merge(graphdef, state), x, t, context, scale, compute_dtype,
                      attention_kernel)

    eps, delta = jax.vmap(one)(stacked, jnp.stack(contexts))
    return (eps[0], delta[0]), (eps[1], delta[1])


def snf_stages(tdm_unet, sdm_unet, guidance_scale, merge_start: int, merge_end: int, *,
               compute_dtype=_F32, attention_kernel: str = "xla", stage2: str = "two_calls",
               observe: Observer | None = None) -> Stages:
    """Face-diffuser's noise function over loop steps i (0 .. K - 1 of the stepper):
    i <= merge_start TDM, merge_start < i <= merge_end SNF of both, later SDM. conditions =
    (E_T (2B, 77, D) [null, text], E_S (2B, 77, D) [text, augmented]), sample-major. Works with
    any two UNets (noise predictors) and any latent size."""
    if stage2 not in ("two_calls", "stacked"):
        raise ValueError(f"stage2 must be 'two_calls' or 'stacked', got {stage2!r}")
    opts = dict(compute_dtype=compute_dtype, attention_kernel=attention_kernel, observe=observe)

    def predict_tdm(x, t, conditions):
        return guided(tdm_unet, x, t, conditions[0], guidance_scale, name="tdm", **opts)

    def predict_sdm(x, t, conditions):
        return guided(sdm_unet, x, t, conditions[1], guidance_scale, name="sdm", **opts)

    stages = guidance_lib.two_model_fusion(predict_tdm, predict_sdm, merge_start, merge_end)
    if stage2 == "two_calls":
        return stages

    def fused(x, t, conditions):
        a, b = _stacked_pair(tdm_unet, sdm_unet, x, t, conditions, guidance_scale,
                             compute_dtype, attention_kernel)
        return guidance_lib.saliency_fusion(*a, *b)

    return Stages(stages.starts, (stages.eps_fns[0], fused, stages.eps_fns[2]))


def stage_of_steps(num_steps: int, merge_start: int, merge_end: int) -> np.ndarray:
    """(K,) int8 stage per loop step: 1 TDM, 2 SNF, 3 SDM (the fixtures' `stage`)."""
    i = np.arange(num_steps)
    return np.where(i <= merge_start, 1, np.where(i <= merge_end, 2, 3)).astype(np.int8)


def encode_prompts(models: Sampler, ids: jax.Array, objects: jax.Array, token_idx: jax.Array,
                   token_valid: jax.Array, dtype=_F32):
    """ids (3, 77) [null, text-only, clean], objects (1, K, R, R, 3) -> (null, text, augmented)
    each (1, 77, D) float32, all from the SDM's text encoder."""
    sdm = models.sdm()
    hidden = sdm.encode_text(ids, dtype).astype(_F32)
    object_embeds = sdm.encode_objects(objects, dtype).astype(_F32)
    aug = sdm.augment(hidden[2:3], object_embeds, token_idx[None], token_valid[None])
    return hidden[0:1], hidden[1:2], aug.astype(_F32), object_embeds


def conditions_for(null, text, aug, num_images: int):
    """(E_T, E_S), each (2n, 77, D) sample-major: TDM [null, text], SDM [text, aug]."""
    rep = lambda e: jnp.repeat(e, num_images, axis=0)  # noqa: E731
    null, text, aug = rep(null), rep(text), rep(aug)
    return (guidance_lib.interleave_branches(null, text),
            guidance_lib.interleave_branches(text, aug))


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


class FaceDiffuserOutput(NamedTuple):
    """images (n, H, W, 3) uint8; decoded (n, H, W, 3) float32 VAE output in [-1, 1];
    latents (K, n, h, w, 4) after every loop step or None; masks {loop step: (n, h, w) bool,
    True = SDM's prediction} of stage 2 or None; timesteps (K,); stage (K,) 1/2/3; branches
    (`branch_outputs`) or None; null / text / augmented prompt embeddings (1, 77, D)."""

    images: np.ndarray
    decoded: np.ndarray
    latents: np.ndarray | None
    masks: dict[int, np.ndarray] | None
    timesteps: np.ndarray
    stage: np.ndarray
    branches: list[dict] | None = None
    null_embeds: np.ndarray | None = None
    text_embeds: np.ndarray | None = None
    augmented_embeds: np.ndarray | None = None


_SCHEDULER_CLASSES = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                      "DPMSolverMultistepScheduler": "dpmpp_2m", "UniPCMultistepScheduler": "unipc",
                      "DEISMultistepScheduler": "deis"}


def stepper_from_config(scheduler_config: dict, name: str | None, steps: int, **options
                        ) -> Stepper:
    """The stepper `name` (None: the config's class; SD1.5 ships PNDM) configured as diffusers'
    `XScheduler.from_config(config)` (the config's values; `options` win)."""
    if name is None:
        name = _SCHEDULER_CLASSES.get(scheduler_config.get("_class_name"), "pndm")
    if name not in STEPPERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(STEPPERS)}")
    config = dict(scheduler_config)
    if name == "pndm":
        config.setdefault("set_alpha_to_one", False)
    schedule = make_schedule(config)
    found = {k: v for k, v in config.items() if k in STEPPERS[name].defaults and v is not None}
    return make_stepper(name, schedule, int(steps), **{**found, **options})


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype"))
def encode(graphdef, state, ids, objects, token_idx, token_valid, dtype=_F32):
    """Compiled `encode_prompts` of a split `Sampler` -> (null, text, aug, object_embeds)."""
    models = nnx.merge(graphdef, state)
    return encode_prompts(models, ids, objects, token_idx, token_valid, dtype)


class LoopOptions(NamedTuple):
    """Static options of the sampling program (part of its jit cache key)."""

    merge_start: int
    merge_end: int
    compute_dtype: Any = _F32
    attention_kernel: str = "xla"
    stage2: str = "two_calls"
    observe: Observer | None = None


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def sample_latents(graphdef, state, conditions, init_noise, stepper, scale, progress,
                   opts: LoopOptions):
    """The compiled SNF loop: (x_0, latents after every step (K, n, h, w, 4)). graphdef/state:
    `nnx.split` of a `Sampler`; conditions from `conditions_for`."""
    models = nnx.merge(graphdef, state)
    stages = snf_stages(models.tdm_unet, models.sdm_unet, scale, opts.merge_start,
                        opts.merge_end, compute_dtype=opts.compute_dtype,
                        attention_kernel=opts.attention_kernel, stage2=opts.stage2,
                        observe=opts.observe)
    return denoise(stepper, stages, init_noise, conditions, return_latents=True,
                   progress=progress)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def decode(graphdef, state, x):
    """Latents (n, h, w, 4) -> (uint8 images, float32 decoded) with the base VAE."""
    models = nnx.merge(graphdef, state)
    decoded = models.vae.decode(x / models.vae.config.scaling_factor).astype(_F32)
    return to_uint8(decoded), decoded


class _Recorder:
    """The sampler's one observer: while a `generate` call records (`recording()`), every UNet
    call's branch outputs are copied to the host. One object, so recording or not compiles the
    same program; calls that record are serialised by a lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._target: list | None = None

    def __call__(self, name, t, eps_u, eps_c):
        target = self._target
        if target is not None:
            target.append((name, int(t), np.asarray(eps_u), np.asarray(eps_c)))

    @contextlib.contextmanager
    def recording(self, enabled: bool = True):
        if not enabled:
            yield None
            return
        with self._lock:
            self._target = []
            try:
                yield self._target
            finally:
                jax.effects_barrier()
                self._target = None


RECORDER = _Recorder()


def branch_outputs(records, stepper_timesteps: np.ndarray, stage: np.ndarray) -> list[dict]:
    """Recorded UNet calls -> per loop step {"tdm": (eps_u, eps_c), "sdm": (eps_u, eps_c)}
    (each (n, h, w, 4)), assigned in call order to the steps whose stage runs that model."""
    queues = {"tdm": [r for r in records if r[0] == "tdm"],
              "sdm": [r for r in records if r[0] == "sdm"]}
    out = []
    for i, st in enumerate(stage):
        step = {}
        for name in (("tdm",) if st == 1 else ("tdm", "sdm") if st == 2 else ("sdm",)):
            if not queues[name]:
                raise RuntimeError(f"no recorded {name} call for loop step {i}")
            _, t, eps_u, eps_c = queues[name].pop(0)
            if t != int(stepper_timesteps[i]):
                raise RuntimeError(f"recorded {name} call at t={t} for step {i} "
                                   f"(t={int(stepper_timesteps[i])})")
            step[name] = (eps_u, eps_c)
        out.append(step)
    return out


def fusion_masks(branches: list[dict], guidance_scale: float) -> dict[int, np.ndarray]:
    """{loop step: (n, h, w) bool, True = SDM} of the stage-2 steps, from recorded branches."""
    masks = {}
    for i, step in enumerate(branches):
        if "tdm" in step and "sdm" in step:
            d_t = guidance_lib.guidance_delta(*map(jnp.asarray, step["tdm"]), guidance_scale)
            d_s = guidance_lib.guidance_delta(*map(jnp.asarray, step["sdm"]), guidance_scale)
            masks[i] = np.asarray(guidance_lib.saliency_mask(d_t, d_s))[..., 0]
    return masks


def _check_inputs(prompt: PromptInputs, subjects, steps, merge_start, merge_end, guidance,
                  height, width, factor):
    if prompt.num_objects == 0:
        raise ValueError(f"the prompt has no {IMAGE_TOKEN} marker: put one after each subject's "
                         f"noun, e.g. 'a man {IMAGE_TOKEN} and a woman {IMAGE_TOKEN} at the "
                         "beach'")
    if len(subjects) < prompt.num_objects:
        raise ValueError(f"the prompt has {prompt.num_objects} {IMAGE_TOKEN} markers but "
                         f"{len(subjects)} subject images were given: give one image per marker, "
                         "in order")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= merge_start <= merge_end:
        raise ValueError(f"need 0 <= merge_start <= merge_end, got {merge_start}, {merge_end}")
    if not guidance > 1.0:
        raise ValueError(f"guidance must be > 1 (the official sampler asserts it; SNF compares "
                         f"the two guidance deltas), got {guidance}")
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"height x width {height}x{width} must be positive multiples of "
                         f"{factor} (the VAE's downsampling factor)")


def generate(pipe: FaceDiffuser, prompt: str, subjects: Sequence[np.ndarray], *,
             steps: int = 50, guidance: float = 5.0, merge_start: int = 15, merge_end: int = 30,
             height: int = 512, width: int = 512, num_images: int = 1, seed: int = 0,
             init_noise=None, scheduler: str | None = None, object_resolution: int = 512,
             return_latents: bool = False, return_masks: bool = False, dtype: str = "float32",
             attention_kernel: str = "xla", stage2: str = "two_calls",
             return_branches: bool = False,
             progress: Callable[[int], None] | None = None) -> FaceDiffuserOutput:
    """Face-diffuser sampling (the official `inference.py` + SNF sampler). subjects: RGB uint8
    photos, the k-th for the k-th `<|image|>` (extra ones unused). merge_start / merge_end:
    loop-step indices (PNDM: 0 .. steps). init_noise: (n, h, w, 4) to replay, else from
    `seed`. return_masks: the stage-2 fusion masks; return_branches: every UNet call's branch
    outputs per loop step (both recorded from the loop on the host, no extra model calls)."""
    prompt_ids = prompt_inputs(pipe, prompt)
    factor = pipe.models.vae.downsample_factor
    _check_inputs(prompt_ids, subjects, steps, merge_start, merge_end, guidance, height, width,
                  factor)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    compute = DTYPES[dtype]
    objects = subject_pixels(list(subjects)[:prompt_ids.num_objects], int(object_resolution))
    shape = (int(num_images), height // factor, width // factor,
             pipe.models.sdm_unet.config.in_channels)
    if init_noise is None:
        noise = np.asarray(jax.random.normal(jax.random.key(seed), shape, _F32))
    else:
        noise = np.asarray(init_noise, np.float32)
        if noise.shape != shape:
            raise ValueError(f"init_noise has shape {noise.shape}, expected NHWC {shape}")
    stepper = stepper_from_config(pipe.scheduler_config, scheduler, steps)
    graphdef, state = nnx.split(pipe.models)
    ids = np.stack([prompt_ids.null_ids, prompt_ids.text_only_ids, prompt_ids.input_ids])
    null, text, aug, _ = encode(graphdef, state, jnp.asarray(ids, jnp.int32),
                                 jnp.asarray(objects[None]),
                                 jnp.asarray(prompt_ids.image_token_idx, jnp.int32),
                                 jnp.asarray(prompt_ids.image_token_idx_mask), compute)
    conditions = conditions_for(null, text, aug, int(num_images))
    scale = jnp.float32(guidance)
    record = return_masks or return_branches
    with progress_reporting(progress) as progress_id, RECORDER.recording(record) as records:
        opts = LoopOptions(int(merge_start), int(merge_end), compute, attention_kernel, stage2,
                           RECORDER)
        x, latents = sample_latents(graphdef, state, conditions, jnp.asarray(noise), stepper,
                                    scale, progress_id, opts=opts)
        images, decoded = decode(graphdef, state, x)
        images, decoded, latents = np.asarray(images), np.asarray(decoded), np.asarray(latents)
    timesteps = np.asarray(stepper.timesteps, np.int64)
    stage = stage_of_steps(stepper.num_steps, merge_start, merge_end)
    branches = masks = None
    if records is not None:
        branches = branch_outputs(records, timesteps, stage)
        masks = fusion_masks(branches, float(guidance)) if return_masks else None
    return FaceDiffuserOutput(images, decoded, latents if return_latents else None, masks,
                              timesteps, stage, branches if return_branches else None,
                              np.asarray(null), np.asarray(text), np.asarray(aug))


def __getattr__(name: str) -> Any:
    """The training Tasks live in face_diffuser_train.py (imported when first asked for)."""
    if name in ("SubjectModelTask", "TextModelTask"):
        from leffa_jax.systems import face_diffuser_train

        return getattr(face_diffuser_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
