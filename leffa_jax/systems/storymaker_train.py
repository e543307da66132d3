"""StoryMaker training (official `train_storymaker.py` @ a7ce766) as a Task of the generic
trainer, plus its losses.

Trained: the image projection (`image_proj_model`: resamplers, projection, pos/bg embeddings,
proj_out/norm_out) and the UNet's adapter part (LoRA factors on q/k/v/out of every attn1/attn2,
to_k_ip/to_v_ip); frozen: the base UNet, the VAE, both text encoders, the CLIP image encoder.

One loss evaluation (`StoryMakerTask.loss` -> `storymaker_step`), per sample of the batch:
    1. draws (`sample_draws`): VAE posterior noise, noise + 0.05 offset noise (B, 1, 1, 4),
       t ~ U{0..999}, the dataset's dropout u ~ U(0, 1): u < 0.05 image dropped, u < 0.25 caption
       "" (text only), u < 0.30 both (20 % / 5 % / 5 %), and faceid_plus' face-token / crop-token
       drops (p 0.1 each);
    2. z0 = posterior sample * scaling_factor; z_t = add_noise(z0, noise, t) (the base's
       scheduler betas, DDPM);
    3. text: hidden_states[-2] of both encoders (77 tokens) + pooled text_encoder_2 embedding;
       image: a dropped image zeroes the CLIP pixels of crops and faces and the id embeddings
       (L773-776), then CLIP hidden_states[-2] -> image_proj_model -> [bg | char 0 | ...] tokens;
    4. eps_hat = UNet(z_t, t, [text | tokens], pooled, time_ids) with an attention probe on the
       image-prompt softmax of the loss layers (`objectives.key_mass_probe`);
    5. loss = L_d + 0.1 L_attn (below); metrics {"diffusion", "attention"}.
Departures (documented): batches > 1 (the official code needs batch 1: `ip_tokens.view(1, ...)`),
with every image of a run holding `data.num_characters` characters; global-norm gradient
clipping per `train.grad_clip` (the official clipping sees 0 parameters: set grad_clip to a huge
value for the official behaviour); AdamW, constant LR, EMA per the generic trainer.

Losses as coded (L617-677, L794-831), batched. Conventions: NHWC; latent masks (B, h, w, n) in
[0, 1] (character i's person mask at latent resolution); image-prompt token layout
`[20 background | 20 per character]`.

    L   = L_d + ip_loss * L_attn                                    (ip_loss 0.1)
    L_d = mean((eps_hat - noise)^2 * w),  w = 1 + 5 clamp(sum_i M_i, 0, 1)  (w = 1 if image dropped)
    L_attn: per sample b with n characters
        M   = bilinear(M -> (h//2, w//2))                          (align_corners=False, no antialias)
        S_g = bilinear_x2( sum_{lowest-resolution IP layers} mass_g ) / 60   (g = bg, char i)
        L_b = ( sum_i mean_pix (S_i - M_i)^2 + mean_pix (S_bg - (1 - clamp(sum_i M_i)))^2 ) / n
        L_attn = nan_to_num(mean_b L_b, nan=1e-5)
`mass_g` is the head-averaged softmax mass of the image-prompt attention on token group g
(`objectives.key_group_mass`, read through `objectives.key_mass_probe`: (B, h_l, w_l, n+1), never
the (B, N, 20(n+1)) map). Summing the layers before the (linear) upsampling equals the official
per-layer upsample-then-sum.

Departure for batches > 1 (the official code runs batch 1 only): the per-character term is
`sum/(h//2 * w//2)` per sample and the background term a per-sample mean, averaged over the batch
(identical at B = 1, where the official `sum/mask_area` and `mean` coincide).
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import schedulers
from leffa_jax.objectives import attention_probability_probe, key_mass_probe
from leffa_jax.training.config import ConfigError
from leffa_jax.training.task import Task, cast_floating

TOKENS_PER_GROUP = 20       # background tokens, and tokens per character (4 face + 16 crop)
ATTN_DIVISOR = 60.0         # the official constant (the number of H/32 IP layers in SDXL)


def token_groups(num_characters: int, tokens: int = TOKENS_PER_GROUP) -> tuple[tuple[int, int], ...]:
    """Key ranges of the image-prompt tokens: ((0, 20) background, (20, 40) character 0, ...)."""
    return tuple((g * tokens, (g + 1) * tokens) for g in range(num_characters + 1))


def half_size(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h // 2, w // 2): the resolution the attention-mask loss compares at."""
    return latent_hw[0] // 2, latent_hw[1] // 2


