"""Text-to-image sampling: Stable Diffusion 1.5 and SDXL, following diffusers' (0.42)
`StableDiffusionPipeline` / `StableDiffusionXLPipeline` step by step, on the shared sampling core.

1. Prompts -> token ids on the host (`leffa_jax.text.CLIPTokenizer`, padded / truncated to 77).
   SD1.5: context = text_encoder(ids).last_hidden_state (clip_skip k: final_layer_norm of
   hidden_states[-(k + 1)]). SDXL: context = concat(hidden_states[-2] of text_encoder and of
   text_encoder_2) (clip_skip k: [-(k + 2)]); pooled = text_encoder_2's projected pooled output;
   time_ids = original size (h, w) + crop top-left (y, x) + target size (h, w), per branch.
2. Classifier-free guidance when guidance > 1: both branches in one UNet call, sample-major
   (`sampling.guidance`). A missing negative prompt is "" (SD1.5), or for SDXL with
   `force_zeros_for_empty_prompt` (model_index.json, default on) all-zero context and pooled
   embeddings, as diffusers. guidance_rescale phi > 0: `rescale_noise_cfg`.
3. `loop.denoise` with any registered stepper (default: the folder's scheduler class when it is
   one of them, else dpmpp_2m); options and the defaults diffusers' `XScheduler.from_config` would
   use are taken from the folder's scheduler config (`stepper_for`).
4. images = to_uint8(D(x / scaling_factor)), the VAE in `vae_dtype` (float32 by default).

One `jax.jit` program (encode, loop, decode) keyed on shapes, stepper and `_Options`; with several
local devices and a batch that divides, the batch is sharded over them. Random draws: `init_noise`
(B, h, w, 4) NHWC replays a run (diffusers' `latents=` is its NCHW transpose); else drawn from
`seed`. Ancestral steppers (ddpm) take `step_noise` (K, B, h, w, 4) or draw per step from `seed`.
Imports neither torch nor transformers nor diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import sharding
from leffa_jax.imageio import to_uint8
from leffa_jax.pipeline import cast_params
from leffa_jax.sampling import guidance as guidance_lib
from leffa_jax.sampling.loop import batch_mesh, denoise, progress_reporting, shard_batch
from leffa_jax.sampling.steppers import STEPPERS, Stepper, make_stepper
from leffa_jax.schedulers import schedule_for_model
from leffa_jax.systems.text2image_model import (
    TEXT2IMAGE,
    TextToImage,
    TextToImageModel,
    load_text2image,
)

__all__ = ["Text2ImageOutput", "TextToImage", "load_text2image", "generate", "stepper_for",
           "encode_text", "text2image_eps_fn", "time_ids_for", "SCHEDULER_CLASSES"]

_F32 = jnp.float32
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# diffusers scheduler class -> stepper; and the config defaults of each class that differ from
# `make_schedule`'s (diffusers fills keys missing from a config with the class's own defaults).
SCHEDULER_CLASSES = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
                     "DPMSolverMultistepScheduler": "dpmpp_2m", "DEISMultistepScheduler": "deis",
                     "UniPCMultistepScheduler": "unipc"}
_CLASS_DEFAULTS = {"ddpm": {}, "ddim": {}, "pndm": {"set_alpha_to_one": False},
                   "dpmpp_2m": {"timestep_spacing": "linspace"},
                   "deis": {"timestep_spacing": "linspace"},
                   "unipc": {"timestep_spacing": "linspace"}}
# sigma spacings of the multistep schedulers that the steppers do not implement.
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


class Text2ImageOutput(NamedTuple):
    """images (B, H, W, 3) uint8; latents (K, B, h, w, 4) float32 after each model evaluation
    (return_latents) or None; decoded (B, H, W, 3) float32 VAE output; timesteps (K,) int64."""

    images: np.ndarray
    latents: np.ndarray | None
    decoded: np.ndarray
    timesteps: np.ndarray


# --------------------------------------------------------------------------------------------
# Stepper from the folder's scheduler config
# --------------------------------------------------------------------------------------------


class _ScheduleSource:
    """What `schedulers.schedule_for_model` reads: the (completed) scheduler config."""

    def __init__(self, config: dict, config_dir: str):
        self.config, self.config_dir = config, config_dir

    def scheduler_config(self) -> dict:
        return self.config


def stepper_for(system: TextToImage, name: str | None, steps: int, **options) -> Stepper:
    """The stepper `name` (None: the folder's scheduler class if registered, else dpmpp_2m) for
    `steps`, configured as diffusers' `XScheduler.from_config(folder config)`: the config's
    values, the class's defaults for keys it lacks; keyword `options` win."""
    config = dict(system.scheduler_config)
    if name is None:
        name = SCHEDULER_CLASSES.get(config.get("_class_name"), "dpmpp_2m")
    if name not in STEPPERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(STEPPERS)}")
    unsupported = [k for k in _UNSUPPORTED if config.get(k)]
    if name == "unipc" and config.get("predict_x0", True) is not True:
        unsupported.append("predict_x0")
    if name in ("dpmpp_2m", "unipc", "deis") and unsupported:
        raise ValueError(f"scheduler config {', '.join(f'{k}={config[k]!r}' for k in unsupported)}"
                         f": not supported by the {name!r} stepper; choose another --scheduler")
    if name == "dpmpp_2m" and config.get("solver_order", 2) != 2:
        raise ValueError(f"scheduler config solver_order={config['solver_order']}: the dpmpp_2m "
                         "stepper is second order")
    for key, value in _CLASS_DEFAULTS[name].items():
        config.setdefault(key, value)
    found = {k: v for k, v in config.items() if k in STEPPERS[name].defaults and v is not None}
    # diffusers' own default: the config's flag, else off (not Leffa's SDXL rule)
    schedule = schedule_for_model(_ScheduleSource(config, system.model.config_dir),
                                  rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr")))
    return make_stepper(name, schedule, steps, **{**found, **options})


# --------------------------------------------------------------------------------------------
# Traceable pieces
# --------------------------------------------------------------------------------------------


def encode_text(model: TextToImageModel, ids: dict[str, jax.Array], dtype=_F32,
                clip_skip: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """ids {encoder name: (B, 77) int} -> (context (B, 77, D), pooled (B, P) or None for SD1.5)."""
    if not model.sdxl:
        encoder = model.text_encoder
        if clip_skip is None:
            return encoder(ids["text_encoder"], dtype=dtype).last_hidden_state, None
        out = encoder(ids["text_encoder"], output_hidden_states=True, dtype=dtype)
        return encoder.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)]), None
    parts, pooled = [], None
    for name in model.encoder_names:
        out = getattr(model, name)(ids[name], output_hidden_states=True, dtype=dtype)
        if pooled is None and out.text_embeds is not None:
            pooled = out.text_embeds
        parts.append(out.hidden_states[-(2 if clip_skip is None else clip_skip + 2)])
    return jnp.concatenate(parts, axis=-1), pooled


