"""Magic Clothing (Chen et al., ACM MM 2024; github.com/ShineChen1024/MagicClothing): a person
described by a prompt, dressed in a given garment, on the shared parts.

Model (`load_magic_clothing`): a base SD1.5 folder (any fine-tune; optionally a separate VAE
folder, as the official demo's sd-vae-ft-mse) gives the frozen denoiser `unet`, `vae` and
`text_encoder`; the garment `extractor` is the same UNet class and config with the released
file's weights (`weights/plan_magic_clothing.py`; keys missing from the file keep the
denoiser's values, as officially).

Sampling (`generate`), the official `ClothAdapter.generate` step by step:
1. Garment (host): PIL LANCZOS resize to the OUTPUT (width, height), `uint8 / 127.5 - 1`, times
   the binarised mask (NEAREST resize, `> 0.5`), background 0; rounded to float16 (the official
   code's cast, on for parity: `fp16_garment`). Mask: given, else the image's alpha channel,
   else `background_mask` (product photo on a plain background, see there).
2. z_g = VAE posterior MEAN x scaling factor; the extractor runs ONCE at t = 0 with the CLIP
   embedding of the empty prompt as its cross-attention context and records the post-`norm1`
   states of every transformer block (`UNet(..., collect_features=True)`).
3. Every step runs the denoiser once on the guidance branches (sample-major on the batch axis);
   its self-attention keys/values are `[norm1(h); garment features]` (`reference_features`),
   the garment rows of an unconditional branch are ZEROS (concatenated, not omitted):
   - "joint" (768 weights): branches [neg|0, neg|g, pos|g]; eps = e_u + sT (e_t - e_c)
     + sG (e_c - e_u) (`guidance.nested_guidance`, garment first);
   - "standard" (512 weights): branches [neg|0, pos|g]; eps = e_u + sT (e_pos - e_u);
   - sT <= 1 (either mode): ONE branch pos|g, no guidance at all, sG ignored (official).
   The negative prompt is the text "uncond". `loop.denoise` with any stepper; default UniPC
   configured as `UniPCMultistepScheduler.from_config(base scheduler config)` of diffusers
   0.25.1 (the official pin), whose last step ends at sigma_min, not 0
   (`final_sigmas_type="sigma_min"`; pass stepper_options to change it).
4. images = to_uint8(D(x / scaling_factor)).

NHWC everywhere; the PyTorch/NCHW edge is only in tests and `weights/`. Float32 by default
(`dtype` for the UNets and text encoder, `vae_dtype` for the VAE). Imports no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import components as components_lib
from leffa_jax import sharding
from leffa_jax.imageio import to_uint8
from leffa_jax.pipeline import cast_params
from leffa_jax.sampling import guidance as guidance_lib
from leffa_jax.sampling.loop import batch_mesh, denoise, progress_reporting, shard_batch
from leffa_jax.sampling.steppers import Stepper
from leffa_jax.systems.text2image import DTYPES, encode_text, stepper_for
from leffa_jax.systems.text2image_model import (
    TEXT2IMAGE,
    TextToImage,
    TextToImageModel,
    load_text2image,
)
from leffa_jax.weights.modules import module_from_flat
from leffa_jax.weights.plan_magic_clothing import (
    EXTRACTOR,
    read_denoiser,
    read_extractor,
    write_extractor,
)
from leffa_jax.weights.plans import find_weights
from leffa_jax.weights.tensor_io import CheckpointError, TensorSource

__all__ = ["MagicClothing", "MagicClothingModel", "MagicClothingOutput", "load_magic_clothing",
           "generate", "prepare_garment", "garment_mask", "background_mask", "encode_prompts",
           "garment_features", "garment_latent", "extractor_features", "branch_eps",
           "guided_eps", "magic_clothing_eps_fn",
           "magic_clothing_stepper", "MODES", "DEFAULT_NEGATIVE", "DEFAULT_A_PROMPT"]

_F32 = jnp.float32
MODES = ("joint", "standard")
DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
DEFAULT_A_PROMPT = "best quality, high quality"
DEFAULT_PROMPT = "a photography of a model"
# background_mask: a pixel is garment when it differs from the border colour by more than this
BACKGROUND_TOLERANCE = 24
MAGIC_CLOTHING = TEXT2IMAGE + (EXTRACTOR,)


def __getattr__(name):  # the training Task lives beside, imported when asked for
    if name == "MagicClothingTask":
        from leffa_jax.systems.magic_clothing_train import MagicClothingTask
        return MagicClothingTask
    raise AttributeError(name)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class MagicClothingModel(TextToImageModel):
    """unet (the frozen denoiser), extractor (garment UNet, same class and config), vae,
    text_encoder."""


@dataclasses.dataclass
class MagicClothing:
    """A loaded system. `system` is the base text-to-image system (its model is the
    MagicClothingModel); `fallback_keys`: extractor keys taken from the denoiser."""

    system: TextToImage
    extractor_path: str | None
    fallback_keys: tuple[str, ...] = ()
    denoiser_path: str | None = None

    @property
    def model(self) -> MagicClothingModel:
        return self.system.model

    @property
    def tokenizer(self):
        return self.system.tokenizers["text_encoder"]


def load_vae(path: str):
    """A diffusers VAE folder (config.json + weights, e.g. stabilityai/sd-vae-ft-mse), a
    pipeline folder with vae/, or a leffa_jax checkpoint folder holding a `vae` component (e.g.
    the demo's tiny try-on baseline, whose VAE is trained on the synthetic set) ->
    AutoencoderKL (float32)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "leffa_jax.json")):
        from leffa_jax.weights import folder as weights_folder

        _, flat = weights_folder.read_flax_checkpoint(path)
        params = {k: np.asarray(v, np.float32) for k, v in
                  weights_folder.split_params(flat, "vae").items()}
        if not params:
            raise CheckpointError(f"--vae {path}: this leffa_jax checkpoint has no vae component")
        return module_from_flat(components_lib.Component("vae", "vae", config="vae"),
                                os.path.join(path, weights_folder.CONFIG_FOLDER), params)
    folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(
        path, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointError(f"--vae {path}: no config.json there nor in vae/: give a diffusers "
                              "AutoencoderKL folder (e.g. a download of stabilityai/sd-vae-ft-mse)")
    kind = components_lib.kind_of("vae")
    source = TensorSource(find_weights(folder))
    flat = {}
    for key in source.keys():
        canonical = kind.canonical_key(key)
        if canonical is not None:
            flax_path, array = kind.torch_to_flax(canonical, source[key])
            flat[flax_path] = array
    return module_from_flat(components_lib.Component("vae", "vae", config="."), folder, flat)


def load_magic_clothing(base: str | os.PathLike, extractor: str | os.PathLike | None = None, *,
                        vae: str | os.PathLike | None = None,
                        denoiser: str | os.PathLike | None = None) -> MagicClothing:
    """base: an SD1.5 diffusers folder (or its leffa_jax conversion); extractor: the released
    garment-extractor .safetensors (None: a copy of the denoiser, the training start);
    vae: a separate VAE folder replacing the base's; denoiser: a flat diffusers UNet state dict
    file replacing every weight of the base's UNet (`read_denoiser`; e.g. the tiny demo's
    shipped denoiser), read before the extractor so that its fallback keys come from it."""
    system = load_text2image(base)
    model = system.model
    if model.sdxl:
        raise CheckpointError(f"{base}: an SDXL model; Magic Clothing is built on SD1.5 "
                              "(Realistic Vision, SD1.5 fine-tunes)")
    modules = {name: getattr(model, name) for name in ("unet", "vae", *model.encoder_names)}
    if vae is not None:
        modules["vae"] = load_vae(vae)
    if denoiser is not None:
        modules["unet"] = read_denoiser(denoiser, modules["unet"])
    fallback: tuple[str, ...] = ()
    if extractor is None:  # a copy with its own buffers (training donates the extractor's)
        graphdef, state = nnx.split(modules["unet"])
        modules["extractor"] = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    else:
        modules["extractor"], fallback = read_extractor(extractor, modules["unet"],
                                                        model.config_dir)
    system = dataclasses.replace(system, model=MagicClothingModel(modules, model.config_dir))
    return MagicClothing(system, None if extractor is None else os.fspath(extractor), fallback,
                         None if denoiser is None else os.fspath(denoiser))


def save_extractor(mc: MagicClothing, out_path: str, *, overwrite: bool = False) -> int:
    """The extractor in the released layout (the official code loads it)."""
    return write_extractor(mc.model.extractor, out_path, overwrite=overwrite,
                           sources=[p for p in (mc.extractor_path, mc.denoiser_path, mc.system.path)
                                    if p])


# --------------------------------------------------------------------------------------------
# Garment preprocessing (host)
# --------------------------------------------------------------------------------------------


def _pil(image, what: str):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"{what} must be a PIL image or a uint8 array (H, W[, C]), got "
                         f"{array.dtype} {array.shape}")
    return Image.fromarray(array)