def loss_layer_size(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(ceil(hs / 2), ceil(ws / 2)): the token grid of the layers the loss reads."""
    hs, ws = half_size(latent_hw)
    return math.ceil(hs / 2), math.ceil(ws / 2)


def loss_layers(layer_resolutions: Sequence[tuple[int, int]], latent_hw: tuple[int, int]
                ) -> tuple[int, ...]:
    """Transformer layers (call order) whose grid is `loss_layer_size` (the H/32 layers of SDXL;
    the official code skips the layers at h//2 x w//2). ValueError when there are none."""
    want = loss_layer_size(latent_hw)
    used = tuple(i for i, hw in enumerate(layer_resolutions) if tuple(hw) == want)
    if not used:
        raise ValueError(f"no attention layer has the {want[0]}x{want[1]} token grid the "
                         f"attention-mask loss reads for latents {latent_hw[0]}x{latent_hw[1]} "
                         f"(layer grids: {sorted(set(map(tuple, layer_resolutions)))}); use a "
                         "latent size that is a multiple of 4 (image size multiple of 32)")
    return used


def bilinear(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) -> (B, *hw, C): torch `F.interpolate(mode='bilinear', align_corners=False)`
    without antialiasing (half-pixel centres, edge clamp)."""
    b, _, _, c = x.shape
    return jax.image.resize(x.astype(jnp.float32), (b, *hw, c), "bilinear", antialias=False)


def masked_diffusion_loss(eps_pred: jax.Array, noise: jax.Array, masks: jax.Array,
                          image_dropped: jax.Array, mask_weight: float = 5.0) -> jax.Array:
    """eps_pred, noise (B, h, w, 4); masks (B, h, w, n); image_dropped (B,) bool ->
    mean((eps_pred - noise)^2 * (1 + mask_weight * clamp(sum_i M_i, 0, 1))), weight 1 for
    samples whose image condition was dropped. Float32."""
    err = jnp.square(eps_pred.astype(jnp.float32) - noise.astype(jnp.float32))
    person = jnp.clip(jnp.sum(masks.astype(jnp.float32), axis=-1, keepdims=True), 0.0, 1.0)
    weight = 1.0 + float(mask_weight) * person
    weight = jnp.where(jnp.reshape(image_dropped, (-1, 1, 1, 1)), 1.0, weight)
    return jnp.mean(err * weight)


def group_attention_maps(masses: Sequence[jax.Array], latent_hw: tuple[int, int],
                         divisor: float = ATTN_DIVISOR) -> jax.Array:
    """Per-layer group masses [(B, th, tw, n+1)] -> S (B, h//2, w//2, n+1) = bilinear x2 of
    their sum / divisor; channel 0 = background, 1 + i = character i."""
    total = sum(m.astype(jnp.float32) for m in masses)
    return bilinear(total, half_size(latent_hw)) / float(divisor)


def attention_mask_loss(masses: Sequence[jax.Array], masks: jax.Array,
                        divisor: float = ATTN_DIVISOR) -> tuple[jax.Array, jax.Array]:
    """masses: per loss layer (B, th, tw, n+1) (`objectives.key_mass_probe` over
    `token_groups(n)`); masks (B, h, w, n) latent masks -> (L_attn scalar, per-sample (B,)).
    See the module docstring; nan -> 1e-5 as `torch.nan_to_num(loss, nan=1e-5)`."""
    b, h, w, n = masks.shape
    maps = group_attention_maps(masses, (h, w), divisor)          # (B, hs, ws, n+1)
    small = bilinear(masks, half_size((h, w)))                    # (B, hs, ws, n)
    background = 1.0 - jnp.clip(jnp.sum(small, axis=-1), 0.0, 1.0)
    char_terms = jnp.mean(jnp.square(maps[..., 1:] - small), axis=(1, 2))   # (B, n)
    bg_term = jnp.mean(jnp.square(maps[..., 0] - background), axis=(1, 2))  # (B,)
    per_sample = (jnp.sum(char_terms, axis=-1) + bg_term) / n
    loss = jnp.nan_to_num(jnp.mean(per_sample), nan=1e-5)
    return loss, per_sample


def masses_from_probabilities(probs: jax.Array, grid: tuple[int, int], num_characters: int
                              ) -> jax.Array:
    """Head-mean probabilities (B, N, 20(n+1)) of one layer (queries row-major over `grid`) ->
    the group masses (B, h_l, w_l, n+1) `key_mass_probe` gives (for checks and pictures)."""
    b = probs.shape[0]
    groups = [jnp.sum(probs[..., s:e], axis=-1) for s, e in token_groups(num_characters)]
    return jnp.stack(groups, axis=-1).reshape(b, *grid, num_characters + 1)


# ----------------------------------------------------------------------------- one step
class Draws(NamedTuple):
    """The random draws of one official training step (B samples), NHWC.
    latent_eps (B, h, w, 4) posterior noise; noise (B, h, w, 4); offset (B, 1, 1, 4);
    t (B,) int; drop_image / drop_text / drop_face / drop_clip (B,) bool."""
    latent_eps: jax.Array
    noise: jax.Array
    offset: jax.Array
    t: jax.Array
    drop_image: jax.Array
    drop_text: jax.Array
    drop_face: jax.Array
    drop_clip: jax.Array


@jax.tree_util.register_static
class StepConfig(NamedTuple):
    """Static settings of `storymaker_step` (the official flags)."""
    num_characters: int
    latent_hw: tuple[int, int]
    loss_layers: tuple[int, ...]
    ip_loss: float = 0.1              # --ip_loss
    mask_loss_weight: float = 5.0     # --mask_loss_weight
    noise_offset: float = 0.05        # --noise_offset
    attn_divisor: float = ATTN_DIVISOR
    ip_scale: float = 1.0             # --scale (ip and LoRA scale during training)
    attention_kernel: str = "xla"
    remat: bool = False
    chunk_size: int | None = None     # query rows per chunk of the attention-mass probe


def sample_draws(rng: jax.Array, batch_size: int, latent_hw: tuple[int, int], *,
                 drop_image: float = 0.05, drop_text: float = 0.2, drop_both: float = 0.05,
                 drop_face: float = 0.1, drop_clip: float = 0.1,
                 num_train_timesteps: int = 1000) -> Draws:
    """The draws of `Draws` from one key. Dataset dropout (mp_dataset.py L220-228) with one
    u ~ U(0, 1) per sample: u < p_image drops the image; u < p_image + p_text the caption;
    u < p_image + p_text + p_both both."""
    k = jax.random.split(rng, 7)
    b, (h, w) = batch_size, latent_hw
    u = jax.random.uniform(k[4], (b,))
    image_only, text_end = drop_image, drop_image + drop_text
    both_end = text_end + drop_both
    return Draws(
        latent_eps=jax.random.normal(k[0], (b, h, w, 4)),
        noise=jax.random.normal(k[1], (b, h, w, 4)),
        offset=jax.random.normal(k[2], (b, 1, 1, 4)),
        t=jax.random.randint(k[3], (b,), 0, num_train_timesteps),
        drop_image=(u < image_only) | ((u >= text_end) & (u < both_end)),
        drop_text=(u >= image_only) & (u < both_end),
        drop_face=jax.random.uniform(k[5], (b,)) < drop_face,
        drop_clip=jax.random.uniform(k[6], (b,)) < drop_clip)


def _encoders(modules: dict) -> types.SimpleNamespace:
    """The attributes `text2image.encode_text` / `storymaker.clip_features` read."""
    return types.SimpleNamespace(sdxl=True, encoder_names=("text_encoder", "text_encoder_2"),
                                 **modules)


def storymaker_step(modules: dict[str, nnx.Module], batch: dict[str, jax.Array], draws: Draws,
                    schedule: schedulers.Schedule, empty_ids: tuple[jax.Array, jax.Array],
                    cfg: StepConfig, *, dtype=jnp.float32, probabilities: bool = False
                    ) -> dict[str, Any]:
    """One official training step's forward pass and losses (see the module docstring).
    modules: {unet, vae, text_encoder, text_encoder_2, image_encoder, image_proj_model};
    batch: the `data.characters` keys; empty_ids: the two tokenizers' ids of "" (77,).
    `probabilities`: also read the full head-mean image-prompt attention (B, N, 20 (n+1)) of
    every layer (checks and pictures; the loss still reads the per-group masses).
    -> {"loss", "diffusion", "attention", "eps", "noise", "tokens", "masses"[, "probabilities"]}."""
    from leffa_jax.systems import storymaker as sm
    from leffa_jax.systems.text2image import encode_text

    unet, vae = modules["unet"], modules["vae"]
    enc = _encoders(modules)
    b, n = batch["image"].shape[0], cfg.num_characters
    # latents (frozen VAE, posterior sample)
    post = vae.encode(batch["image"].astype(dtype))
    z0 = vae.sample_posterior(post, draws.latent_eps.astype(dtype)) * vae.config.scaling_factor
    z0 = jax.lax.stop_gradient(z0.astype(jnp.float32))
    noise = draws.noise.astype(jnp.float32) + cfg.noise_offset * draws.offset.astype(jnp.float32)
    z_t = schedulers.add_noise(schedule, z0, noise, draws.t)
    # text (caption dropped -> the ids of "")
    keep_text = ~draws.drop_text[:, None]
    ids = {"text_encoder": jnp.where(keep_text, batch["input_ids"], empty_ids[0][None]),
           "text_encoder_2": jnp.where(keep_text, batch["input_ids_2"], empty_ids[1][None])}
    text, pooled = encode_text(enc, ids, dtype)
    # image tokens (image dropped -> zero pixels and ids before the encoders)
    keep = (~draws.drop_image).astype(dtype)
    pix = lambda x: (x.astype(dtype) * keep[:, None, None, None, None]).reshape(  # noqa: E731
        b * n, *x.shape[2:])
    clip = sm.clip_features(enc, pix(batch["clip_images"]), dtype)
    clip = clip.reshape(b, n, *clip.shape[1:])
    face = sm.clip_features(enc, pix(batch["clip_faces"]), dtype)
    face = face.reshape(b, n, *face.shape[1:])
    id_embeds = batch["face_embeds"].astype(dtype) * keep[:, None, None]
    tokens = modules["image_proj_model"](id_embeds, clip, face, drop_face=draws.drop_face,
                                         drop_clip=draws.drop_clip)
    context = jnp.concatenate([text.astype(dtype), tokens.astype(dtype)], axis=1)
    mass_probe = key_mass_probe(token_groups(n), branch="image_prompt", layers=cfg.loss_layers,
                                chunk_size=cfg.chunk_size)
    probe = mass_probe
    if probabilities:
        full = attention_probability_probe(branch="image_prompt")

        def probe(site, q, k, hw):
            if site.branch != "image_prompt":
                return None
            return full(site, q, k, hw), mass_probe(site, q, k, hw)

    out = sm.unet_forward(unet, z_t.astype(dtype), draws.t, context, text_embeds=pooled,
                          time_ids=batch["time_ids"].astype(dtype), ip_scale=cfg.ip_scale,
                          attention_probe=probe, attention_kernel=cfg.attention_kernel,
                          remat=cfg.remat)
    probes = {i: v for (i, branch), v in out.attention_probes.items() if branch == "image_prompt"}
    result: dict[str, Any] = {"eps": out.sample.astype(jnp.float32), "noise": noise,
                              "tokens": tokens}
    if probabilities:
        result["probabilities"] = {i: v[0] for i, v in probes.items()}
        probes = {i: v[1] for i, v in probes.items()}
    masses = [probes[i] for i in cfg.loss_layers]
    masks = batch["masks"].astype(jnp.float32)
    diffusion = masked_diffusion_loss(result["eps"], noise, masks, draws.drop_image,
                                      cfg.mask_loss_weight)
    attention, _ = attention_mask_loss(masses, masks, cfg.attn_divisor)
    result.update(masses=masses, diffusion=diffusion, attention=attention,
                  loss=diffusion + cfg.ip_loss * attention)
    return result


# ----------------------------------------------------------------------------- tiny base
# The fixtures' tiny SDXL-like variant (../shared/fixtures/storymaker/config), for the embedded
# demo and tests: built with random weights; a byte-level CLIP BPE vocabulary (no merges).
TINY_CONFIGS: dict[str, dict] = {
    "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu",
             "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "attention_head_dim": [1, 2, 4], "block_out_channels": [16, 32, 32],
             "cross_attention_dim": 40,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5,
             "norm_num_groups": 8, "out_channels": 4, "projection_class_embeddings_input_dim": 72,
             "sample_size": 16, "transformer_layers_per_block": [1, 1, 2],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "use_linear_projection": True},
    "vae": {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [8, 16, 16, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 1, "norm_num_groups": 4, "out_channels": 3, "sample_size": 64,
            "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4},
    "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu",
                     "hidden_size": 16, "intermediate_size": 32, "layer_norm_eps": 1e-5,
                     "max_position_embeddings": 77, "model_type": "clip_text_model",
                     "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 16,
                     "vocab_size": 514, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                       "hidden_size": 24, "intermediate_size": 48, "layer_norm_eps": 1e-5,
                       "max_position_embeddings": 77, "model_type": "clip_text_model",
                       "num_attention_heads": 3, "num_hidden_layers": 2, "projection_dim": 24,
                       "vocab_size": 514, "bos_token_id": 0, "eos_token_id": 2,
                       "pad_token_id": 1},
    "image_encoder": {"architectures": ["CLIPVisionModelWithProjection"], "hidden_act": "gelu",
                      "hidden_size": 32, "image_size": 224, "intermediate_size": 64,
                      "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
                      "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 3,
                      "patch_size": 14, "projection_dim": 16},
    "scheduler": {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"},
}
TINY_ADAPTER = {"cross_attention_dim": 40, "clip_embeddings_dim": 32, "lora_rank": 4,
                "perceiver_resampler": {"dim": 40, "depth": 4, "dim_head": 10, "heads": 4,
                                        "embedding_dim": 32, "output_dim": 40, "ff_mult": 4},
                "resample": {"dim": 48, "depth": 4, "dim_head": 16, "heads": 3,
                             "embedding_dim": 32, "output_dim": 40, "ff_mult": 4,
                             "num_queries": 16}}
_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>"}


def write_tiny_base(folder: str) -> str:
    """Write the tiny base's configs and byte-level tokenizers (tokenizer_2 pads with "!", id 0,
    as SDXL's) to `folder` (whole or not at all); no weights: `init_model` draws them."""
    import json
    import shutil
    import tempfile

    from leffa_jax.text.tokenizer import bytes_to_unicode

    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny_base-", dir=parent)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 2 * len(chars), "<|endoftext|>": 2 * len(chars) + 1})

    def dump(rel, obj):
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)

    for name, cfg in TINY_CONFIGS.items():
        dump(f"{name}/{'scheduler_config' if name == 'scheduler' else 'config'}.json", cfg)
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        dump(f"{name}/vocab.json", vocab)
        with open(os.path.join(tmp, name, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        dump(f"{name}/special_tokens_map.json", {**_SPECIAL, "pad_token": pad})
        dump(f"{name}/tokenizer_config.json", {**_SPECIAL, "pad_token": pad,
                                               "model_max_length": 77,
                                               "tokenizer_class": "CLIPTokenizer"})
    dump("storymaker_adapter.json", TINY_ADAPTER)
    dump("model_index.json", {"_class_name": "StableDiffusionXLPipeline",
                              "force_zeros_for_empty_prompt": True})
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise
    return folder


# ----------------------------------------------------------------------------- the Task
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder",
                    "image_proj_model")
ADAPTER = "unet_adapter"  # params key of the UNet's trained part (LoRA, to_k_ip, to_v_ip)


def _is_unet_adapter(path, value) -> bool:
    from leffa_jax.systems.storymaker import is_adapter_path

    return isinstance(value, nnx.Param) and is_adapter_path(path)


def tokenizer_dirs(base: str) -> tuple[str, str]:
    """The two tokenizer folders of a base (diffusers folder or leffa_jax checkpoint)."""
    from leffa_jax.weights import folder as weights_folder

    root = base
    if os.path.isfile(os.path.join(base, weights_folder.META_FILE)):
        root = os.path.join(base, weights_folder.CONFIG_FOLDER)
    return os.path.join(root, "tokenizer"), os.path.join(root, "tokenizer_2")


def random_storymaker(base_dir: str, adapter_cfg, seed: int = 0):
    """A StoryMakerModel with random weights from a config folder (`write_tiny_base`): the
    base UNet/VAE/encoders drawn as their modules do, the adapter with the official init."""
    from leffa_jax.nn import clip
    from leffa_jax.nn.clip_config import CLIPTextConfig, CLIPVisionConfig
    from leffa_jax.nn.config import UNetConfig, VAEConfig
    from leffa_jax.nn.vae import AutoencoderKL
    from leffa_jax.systems import storymaker as sm

    rngs = nnx.Rngs(seed)
    sub = lambda name: os.path.join(base_dir, name)  # noqa: E731
    modules = {
        "unet": sm.storymaker_unet(UNetConfig.from_json(sub("unet")), adapter_cfg, rngs=rngs),
        "vae": AutoencoderKL(VAEConfig.from_json(sub("vae")), rngs=rngs),
        "text_encoder": clip.CLIPTextModel(CLIPTextConfig.from_json(sub("text_encoder")),
                                           rngs=rngs),
        "text_encoder_2": clip.CLIPTextModelWithProjection(
            CLIPTextConfig.from_json(sub("text_encoder_2")), rngs=rngs),
        "image_encoder": clip.CLIPVisionModelWithProjection(
            CLIPVisionConfig.from_json(sub("image_encoder")), rngs=rngs),
        "image_proj_model": sm.ImageProjection(adapter_cfg, rngs=rngs),
    }
    return sm.StoryMakerModel(modules, base_dir, adapter_cfg)


def cache_dir(config) -> str:
    """Where the tiny base and the synthetic set are written (`config.model.cache_dir`, default
    ~/.cache/leffa_jax)."""
    return config.model.get("cache_dir") or os.path.expanduser("~/.cache/leffa_jax")


class StoryMakerTask(Task):
    """StoryMaker adapter training (see the module docstring). Config: `config.model` (base,
    adapter, image_encoder, adapter_config, lora_rank, attention_kernel), `config.storymaker`
    (loss weights, dropout, scales), `config.data` (root, num_characters, height, width,
    target_size, batch_size, seed, synthetic_images)."""

    name = "storymaker"
    components = MODEL_COMPONENTS
    trainable = ("image_proj_model",)  # + the UNet's adapter part, split off in `prepare`

    def __init__(self, config):
        super().__init__(config)
        self.dtype = jnp.dtype(config.train.dtype)
        d = config.data
        self.image_hw = (int(d.height), int(d.width))
        self.latent_hw = (self.image_hw[0] // 8, self.image_hw[1] // 8)
        self.num_characters = int(d.num_characters)
        self.schedule = None
        self.step_config: StepConfig | None = None
        self.empty_ids = None

    # -------------------------------------------------------------- config and model
    def base_dir(self) -> str:
        base = self.config.model.base
        if base in ("", "tiny"):
            return write_tiny_base(os.path.join(cache_dir(self.config), "storymaker_tiny_base"))
        return base

    def validate(self) -> None:
        m, d = self.config.model, self.config.data
        if m.base not in ("", "tiny") and not os.path.isdir(m.base):
            raise ConfigError(f"config.model.base {m.base} is not a folder: give the SDXL base "
                              "(diffusers folder or its leffa_jax conversion), or 'tiny'")
        if m.adapter and not os.path.isfile(m.adapter):
            raise ConfigError(f"config.model.adapter {m.adapter} not found: give mask.bin, an "
                              "adapter .safetensors, or '' for a fresh adapter")
        if int(self.config.train.batch_size) != int(d.batch_size):
            raise ConfigError(f"train.batch_size {self.config.train.batch_size} != "
                              f"data.batch_size {d.batch_size}: set both")
        if self.image_hw[0] % 64 or self.image_hw[1] % 64:
            raise ConfigError(f"data.height/width {self.image_hw} must be multiples of 64 "
                              "(the attention-mask loss reads the H/32 layers)")
        if not 1 <= self.num_characters <= 3:
            raise ConfigError(f"data.num_characters {self.num_characters}: 1 to 3 (pos_embed slots)")
        if not d.root and not d.synthetic_images:
            raise ConfigError("data.root is empty: set --config.data.root to a character "
                              "folder (leffa_jax/data/characters.py) or data.synthetic_images > 0")
        if d.root and not d.synthetic_images and not os.path.isdir(d.root):
            raise ConfigError(f"data.root {d.root} does not exist")

    def init_model(self):
        from leffa_jax.systems import storymaker as sm

        m = self.config.model
        base = self.base_dir()
        if m.base in ("", "tiny"):
            cfg = sm.AdapterConfig.from_json(m.adapter_config or
                                             os.path.join(base, "storymaker_adapter.json"))
            model = random_storymaker(base, cfg, int(self.config.train.seed))
            if m.adapter:
                model = self._load_adapter(model, m.adapter)
            return model
        if m.adapter:
            system = sm.load_storymaker(base, m.adapter, m.image_encoder or None,
                                        adapter_config=m.adapter_config or None)
            return system.model
        return self._fresh_adapter(base)

    def _fresh_adapter(self, base: str):
        """An SDXL base + a freshly initialised adapter (official init: LoRA up 0, proj_out 0,
        pos/bg embeddings 0) of `model.lora_rank`, widths from the base and image encoder."""
        from leffa_jax.systems import storymaker as sm
        from leffa_jax.systems.text2image_model import load_text2image

        m = self.config.model
        system = load_text2image(base)
        encoder = sm.load_image_encoder(m.image_encoder or base)
        cfg = (sm.AdapterConfig.from_json(m.adapter_config) if m.adapter_config else
               sm.AdapterConfig.official(system.model.unet.config.cross_attention_dim,
                                         encoder.config.hidden_size, int(m.lora_rank)))
        rngs = nnx.Rngs(int(self.config.train.seed))
        unet = sm.storymaker_unet(system.model.unet.config, cfg, rngs=rngs)
        nnx.update(unet, nnx.state(system.model.unet, nnx.Param))
        modules = {n: getattr(system.model, n) for n in ("vae", "text_encoder", "text_encoder_2")}
        modules.update(unet=unet, image_encoder=encoder,
                       image_proj_model=sm.ImageProjection(cfg, rngs=rngs))
        return sm.StoryMakerModel(modules, system.model.config_dir, cfg)

    @staticmethod
    def _load_adapter(model, path: str):
        from leffa_jax.systems import storymaker as sm
        from leffa_jax.weights import storymaker as sm_weights
        from leffa_jax.weights.modules import flat_to_nested

        _, proj, unet_flat = sm_weights.read_adapter(path, model.adapter_config)
        if sm_weights.is_processor_layout(unet_flat):
            unet_flat = sm_weights.processor_params_to_unet(
                unet_flat, sm.processor_paths(model.unet), path)
        nnx.update(model.image_proj_model, flat_to_nested({k: jnp.asarray(v)
                                                           for k, v in proj.items()}))
        nnx.update(model.unet, flat_to_nested({k: jnp.asarray(v) for k, v in unet_flat.items()}))
        return model

    def tokenizers(self):
        from leffa_jax.systems.text2image_model import load_tokenizer

        return tuple(load_tokenizer(p) for p in tokenizer_dirs(self.base_dir()))

    def prepare(self, model):
        c, s = self.config, self.config.storymaker
        # DDPMScheduler.from_pretrained(base, "scheduler") (L470): the base's betas, no zero-SNR
        self.schedule = schedulers.make_schedule(os.path.join(model.config_dir, "scheduler"),
                                                 rescale_betas_zero_snr=False)
        if model.vae_factor != 8:
            raise ConfigError(f"the VAE downsamples by {model.vae_factor}; the character masks "
                              "are prepared at 1/8 (SDXL)")
        self.empty_ids = tuple(np.asarray(t("")["input_ids"][0], np.int32)
                               for t in self.tokenizers())
        layers = loss_layers(model.unet.layer_resolutions(self.latent_hw), self.latent_hw)
        self.step_config = StepConfig(
            self.num_characters, self.latent_hw, layers, ip_loss=float(s.ip_loss),
            mask_loss_weight=float(s.mask_loss_weight), noise_offset=float(s.noise_offset),
            attn_divisor=float(s.attn_divisor), ip_scale=float(s.ip_scale),
            attention_kernel=c.model.attention_kernel, remat=bool(c.train.remat),
            chunk_size=s.get("chunk_size") or None)
        params, frozen = super().prepare(model)
        graphdef, adapter, base = nnx.split(model.unet, _is_unet_adapter, ...)
        self.graphdefs["unet"] = graphdef
        frozen["unet"] = base
        params[ADAPTER] = adapter
        return params, frozen

    def modules(self, trees, dtype=None):
        trees = dict(trees)
        adapter = trees.pop(ADAPTER)
        base = trees.pop("unet")
        if dtype is not None:
            trees, adapter, base = (cast_floating(t, dtype) for t in (trees, adapter, base))
        out = {n: nnx.merge(self.graphdefs[n], t) for n, t in trees.items()}
        out["unet"] = nnx.merge(self.graphdefs["unet"], adapter, base)
        return out

    # -------------------------------------------------------------- data
    def settings(self):
        from leffa_jax.data.characters import CharacterSettings

        d = self.config.data
        target = tuple(d.target_size) if d.get("target_size") else self.image_hw
        return CharacterSettings(*self.image_hw, self.num_characters, target)

    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        from leffa_jax.data.characters import example_shapes

        return example_shapes(self.settings())

    def data_root(self) -> str:
        from leffa_jax.data.characters import write_synthetic_characters

        d = self.config.data
        if d.synthetic_images:
            order = bool(d.get("synthetic_random_order", False))
            name = f"synthetic_characters_{self.image_hw[0]}x{self.image_hw[1]}"
            root = d.root or os.path.join(cache_dir(self.config), f"{name}_{d.synthetic_images}_"
                                          f"{d.seed}{'_random_order' if order else ''}")
            return write_synthetic_characters(root, int(d.synthetic_images), *self.image_hw,
                                              seed=int(d.seed), random_order=order)
        return d.root

    def dataset(self, split: str = "train"):
        from leffa_jax.data.characters import make_character_dataset

        d = self.config.data
        if self.num_characters != 2 and d.synthetic_images:
            raise ConfigError("the synthetic set has two characters per image: set "
                              "data.num_characters = 2")
        return make_character_dataset(
            self.data_root(), self.settings(), self.tokenizers(), batch_size=int(d.batch_size),
            seed=int(d.seed), process_index=jax.process_index(),
            process_count=jax.process_count(), read_threads=int(d.get("read_threads", 4)))

    # -------------------------------------------------------------- loss and export
    def loss(self, params, frozen, batch, rng):
        s = self.config.storymaker
        modules = self.modules({**frozen, **params}, self.dtype)
        b = batch["image"].shape[0]
        draws = sample_draws(rng, b, self.latent_hw, drop_image=s.drop_image,
                             drop_text=s.drop_text, drop_both=s.drop_both,
                             drop_face=s.drop_face_tokens, drop_clip=s.drop_clip_tokens,
                             num_train_timesteps=self.schedule.num_train_timesteps)
        empty = tuple(jnp.asarray(e) for e in self.empty_ids)
        out = storymaker_step(modules, batch, draws, self.schedule, empty, self.step_config,
                              dtype=self.dtype)
        return out["loss"], {"diffusion": out["diffusion"], "attention": out["attention"]}

    def load_into(self, model, params, frozen):
        params = dict(params)
        adapter = params.pop(ADAPTER, None)
        for name, tree in {**frozen, **params}.items():
            nnx.update(getattr(model, name), jax.device_get(tree))
        if adapter is not None:
            nnx.update(model.unet, jax.device_get(adapter))
        return model

    def export(self, model, params, frozen, out_dir: str) -> None:
        """`out_dir/storymaker_adapter.safetensors` (the leffa_jax adapter file; `convert` turns
        it into the official mask.bin) and the adapter config."""
        import json

        from leffa_jax.weights import storymaker as sm_weights

        self.load_into(model, params, frozen)
        os.makedirs(out_dir, exist_ok=True)
        sm_weights.save_adapter(model, os.path.join(out_dir, "storymaker_adapter.safetensors"))
        with open(os.path.join(out_dir, "storymaker_adapter.json"), "w") as f:
            json.dump(model.adapter_config.to_dict(), f, indent=1)


# ----------------------------------------------------------------------------- demo
def attention_in_masks(task: StoryMakerTask, models: dict[str, Any], batches, t: int = 500,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """{name: per character slot i, the share of character i's image-prompt attention mass
    (loss layers, upsampled, at h//2 x w//2) that lands inside its own mask,
    sum_pix S_i M_i / sum_pix S_i, averaged over the samples of `batches`} for models of the
    same architecture (one compilation); no dropout, timestep t, fixed noise. Chance level: the
    mask's area fraction."""
    trees = {}
    for name, model in models.items():
        params, frozen = task.prepare(model)
        trees[name] = {**frozen, **params}
    cfg = task.step_config
    empty = tuple(jnp.asarray(e) for e in task.empty_ids)

    @jax.jit
    def shares(trees, batch, draws):
        out = storymaker_step(task.modules(trees), batch, draws, task.schedule, empty, cfg)
        small = bilinear(batch["masks"], half_size(cfg.latent_hw))
        maps = group_attention_maps(out["masses"], cfg.latent_hw, 1.0)[..., 1:]
        return jnp.sum(maps * small, axis=(1, 2)) / jnp.sum(maps, axis=(1, 2))  # (B, n)

    keys = task.batch_shapes()
    results = {name: [] for name in models}
    for i, batch in enumerate(batches):
        b = batch["image"].shape[0]
        d = sample_draws(jax.random.PRNGKey(seed + i), b, cfg.latent_hw, drop_image=0.0,
                         drop_text=0.0, drop_both=0.0, drop_face=0.0, drop_clip=0.0)
        d = d._replace(t=jnp.full((b,), t, jnp.int32))
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in keys}
        for name, tree in trees.items():
            results[name].append(np.asarray(shares(tree, batch, d)))
    return {name: np.concatenate(v).mean(0) for name, v in results.items()}


def _eval_batches(task: StoryMakerTask, count: int, seed: int):
    from leffa_jax.data.characters import make_character_dataset, write_synthetic_characters

    c = task.config
    images = count * int(c.data.batch_size)
    order = bool(c.data.get("synthetic_random_order", False))
    root = os.path.join(cache_dir(c), f"synthetic_characters_eval_{task.image_hw[0]}_{seed}_"
                        f"{images}{'_random_order' if order else ''}")
    write_synthetic_characters(root, images, *task.image_hw, seed=seed, random_order=order)
    ds = make_character_dataset(root, task.settings(), task.tokenizers(),
                                batch_size=int(c.data.batch_size), seed=seed, shuffle=False,
                                num_epochs=1)
    return list(ds)


# The demo's attention-mask loss weight (official 0.1). The tiny random base's diffusion term is
# ~4-5 (a trained SDXL's ~0.1) and its gradients swamp the attention term's in the shared Adam
# updates: at 300 steps the unseen-image in-mask share stayed at chance with weight 1 and rose
# to ~0.47 / ~0.49 with 10 / 30 (configs/storymaker_tiny.py, docs/storymaker_training.md).
DEMO_IP_LOSS = 30.0


def demo(workdir: str, steps: int | None = None, ip_loss: float = DEMO_IP_LOSS,
         eval_batches: int = 4, random_order: bool = False) -> dict[str, np.ndarray]:
    """Train `configs/storymaker_tiny.py` twice on the synthetic two-character set, with and
    without the attention-mask loss (weight `ip_loss`, default 30 instead of the official 0.1:
    see DEMO_IP_LOSS), and print the image-prompt attention mass inside each character's mask
    on `eval_batches` x 4 unseen images (before training, and after each run)."""
    from leffa_jax import train
    from leffa_jax.configs import storymaker_tiny

    configs = {}
    for name, weight in (("with", ip_loss), ("without", 0.0)):
        c = storymaker_tiny.get_config()
        if steps is not None:
            c.train.steps = int(steps)
        c.storymaker.ip_loss = float(weight)
        c.data.synthetic_random_order = bool(random_order)
        c.model.cache_dir = os.path.join(workdir, "cache")
        run = os.path.join(workdir, f"{name}_attention_loss")
        train.train(c, run)  # resumes / returns at once when the run is complete
        configs[name] = c.copy_and_resolve_references()
        configs[name].model.adapter = os.path.join(run, "export",
                                                   "storymaker_adapter.safetensors")
    untrained = configs["with"].copy_and_resolve_references()
    untrained.model.adapter = ""
    task = StoryMakerTask(untrained)
    batches = _eval_batches(task, eval_batches, seed=1000)
    models = {"untrained": task.init_model(),
              **{name: StoryMakerTask(c).init_model() for name, c in configs.items()}}
    results = attention_in_masks(task, models, batches)
    results["area"] = np.concatenate([np.asarray(bilinear(jnp.asarray(b["masks"]),
                                                          half_size(task.latent_hw)))
                                      for b in batches]).mean(axis=(0, 1, 2))
    print("image-prompt attention mass of each character's tokens inside its own mask "
          "(unseen synthetic images, t=500):")
    for key in ("area", "untrained", "without", "with"):
        label = {"area": "mask area (chance)", "untrained": "untrained adapter",
                 "without": "trained without attention loss",
                 "with": "trained with attention loss"}[key]
        print(f"  {label:34s} " + "  ".join(f"char {i}: {v:.3f}"
                                            for i, v in enumerate(results[key])))
    return results


def main(argv=None) -> int:
    import argparse

    from leffa_jax.cli import positive_int

    parser = argparse.ArgumentParser(
        prog="python -m leffa_jax.systems.storymaker_train",
        description="StoryMaker's embedded demo: tiny training with vs without the "
                    "attention-mask loss on synthetic two-character images (2 CPU cores, a few "
                    "minutes per run).")
    parser.add_argument("--demo", action="store_true", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="default: the tiny config's")
    parser.add_argument("--ip-loss", type=float, default=DEMO_IP_LOSS,
                        help="attention-mask loss weight of the 'with' run (official: 0.1)")
    parser.add_argument("--random-order", action="store_true",
                        help="list each image's characters in a random order (training and "
                             "evaluation sets), so that only their looks tell them apart")
    args = parser.parse_args(argv)
    demo(args.workdir, args.steps, args.ip_loss, random_order=args.random_order)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