def text2image_eps_fn(model: TextToImageModel, guidance_scale, phi=None, *, cfg: bool = True,
                      compute_dtype=_F32, attention_kernel: str = "xla"):
    """eps_fn(x (B, h, w, 4), t, (context, pooled, time_ids) with 2B rows sample-major [neg,
    pos] when `cfg`, else B) -> guided eps (B, h, w, 4) float32."""
    branches = 2 if cfg else 1

    def eps_fn(x, t, conditions):
        context, pooled, time_ids = conditions
        added = {} if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        x_in = guidance_lib.repeat_branches(x, branches).astype(compute_dtype)
        eps = model.unet(x_in, t, context.astype(compute_dtype), attention_kernel=attention_kernel,
                         **added).sample.astype(_F32)
        if not cfg:
            return eps
        eps_uncond, eps_cond = guidance_lib.split_branches(eps, 2)
        return guidance_lib.classifier_free_guidance(eps_uncond, eps_cond, guidance_scale, phi)

    return eps_fn


@dataclasses.dataclass(frozen=True)
class _EncodeOptions:
    """Static options of the text-encoding program (part of its jit cache key)."""

    cfg: bool
    zero_negative: bool
    clip_skip: int | None
    compute_dtype: Any


@dataclasses.dataclass(frozen=True)
class _LoopOptions:
    """Static options of the denoising program (part of its jit cache key)."""

    cfg: bool
    rescale: bool
    compute_dtype: Any
    attention_kernel: str


def _merge(graphdef, state, compute_dtype, vae_dtype=_F32) -> TextToImageModel:
    """The model with floating params cast once per call (the VAE to vae_dtype)."""
    return nnx.merge(graphdef, cast_params(state, compute_dtype, vae_dtype, TEXT2IMAGE))


def _conditions(model, ids, negative_ids, time_ids, opts: _EncodeOptions):
    """(context, pooled, time_ids) of the UNet's branches, sample-major [neg, pos] with CFG."""
    dtype = opts.compute_dtype
    if not opts.cfg:
        context, pooled = encode_text(model, ids, dtype, opts.clip_skip)
        return context, pooled, time_ids[:, 1]
    if opts.zero_negative:
        context, pooled = encode_text(model, ids, dtype, opts.clip_skip)
        negative = (jnp.zeros_like(context), None if pooled is None else jnp.zeros_like(pooled))
    else:
        both = {k: jnp.concatenate([negative_ids[k], ids[k]]) for k in ids}
        context_both, pooled_both = encode_text(model, both, dtype, opts.clip_skip)
        b = context_both.shape[0] // 2
        context, negative_context = context_both[b:], context_both[:b]
        pooled = None if pooled_both is None else pooled_both[b:]
        negative = (negative_context, None if pooled_both is None else pooled_both[:b])
    interleave = guidance_lib.interleave_branches
    pooled = None if pooled is None else interleave(negative[1], pooled)
    return interleave(negative[0], context), pooled, interleave(time_ids[:, 0], time_ids[:, 1])