def background_mask(image, tolerance: int = BACKGROUND_TOLERANCE) -> np.ndarray:
    """(H, W) uint8 {0, 255} garment mask of a product photo on a plain background: the
    background colour is the per-channel median of the 1-pixel image border; a pixel is garment
    when any channel differs from it by more than `tolerance` levels. A user mask or an alpha
    channel is preferred (the official code runs a U2-Net cloth segmentation instead)."""
    rgb = np.asarray(_pil(image, "garment").convert("RGB")).astype(np.int16)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    colour = np.median(border, axis=0)
    mask = (np.abs(rgb - colour).max(axis=-1) > tolerance)
    if not mask.any():
        raise ValueError("background_mask: the garment image is one plain colour; give a mask")
    return (mask * 255).astype(np.uint8)


def garment_mask(image, mask=None) -> np.ndarray:
    """(H, W) uint8 mask of a garment image: `mask` when given, else the alpha channel, else
    `background_mask`."""
    if mask is not None:
        return np.asarray(_pil(mask, "garment mask").convert("L"))
    pil = _pil(image, "garment")
    if pil.mode in ("RGBA", "LA") or (pil.mode == "P" and "transparency" in pil.info):
        return np.asarray(pil.convert("RGBA"))[..., 3]
    return background_mask(pil)