# Three compiled programs (encode, loop, decode): changing the stepper recompiles the loop only.
# The loop always keeps the latents of every step (K x a latent: small); `generate` fetches them
# only when asked, so return_latents does not recompile.
@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _encode(graphdef, state, ids, negative_ids, time_ids, opts: _EncodeOptions):
    model = _merge(graphdef, state, opts.compute_dtype)
    return _conditions(model, ids, negative_ids, time_ids, opts)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _denoise(graphdef, state, conditions, init_noise, step_noise, noise_key, stepper,
             guidance_scale, phi, progress, opts: _LoopOptions):
    model = _merge(graphdef, state, opts.compute_dtype)
    eps_fn = text2image_eps_fn(model, guidance_scale, phi if opts.rescale else None, cfg=opts.cfg,
                               compute_dtype=opts.compute_dtype,
                               attention_kernel=opts.attention_kernel)
    return denoise(stepper, eps_fn, init_noise, conditions, step_noise=step_noise,
                   noise_key=noise_key, return_latents=True, progress=progress)


@functools.partial(jax.jit, static_argnames=("graphdef", "vae_dtype"))
def _decode(graphdef, state, x, vae_dtype):
    model = _merge(graphdef, state, vae_dtype, vae_dtype)
    decoded = model.vae.decode((x / model.scaling_factor).astype(vae_dtype)).astype(_F32)
    return to_uint8(decoded), decoded


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _as_list(text, name: str, count: int | None = None) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    if count is not None and len(texts) == 1 and count > 1:
        texts = texts * count
    if count is not None and len(texts) != count:
        raise ValueError(f"{name} has {len(texts)} entries, the prompts {count}: give one, or "
                         "one per prompt")
    return texts


def _token_ids(system: TextToImage, first: list[str], second: list[str], repeat: int
               ) -> dict[str, np.ndarray]:
    """{encoder: (len * repeat, 77) int32}; text_encoder_2 reads `second` (prompt_2)."""
    out = {}
    for name, tokenizer in system.tokenizers.items():
        texts = second if name == "text_encoder_2" else first
        ids = tokenizer(texts)["input_ids"].astype(np.int32)
        out[name] = np.repeat(ids, repeat, axis=0)
    return out


def time_ids_for(height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None) -> np.ndarray:
    """SDXL micro-conditioning (2, 6) float32: rows [negative, positive] of original size +
    crop top-left + target size (diffusers: the negative row equals the positive one unless
    negative_original_size and negative_target_size are both given)."""
    original = tuple(original_size or (height, width))
    target = tuple(target_size or (height, width))
    positive = original + tuple(crops_coords_top_left) + target
    negative = positive
    if negative_original_size is not None and negative_target_size is not None:
        negative = (tuple(negative_original_size) + tuple(negative_crops_coords_top_left)
                    + tuple(negative_target_size))
    return np.asarray([negative, positive], np.float32)


def _init_noise(init_noise, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    if init_noise is None:
        return np.asarray(jax.random.normal(jax.random.key(seed), shape, _F32))
    noise = np.asarray(init_noise, np.float32)
    if noise.shape != shape:
        nchw = (shape[0], shape[3], shape[1], shape[2])
        hint = " It looks NCHW (diffusers' latents=): transpose to (B, h, w, C)." if (
            noise.shape == nchw) else ""
        raise ValueError(f"init_noise has shape {noise.shape}, expected NHWC {shape}.{hint}")
    return noise


def _check_size(system: TextToImage, height: int, width: int) -> None:
    factor = system.model.vae_factor
    if height % factor or width % factor or height < factor or width < factor:
        def near(v):
            return f"{max(factor, v // factor * factor)} or {(v // factor + 1) * factor}"

        raise ValueError(f"height x width {height}x{width} must be multiples of {factor} (the "
                         f"VAE's downsampling factor): use height {near(height)}, width "
                         f"{near(width)}")


def _dtype(name) -> Any:
    name = name if isinstance(name, str) else jnp.dtype(name).name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def generate(system: TextToImage, prompt: str | Sequence[str], *,
             negative_prompt: str | Sequence[str] | None = None,
             prompt_2: str | Sequence[str] | None = None,
             negative_prompt_2: str | Sequence[str] | None = None,
             steps: int = 30, guidance: float | None = None, guidance_rescale: float = 0.0,
             height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
             scheduler: str | None = None, stepper_options: dict | None = None, seed: int = 0,
             init_noise=None, step_noise=None, clip_skip: int | None = None,
             micro_conditioning: dict | None = None, dtype="float32", vae_dtype="float32",
             return_latents: bool = False, attention_kernel: str = "xla", shard: bool = True,
             progress: Callable[[int], None] | None = None) -> Text2ImageOutput:
    """Sample images for `prompt` (a string or a list: B = len * num_images_per_prompt, each
    prompt's images adjacent, as diffusers).

    negative_prompt: one or one per prompt (None: see the module docstring); prompt_2 /
    negative_prompt_2: SDXL's second encoder (default: the first ones). guidance: CFG scale
    (None: 7.5 SD1.5, 5.0 SDXL; <= 1: no CFG); guidance_rescale: phi (0 = off). height/width:
    multiples of the VAE factor (default: the UNet's sample_size x 8). scheduler: a stepper name
    (`STEPPERS`) or None (the folder's). init_noise: (B, h, w, 4) to replay, else from `seed`.
    micro_conditioning: SDXL `time_ids_for` keywords (original_size, crops_coords_top_left,
    target_size, negative_*). dtype: text encoders' and UNet's compute dtype; vae_dtype: the
    VAE's. progress: called with the step index after each step.
    """
    steps = int(steps)
    if steps < 1 or num_images_per_prompt < 1:
        raise ValueError("steps and num_images_per_prompt must be >= 1")
    height = int(height or system.default_size)
    width = int(width or system.default_size)
    _check_size(system, height, width)
    prompts = _as_list(prompt, "prompt")
    count, repeat = len(prompts), int(num_images_per_prompt)
    prompts_2 = prompts if prompt_2 is None else _as_list(prompt_2, "prompt_2", count)
    scale = float(guidance if guidance is not None else (5.0 if system.sdxl else 7.5))
    zero_negative = system.force_zeros_for_empty_prompt and negative_prompt is None
    negatives = _as_list(negative_prompt or "", "negative_prompt", count)
    negatives_2 = (negatives if negative_prompt_2 is None
                   else _as_list(negative_prompt_2, "negative_prompt_2", count))
    ids = _token_ids(system, prompts, prompts_2, repeat)
    negative_ids = _token_ids(system, negatives, negatives_2, repeat)
    b = count * repeat
    time_ids = np.broadcast_to(time_ids_for(height, width, **(micro_conditioning or {})), (b, 2, 6))
    factor, channels = system.model.vae_factor, system.model.unet.config.in_channels
    noise = _init_noise(init_noise, seed, (b, height // factor, width // factor, channels))
    stepper = stepper_for(system, scheduler, steps, **(stepper_options or {}))
    compute = _dtype(dtype)
    encode_opts = _EncodeOptions(cfg=scale > 1.0, zero_negative=zero_negative,
                                 clip_skip=clip_skip, compute_dtype=compute)
    loop_opts = _LoopOptions(cfg=scale > 1.0, rescale=float(guidance_rescale) > 0.0,
                             compute_dtype=compute, attention_kernel=attention_kernel)
    noise_key = None
    if not stepper.needs_noise:
        step_noise = None
    elif step_noise is not None:
        step_noise = np.asarray(step_noise, np.float32)
    else:
        noise_key = jax.random.fold_in(jax.random.key(seed), 1)
    mesh = batch_mesh(b, shard)
    graphdef, state = nnx.split(system.model)
    ids, negative_ids, time_ids, noise = shard_batch(
        (ids, negative_ids, np.ascontiguousarray(time_ids), noise), mesh)
    if step_noise is not None:
        step_noise = shard_batch(step_noise, mesh, 1)
    if mesh is not None:
        state = jax.device_put(state, sharding.replicated(mesh))
    conditions = _encode(graphdef, state, ids, negative_ids, time_ids, opts=encode_opts)
    with progress_reporting(progress) as progress_id:
        x, latents = _denoise(graphdef, state, conditions, noise, step_noise, noise_key, stepper,
                              jnp.float32(scale), jnp.float32(guidance_rescale), progress_id,
                              opts=loop_opts)
        images, decoded = _decode(graphdef, state, x, vae_dtype=_dtype(vae_dtype))
        images, decoded = np.asarray(images), np.asarray(decoded)
        latents = np.asarray(latents) if return_latents else None
    return Text2ImageOutput(images, latents, decoded, np.asarray(stepper.timesteps, np.int64))