def prepare_garment(image, mask, height: int, width: int, fp16: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Official `prepare_image` / `prepare_mask` and the masked fp16 cast -> (pixels (H, W, 3)
    float32 in [-1, 1] with the background 0, mask (H, W) float32 {0, 1}) at the OUTPUT size
    (aspect not kept, as officially)."""
    from PIL import Image

    pil = _pil(image, "garment")
    pixels = np.asarray(pil.resize((width, height), Image.LANCZOS).convert("RGB"))
    pixels = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    m = np.asarray(_pil(mask, "garment mask").resize((width, height), Image.NEAREST).convert("L"))
    m = (m.astype(np.float32) / np.float32(255.0) > 0.5).astype(np.float32)
    pixels = pixels * m[..., None]
    if fp16:
        pixels = pixels.astype(np.float16).astype(np.float32)
    return pixels, m


# --------------------------------------------------------------------------------------------
# Traceable pieces
# --------------------------------------------------------------------------------------------


def encode_prompts(model: MagicClothingModel, ids: jax.Array, dtype=_F32) -> jax.Array:
    """(n, 77) token ids -> (n, 77, D) last hidden state of the text encoder."""
    return encode_text(model, {"text_encoder": ids}, dtype)[0]


def garment_latent(model: MagicClothingModel, pixels: jax.Array, vae_dtype=_F32) -> jax.Array:
    """pixels (G, H, W, 3) -> z_g (G, h, w, 4) float32 = VAE posterior mean x scaling factor."""
    latent = model.vae.encode(pixels.astype(vae_dtype)).mean.astype(_F32)
    return latent * model.scaling_factor


def extractor_features(model: MagicClothingModel, latent: jax.Array, null_context: jax.Array,
                       dtype=_F32, attention_kernel: str = "xla", remat: bool = False
                       ) -> tuple[jax.Array, ...]:
    """z_g (G, h, w, 4) -> one (G, N_i, C_i) per transformer block: the extractor's norm1
    output at t = 0 with the empty-prompt context (1 or G, 77, D)."""
    g = latent.shape[0]
    context = jnp.broadcast_to(null_context, (g,) + null_context.shape[1:]).astype(dtype)
    return model.extractor(latent.astype(dtype), jnp.zeros((), jnp.int32), context,
                           collect_features=True, attention_kernel=attention_kernel,
                           remat=remat).features


def garment_features(model: MagicClothingModel, pixels: jax.Array, null_context: jax.Array,
                     dtype=_F32, vae_dtype=_F32, attention_kernel: str = "xla"
                     ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """pixels (G, H, W, 3) -> (z_g, extractor features): `garment_latent` then
    `extractor_features`."""
    latent = garment_latent(model, pixels, vae_dtype)
    return latent, extractor_features(model, latent, null_context, dtype, attention_kernel)


def branch_layout(mode: str, cfg: bool) -> tuple[tuple[str, bool], ...]:
    """(text, garment on) per branch in the official chunk order."""
    if not cfg:
        return (("pos", True),)
    if mode == "joint":
        return (("neg", False), ("neg", True), ("pos", True))
    return (("neg", False), ("pos", True))


def branch_eps(model: MagicClothingModel, x: jax.Array, t, negative: jax.Array,
               positive: jax.Array, features: Sequence[jax.Array], layout,
               dtype=_F32, attention_kernel: str = "xla") -> tuple[jax.Array, ...]:
    """One denoiser call over the branches of `layout` (sample-major on the batch axis).
    x (B, h, w, 4); negative/positive (B, 77, D); features: (B, N_i, C_i) per block.
    -> one eps (B, h, w, 4) float32 per branch, in layout order."""
    n = len(layout)
    text = {"neg": negative, "pos": positive}
    context = guidance_lib.interleave_branches(*[text[k] for k, _ in layout]).astype(dtype)
    refs = [guidance_lib.interleave_branches(*[f if on else jnp.zeros_like(f)
                                               for _, on in layout]).astype(dtype)
            for f in features]
    x_in = guidance_lib.repeat_branches(x, n).astype(dtype)
    eps = model.unet(x_in, t, context, reference_features=refs,
                     attention_kernel=attention_kernel).sample.astype(_F32)
    return guidance_lib.split_branches(eps, n)


def guided_eps(branches: Sequence[jax.Array], mode: str, cfg: bool, garment_scale,
               text_scale) -> jax.Array:
    """The official combination of `branch_eps`'s outputs (see the module docstring)."""
    if not cfg:
        return branches[0]
    if mode == "joint":
        return guidance_lib.nested_guidance(branches, (garment_scale, text_scale))
    return guidance_lib.classifier_free_guidance(branches[0], branches[1], text_scale)


def magic_clothing_eps_fn(model: MagicClothingModel, mode: str, cfg: bool, garment_scale,
                          text_scale, dtype=_F32, attention_kernel: str = "xla"):
    """eps_fn(x, t, (negative, positive, features)) -> guided eps, for `loop.denoise`."""
    layout = branch_layout(mode, cfg)

    def eps_fn(x, t, conditions):
        negative, positive, features = conditions
        branches = branch_eps(model, x, t, negative, positive, features, layout, dtype,
                              attention_kernel)
        return guided_eps(branches, mode, cfg, garment_scale, text_scale)

    return eps_fn


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of the compiled programs."""

    mode: str = "joint"
    cfg: bool = True
    compute_dtype: Any = _F32
    vae_dtype: Any = _F32
    attention_kernel: str = "xla"


def _merge(graphdef, state, opts: _Options) -> MagicClothingModel:
    return nnx.merge(graphdef, cast_params(state, opts.compute_dtype, opts.vae_dtype,
                                           MAGIC_CLOTHING))


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _encode(graphdef, state, ids, pixels, null_ids, opts: _Options):
    """-> (text embeddings (n, 77, D), null embedding (1, 77, D), z_g, features)."""
    model = _merge(graphdef, state, opts)
    text = encode_prompts(model, jnp.concatenate([null_ids, ids]), opts.compute_dtype)
    null = text[:1]
    latent, feats = garment_features(model, pixels, null, opts.compute_dtype, opts.vae_dtype,
                                     opts.attention_kernel)
    return text[1:].astype(_F32), null.astype(_F32), latent, tuple(f.astype(_F32) for f in feats)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _denoise(graphdef, state, conditions, noise, stepper, scales, progress, opts: _Options):
    model = _merge(graphdef, state, opts)
    eps_fn = magic_clothing_eps_fn(model, opts.mode, opts.cfg, scales[0], scales[1],
                                   opts.compute_dtype, opts.attention_kernel)
    return denoise(stepper, eps_fn, noise, conditions, return_latents=True, progress=progress)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _decode(graphdef, state, x, opts: _Options):
    model = _merge(graphdef, state, opts)
    decoded = model.vae.decode((x / model.scaling_factor).astype(opts.vae_dtype)).astype(_F32)
    return to_uint8(decoded), decoded


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _branches(graphdef, state, x, t, negative, positive, features, opts: _Options):
    model = _merge(graphdef, state, opts)
    return branch_eps(model, x, t, negative, positive, features,
                      branch_layout(opts.mode, opts.cfg), opts.compute_dtype,
                      opts.attention_kernel)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


class MagicClothingOutput(NamedTuple):
    """images (B, H, W, 3) uint8; decoded (B, H, W, 3) float32 before clamping; latents
    (K, B, h, w, 4) after each step (return_latents) or None; timesteps (K,);
    garment_pixels (G, H, W, 3) and garment_masks (G, H, W) as preprocessed; garment_index (B,)."""

    images: np.ndarray
    decoded: np.ndarray
    latents: np.ndarray | None
    timesteps: np.ndarray
    garment_pixels: np.ndarray
    garment_masks: np.ndarray
    garment_index: np.ndarray


def magic_clothing_stepper(mc: MagicClothing, name: str | None, steps: int, **options
                           ) -> Stepper:
    """The stepper `name` (None: "unipc", the official one) as `XScheduler.from_config(base
    scheduler config)` of diffusers 0.25.1: UniPC maps a DEIS/DPM solver_type (logrho,
    midpoint, heun) to bh2 and ends at sigma_min."""
    name = name or "unipc"
    if name == "unipc":
        if mc.system.scheduler_config.get("solver_type", "bh2") not in ("bh1", "bh2"):
            options.setdefault("solver_type", "bh2")
        options.setdefault("final_sigmas_type", "sigma_min")
    return stepper_for(mc.system, name, steps, **options)


def _dtype(name) -> Any:
    name = name if isinstance(name, str) else jnp.dtype(name).name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _list(value, what: str) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _init_noise(init_noise, seed: int, shape) -> np.ndarray:
    if init_noise is None:
        return np.asarray(jax.random.normal(jax.random.key(seed), shape, _F32))
    noise = np.asarray(init_noise, np.float32)
    if noise.shape != tuple(shape):
        raise ValueError(f"init_noise has shape {noise.shape}, expected NHWC {tuple(shape)} "
                         "(diffusers' latents= is NCHW: transpose it)")
    return noise


def options_for(mc: MagicClothing, mode: str, text_scale: float, dtype="float32",
                vae_dtype="float32", attention_kernel: str = "xla") -> _Options:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {MODES} (joint: the 768 weights' "
                         "garment+text guidance; standard: the 512 weights' plain CFG)")
    return _Options(mode=mode, cfg=float(text_scale) > 1.0, compute_dtype=_dtype(dtype),
                    vae_dtype=_dtype(vae_dtype), attention_kernel=attention_kernel)


def tokenize(mc: MagicClothing, texts: Sequence[str]) -> np.ndarray:
    return mc.tokenizer(list(texts))["input_ids"].astype(np.int32)


def encode(mc: MagicClothing, prompts: Sequence[str], pixels: np.ndarray, opts: _Options):
    """Host wrapper of the encoding program: (prompt embeddings (n, 77, D), null embedding
    (1, 77, D), garment latents (G, h, w, 4), features)."""
    graphdef, state = nnx.split(mc.model)
    return _encode(graphdef, state, jnp.asarray(tokenize(mc, prompts)), jnp.asarray(pixels),
                   jnp.asarray(tokenize(mc, [""])), opts=opts)


def branches(mc: MagicClothing, x, t, negative, positive, features, opts: _Options):
    """Host wrapper of `branch_eps` (one compiled call) -> per-branch eps."""
    graphdef, state = nnx.split(mc.model)
    return _branches(graphdef, state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(negative),
                     jnp.asarray(positive), tuple(map(jnp.asarray, features)), opts=opts)


def generate(mc: MagicClothing, garment, prompt: str | Sequence[str] | None = None, *,
             garment_mask_image=None, negative_prompt: str | Sequence[str] = DEFAULT_NEGATIVE,
             a_prompt: str | None = DEFAULT_A_PROMPT, mode: str = "joint",
             garment_scale: float = 2.5, guidance: float = 7.5, steps: int = 20,
             height: int = 512, width: int = 384, num_images_per_prompt: int = 1,
             scheduler: str | None = None, stepper_options: dict | None = None, seed: int = 0,
             init_noise=None, fp16_garment: bool = True, dtype="float32",
             vae_dtype="float32", return_latents: bool = False, attention_kernel: str = "xla",
             shard: bool = True, progress: Callable[[int], None] | None = None
             ) -> MagicClothingOutput:
    """Dress prompt-described people in `garment`.

    garment: a PIL image / uint8 array, or a list (one per prompt); garment_mask_image: the
    same structure or None (alpha channel, else `background_mask`). prompt: a string or a list
    (None: the official default "a photography of a model"); `a_prompt` is appended after ", "
    as officially (None or "" to use the prompts as given). B = len(prompts) x
    num_images_per_prompt, each prompt's images adjacent. mode: "joint" (768 weights, sG =
    garment_scale, sT = guidance) or "standard" (512 weights, plain CFG of scale `guidance`);
    guidance <= 1: one branch, no guidance. scheduler: a stepper name (default "unipc" as
    officially, see `magic_clothing_stepper`). init_noise (B, h, w, 4) NHWC replays a run.
    """
    steps = int(steps)
    if steps < 1 or num_images_per_prompt < 1:
        raise ValueError("steps and num_images_per_prompt must be >= 1")
    factor = mc.model.vae_factor
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"height x width {height}x{width} must be positive multiples of "
                         f"{factor} (the VAE factor), e.g. 512x384 or 768x576")
    prompts = _list(DEFAULT_PROMPT if prompt is None else prompt, "prompt")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if a_prompt:
        prompts = [f"{p}, {a_prompt}" for p in prompts]
    negatives = _list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} entries, the prompts "
                         f"{len(prompts)}: give one, or one per prompt")
    garments = _list(garment, "garment")
    masks = (_list(garment_mask_image, "garment mask") if garment_mask_image is not None
             else [None] * len(garments))
    if len(garments) not in (1, len(prompts)) or len(masks) != len(garments):
        raise ValueError(f"{len(garments)} garments and {len(masks)} masks for {len(prompts)} "
                         "prompts: give one garment (and mask), or one per prompt")
    prepared = [prepare_garment(g, garment_mask(g, m), height, width, fp16_garment)
                for g, m in zip(garments, masks, strict=True)]
    pixels = np.stack([p for p, _ in prepared])
    repeat = int(num_images_per_prompt)
    garment_index = np.repeat(np.arange(len(prompts)) % len(garments), repeat)
    opts = options_for(mc, mode, guidance, dtype, vae_dtype, attention_kernel)
    b = len(prompts) * repeat
    noise = _init_noise(init_noise, seed, (b, height // factor, width // factor,
                                           mc.model.unet.config.in_channels))
    stepper = magic_clothing_stepper(mc, scheduler, steps, **(stepper_options or {}))
    if stepper.needs_noise:
        raise ValueError(f"the {stepper.name!r} stepper draws noise at every step; Magic "
                         "Clothing samples with deterministic steppers (unipc, ddim eta=0, "
                         "dpmpp_2m, deis, pndm)")
    # as officially, the extractor runs on the per-image garment batch (B rows)
    per_image = lambda texts: [t for t in texts for _ in range(repeat)]  # noqa: E731
    text, _, _, features = encode(mc, per_image(negatives) + per_image(prompts),
                                  pixels[garment_index], opts)
    negative, positive = text[:b], text[b:]
    mesh = batch_mesh(b, shard)
    graphdef, state = nnx.split(mc.model)
    conditions, noise = shard_batch(((negative, positive, features), noise), mesh)
    if mesh is not None:
        state = jax.device_put(state, sharding.replicated(mesh))
    scales = jnp.asarray([garment_scale, guidance], _F32)
    with progress_reporting(progress) as progress_id:
        x, latents = _denoise(graphdef, state, conditions, noise, stepper, scales, progress_id,
                              opts=opts)
        images, decoded = _decode(graphdef, state, x, opts=opts)
        images, decoded = np.asarray(images), np.asarray(decoded)
        latents = np.asarray(latents) if return_latents else None
    return MagicClothingOutput(images, decoded, latents, np.asarray(stepper.timesteps, np.int64),
                               pixels, np.stack([m for _, m in prepared]), garment_index)
