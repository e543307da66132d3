"""Face-diffuser training: the SDM and TDM losses (official `model.py:496-584`,
`model_text_only.py:186-236`) and their Tasks for the generic trainer.

SDM loss (`sdm_loss`), with the random draws as inputs (`Draws`: posterior noise, noise,
timesteps, mask coin; the Task draws them from its rng, tests replay recorded ones):
    z0  = (mean + exp(logvar / 2) xi) * scaling       the SDM's VAE, logvar clamped [-30, 20]
    z_t = add_noise(z0, eps, t)
    c   = postfuse(text_encoder(ids), image_encoder(objects), token_idx, token_valid)
    pred = unet(z_t, t, c); if coin < mask_loss_prob: pred, eps *= bilinear(any segmap > 0)
    L_denoise = mean((pred - eps)^2) over all elements
    L_loc = mean over the selected attn2 layers of mean_{b, heads}(sum_k valid * BL1 / (n_k + 1e-5))
            BL1_{b,h,k} = sum_n a (1 - s) / (sum_n (1 - s) + 1e-5) - sum_n a s / (sum_n s + 1e-5)
            a = post-softmax cross-attention probability of object k's token, s = its
            segmentation map resized to the layer's grid (bilinear, antialias)
    L = L_denoise + lambda L_loc          (lambda = 1e-3 in the released recipe)
Selected layers (`localization_layers`): the middle `n` of [down_blocks.0..2, mid_block,
up_blocks.1..3] (n = 5: down 1, 2, mid, up 1, 2; 11 attn2 in SD1.5).
TDM loss: L_denoise without mask or localisation, plain text condition.

Trained: SDM = UNet, postfuse and the last `vision_trainable_layers` (2) CLIP vision layers; TDM =
UNet. Batches (`leffa_jax.data.fastcomposer`): image (H, W, 3) in [-1, 1], input_ids (77,),
image_token_idx / image_token_valid (K,), objects (K, r, r, 3) in [0, 1], segmaps (K, H, W).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import schedulers
from leffa_jax.objectives import epsilon_mse
from leffa_jax.systems.face_diffuser import FaceDiffuserModel, resize_antialias
from leffa_jax.training.config import ConfigError
from leffa_jax.training.task import Task, cast_floating

_F32 = jnp.float32
# The official UNET_LAYER_NAMES (model.py:283): the blocks localisation can hook.
UNET_LAYER_NAMES = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                    "up_blocks.1", "up_blocks.2", "up_blocks.3")


class Draws(NamedTuple):
    """The random draws of one loss call: posterior_noise, noise (B, h, w, 4); timesteps (B,)
    int; mask_coin () float in [0, 1)."""

    posterior_noise: jax.Array
    noise: jax.Array
    timesteps: jax.Array
    mask_coin: jax.Array


def make_draws(rng: jax.Array, latent_shape: tuple[int, ...], num_train_timesteps: int
               ) -> Draws:
    k_post, k_noise, k_t, k_coin = jax.random.split(rng, 4)
    return Draws(jax.random.normal(k_post, latent_shape, _F32),
                 jax.random.normal(k_noise, latent_shape, _F32),
                 jax.random.randint(k_t, (latent_shape[0],), 0, num_train_timesteps),
                 jax.random.uniform(k_coin, (), _F32))


# --------------------------------------------------------------------------------------------
# Localisation layers and loss
# --------------------------------------------------------------------------------------------


def unet_attention_layers(unet) -> list[tuple[str, int]]:
    """(official attn2 module name, transformer layer index) of every transformer layer, in call
    order (down, mid, up)."""
    out = []

    def blocks(prefix, block_list):
        for i, blk in enumerate(block_list):
            if blk.attentions is None:
                continue
            for j, transformer in enumerate(blk.attentions):
                for k, tb in enumerate(transformer.transformer_blocks):
                    out.append((f"{prefix}.{i}.attentions.{j}.transformer_blocks.{k}.attn2",
                                tb.layer_index))

    blocks("down_blocks", unet.down_blocks)
    for j, transformer in enumerate(unet.mid_block.attentions):
        for k, tb in enumerate(transformer.transformer_blocks):
            out.append((f"mid_block.attentions.{j}.transformer_blocks.{k}.attn2", tb.layer_index))
    blocks("up_blocks", unet.up_blocks)
    return sorted(out, key=lambda item: item[1])


def localization_layers(unet, layers: int = 5) -> list[tuple[str, int]]:
    """The hooked attn2 layers (name, layer index) for `--localization_layers` (official
    `unet_store_cross_attention_scores`: the middle `layers` of UNET_LAYER_NAMES)."""
    if not 1 <= layers <= len(UNET_LAYER_NAMES):
        raise ConfigError(f"localization_layers must be in 1..{len(UNET_LAYER_NAMES)}, got "
                          f"{layers}")
    start = (len(UNET_LAYER_NAMES) - layers) // 2
    chosen = UNET_LAYER_NAMES[start:start + layers]
    return [(name, index) for name, index in unet_attention_layers(unet)
            if name.startswith(tuple(c + "." for c in chosen))]


def token_probability_probe(layers, token_idx: jax.Array):
    """Attention probe: at the text cross-attention of the given layer indices, the per-head
    post-softmax probabilities of each object's token, (B, heads, N, K) float32."""
    wanted = frozenset(layers)

    def probe(site, q, k, hw):
        if site.branch != "text" or site.layer_index not in wanted:
            return None
        d = q.shape[-1]
        logits = jnp.einsum("bhnd,bhmd->bhnm", q.astype(_F32), k.astype(_F32)) / math.sqrt(d)
        probs = jax.nn.softmax(logits, axis=-1)
        idx = jnp.broadcast_to(token_idx[:, None, None, :].astype(jnp.int32),
                               probs.shape[:3] + (token_idx.shape[-1],))
        return jnp.take_along_axis(probs, idx, axis=-1)

    return probe


def balanced_l1(probs: jax.Array, segmaps: jax.Array, valid: jax.Array) -> jax.Array:
    """One layer's localisation loss: probs (B, heads, N, K), segmaps (B, K, N) in [0, 1],
    valid (B, K) -> scalar (official get_object_localization_loss_for_one_layer)."""
    s = jnp.swapaxes(segmaps, 1, 2)[:, None].astype(_F32)          # (B, 1, N, K)
    background = (probs * (1 - s)).sum(2) / ((1 - s).sum(2) + 1e-5)
    foreground = (probs * s).sum(2) / (s.sum(2) + 1e-5)
    loss = (background - foreground) * valid[:, None, :].astype(_F32)  # (B, heads, K)
    count = valid.astype(_F32).sum(1)[:, None] + 1e-5
    return jnp.mean(loss.sum(2) / count)


def segmaps_at(segmaps: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """(B, K, H, W) -> (B, K, h * w): bilinear antialias resize (torch's), flattened row-major."""
    b, k, h, w = segmaps.shape
    x = resize_antialias(segmaps.reshape(b * k, h, w, 1).astype(_F32), hw)
    return x.reshape(b, k, hw[0] * hw[1])


def loss_mask(segmaps: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """(B, K, H, W) -> (B, h, w, 1): any object pixel, bilinear (no antialias) to the latent."""
    union = (segmaps.sum(1) > 0).astype(_F32)[..., None]
    b = union.shape[0]
    return jax.image.resize(union, (b, *latent_hw, 1), "linear", antialias=False)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


class LossConfig(NamedTuple):
    localization_weight: float = 1e-3
    localization_layers: int = 5
    mask_loss: bool = True
    mask_loss_prob: float = 0.5
    object_localization: bool = True


def _noisy_latents(vae, image, draws: Draws, schedule, dtype):
    post = vae.encode(image.astype(dtype))
    z0 = vae.sample_posterior(post, draws.posterior_noise) * vae.config.scaling_factor
    z0 = jax.lax.stop_gradient(z0.astype(_F32))
    return schedulers.add_noise(schedule, z0, draws.noise.astype(_F32), draws.timesteps)


def sdm_loss(model: FaceDiffuserModel, batch: dict, draws: Draws, schedule, cfg: LossConfig,
             dtype=_F32, attention_kernel: str = "xla", remat: bool = False):
    """-> (loss, {"denoise", "localization", "layer_<name>"...}, aux {"context", "pred",
    "object_embeds", "text"}); see the module docstring."""
    z_t = _noisy_latents(model.vae, batch["image"], draws, schedule, dtype)
    text = model.encode_text(batch["input_ids"], dtype).astype(_F32)
    object_embeds = model.encode_objects(batch["objects"], dtype).astype(_F32)
    context = model.augment(text, object_embeds, batch["image_token_idx"],
                            batch["image_token_valid"])
    layers = localization_layers(model.unet, cfg.localization_layers) \
        if cfg.object_localization else []
    probe = token_probability_probe([i for _, i in layers], batch["image_token_idx"]) \
        if layers else None
    out = model.unet(z_t.astype(dtype), draws.timesteps, context.astype(dtype),
                     attention_probe=probe, attention_kernel=attention_kernel, remat=remat)
    pred, target = out.sample.astype(_F32), draws.noise.astype(_F32)
    if cfg.mask_loss:
        m = loss_mask(batch["segmaps"], pred.shape[1:3])
        use = draws.mask_coin < cfg.mask_loss_prob
        pred = jnp.where(use, pred * m, pred)
        target = jnp.where(use, target * m, target)
    denoise = epsilon_mse(pred, target)
    metrics = {"denoise": denoise}
    localization = jnp.zeros((), _F32)
    if layers:
        per_layer = []
        for name, index in layers:
            probs = out.attention_probes[index, "text"]
            hw = model.unet.layer_resolutions(pred.shape[1:3])[index]
            value = balanced_l1(probs, segmaps_at(batch["segmaps"], hw),
                                batch["image_token_valid"])
            metrics[f"layer_{name}"] = value
            per_layer.append(value)
        localization = jnp.mean(jnp.stack(per_layer))
    metrics["localization"] = localization
    loss = denoise + cfg.localization_weight * localization
    aux = {"context": context, "pred": out.sample, "object_embeds": object_embeds, "text": text,
           "z_t": z_t}
    return loss, metrics, aux


def tdm_loss(model: FaceDiffuserModel, batch: dict, draws: Draws, schedule, dtype=_F32,
             attention_kernel: str = "xla", remat: bool = False):
    """-> (mse, {"denoise"}): the text-only model's epsilon MSE."""
    z_t = _noisy_latents(model.vae, batch["image"], draws, schedule, dtype)
    context = model.encode_text(batch["input_ids"], dtype)
    pred = model.unet(z_t.astype(dtype), draws.timesteps, context.astype(dtype),
                      attention_kernel=attention_kernel, remat=remat).sample
    loss = epsilon_mse(pred, draws.noise)
    return loss, {"denoise": loss}


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def _vision_split(num_layers: int, trainable: int):
    """nnx filter of the last `trainable` vision encoder layers."""
    first = num_layers - trainable

    def is_top(path, value):
        parts = [str(p) for p in path]
        for a, b, c in zip(parts, parts[1:], parts[2:], strict=False):
            if (a, b) == ("encoder", "layers") and c.isdigit() and int(c) >= first:
                return True
        return False

    return nnx.All(nnx.Param, is_top)


def tiny_base_dir() -> str:
    """The tiny random SD1.5 + CLIP config folders of the shared fixtures (LEFFA_SHARED or
    ../shared beside the checkout): the `model.base = ""` default of the tiny config."""
    import pathlib

    shared = os.environ.get("LEFFA_SHARED") or str(
        pathlib.Path(__file__).resolve().parents[3] / "shared")
    return os.path.join(shared, "fixtures", "face_diffuser", "config")


def config_folder(model_config, layout: str) -> str:
    """The config folder a random model is built from: `model.base` if it already holds
    image_encoder/ and postfuse/ (or, for the TDM, unet/ vae/ text_encoder/), else staged once
    into a cache folder from the SD1.5 base (`model.base`, "" = the tiny fixture one) + the CLIP
    config (`model.clip`, "" = ViT-L/14's; the tiny fixture's for the tiny base)."""
    import hashlib
    import shutil
    import tempfile

    from leffa_jax.weights import plan_face_diffuser as fd_plan

    base, clip = model_config.base, model_config.get("clip", "")
    if not base:
        tiny = tiny_base_dir()
        base, clip = os.path.join(tiny, "base_sd15"), clip or os.path.join(tiny, "tiny_clip")
    needed = ("image_encoder", "postfuse") if layout == "sdm" else ()
    if all(os.path.isdir(os.path.join(base, n)) for n in ("unet", "vae", "text_encoder", *needed)):
        return base
    key = hashlib.sha1(f"{os.path.abspath(base)}|{clip}".encode()).hexdigest()[:12]
    target = os.path.join(tempfile.gettempdir(), f"leffa_jax_face_diffuser_configs_{key}")
    if not os.path.isdir(target):
        staging = tempfile.mkdtemp(prefix=".fd_configs-", dir=tempfile.gettempdir())
        from leffa_jax.nn.clip_config import CLIPTextConfig

        width = CLIPTextConfig.from_json(os.path.join(base, "text_encoder")).hidden_size
        fd_plan.stage_configs(staging, base, "sdm", clip or None, width)
        try:
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


class _FaceDiffuserTask(Task):
    """Shared parts of the SDM and TDM tasks (`config.face_diffuser` holds the loss settings,
    `config.model` the initialisation, `config.data` the FastComposer layout or the synthetic
    set)."""

    layout = "sdm"

    def __init__(self, config):
        super().__init__(config)
        self.dtype = jnp.dtype(config.train.dtype)
        self.image_hw = (int(config.data.resolution), int(config.data.resolution))
        self.schedule = None

    def validate(self) -> None:
        from leffa_jax.data import fastcomposer

        if int(self.config.train.batch_size) != int(self.config.data.batch_size):
            raise ConfigError(f"train.batch_size {self.config.train.batch_size} != "
                              f"data.batch_size {self.config.data.batch_size}: set both")
        fastcomposer.check_config(self.config.data)
        init, base = self.config.model.init, self.config.model.base
        if init == "pretrained":
            check_pretrained(self.config.model, self.layout)
        elif init != "random" and not os.path.exists(init):
            raise ConfigError(f"config.model.init {init}: not found; give a converted "
                              f"Face-diffuser {self.layout.upper()} folder (python -m "
                              "leffa_jax.convert face-diffuser) or 'random'")
        if init == "random" and base and not os.path.isdir(base):
            raise ConfigError(f"config.model.base {base} is not a folder: give the SD1.5 "
                              "diffusers folder (its configs), or '' for the tiny test model")
        if init == "random" and not base and not os.path.isdir(tiny_base_dir()):
            raise ConfigError(f"config.model.base is '' (the tiny fixture model) but "
                              f"{tiny_base_dir()} does not exist: set LEFFA_SHARED to the folder "
                              "holding fixtures/, or config.model.base to an SD1.5 folder")

    def config_dir(self) -> str:
        if self.config.model.init in ("random", "pretrained"):
            return config_folder(self.config.model, self.layout)
        init = self.config.model.init
        return os.path.join(init, "config") if os.path.isdir(init) else config_folder(
            self.config.model, self.layout)

    def init_model(self) -> FaceDiffuserModel:
        from leffa_jax.systems.face_diffuser import load_model

        init = self.config.model.init
        if init == "random":
            return random_model(self.config_dir(), self.layout, self.config.train.seed)
        if init == "pretrained":
            return pretrained_model(self.config.model.base, self.config.model.clip,
                                    self.layout, self.config_dir(), self.config.train.seed)
        return load_model(init, self.config.model.base or None, layout=self.layout)

    def prepare(self, model):
        self.schedule = schedulers.make_schedule(os.path.join(self.config_dir(), "scheduler"))
        return super().prepare(model)

    def dataset(self, split: str = "train"):
        from leffa_jax.data import fastcomposer

        return fastcomposer.make_dataset(self.config.data, self.tokenizer(), split,
                                         seed=int(self.config.train.seed))

    def tokenizer(self):
        from leffa_jax.systems.text2image_model import load_tokenizer

        return load_tokenizer(os.path.join(self.config_dir(), "tokenizer"))

    def batch_shapes(self):
        d = self.config.data
        k, r = int(d.max_num_objects), int(d.object_resolution)
        return {"image": (*self.image_hw, 3), "input_ids": (77,), "image_token_idx": (k,),
                "image_token_valid": (k,), "objects": (k, r, r, 3), "segmaps": (k, *self.image_hw)}

    def export(self, model, params, frozen, out_dir: str) -> None:
        save_model(self.load_into(model, params, frozen), out_dir, self.config_dir())

    def image_row(self, model, params, frozen, host_batch) -> list[np.ndarray]:
        """The training image and its first subject crop."""
        from leffa_jax.imageio import to_uint8

        row = [to_uint8(np.asarray(host_batch["image"][0]))]
        if "objects" in host_batch:
            obj = np.asarray(host_batch["objects"][0, 0])
            row.append(np.round(np.clip(obj, 0, 1) * 255).astype(np.uint8))
        return row


class SubjectModelTask(_FaceDiffuserTask):
    """SDM training: UNet, postfuse and the last `face_diffuser.vision_trainable_layers` CLIP
    vision layers trained; denoising (+ mask coin) and localisation losses."""

    name = "face_diffuser_sdm"
    layout = "sdm"
    components = ("text_encoder", "image_encoder", "vae", "unet", "postfuse_module")
    trainable = ("unet", "postfuse_module")

    def loss_config(self) -> LossConfig:
        fd = self.config.face_diffuser
        return LossConfig(float(fd.localization_weight), int(fd.localization_layers),
                          bool(fd.mask_loss), float(fd.mask_loss_prob),
                          bool(fd.object_localization))

    def prepare(self, model):
        params, frozen = super().prepare(model)
        n = int(self.config.face_diffuser.vision_trainable_layers)
        if n:
            layers = model.image_encoder.vision_model.config.num_hidden_layers
            graphdef, top, rest = nnx.split(model.image_encoder, _vision_split(layers, n), ...)
            self.graphdefs["image_encoder"] = graphdef
            params["image_encoder_top"], frozen["image_encoder"] = top, rest
        return params, frozen

    def modules(self, trees, dtype=None):
        if dtype is not None:
            trees = cast_floating(trees, dtype)
        trees = dict(trees)
        top = trees.pop("image_encoder_top", None)
        out = {}
        for name, tree in trees.items():
            if name == "image_encoder" and top is not None:
                out[name] = nnx.merge(self.graphdefs[name], top, tree)
            else:
                out[name] = nnx.merge(self.graphdefs[name], tree)
        return out

    def load_into(self, model, params, frozen):
        params = dict(params)
        top = params.pop("image_encoder_top", None)
        super().load_into(model, params, frozen)
        if top is not None:
            nnx.update(model.image_encoder, jax.device_get(top))
        return model

    def loss(self, params, frozen, batch, rng):
        modules = self.modules({**frozen, **params}, self.dtype)
        model = FaceDiffuserModel(modules)
        b = batch["image"].shape[0]
        f = modules["vae"].downsample_factor
        shape = (b, self.image_hw[0] // f, self.image_hw[1] // f, modules["unet"].config.in_channels)
        draws = make_draws(rng, shape, self.schedule.num_train_timesteps)
        loss, metrics, _ = sdm_loss(model, batch, draws, self.schedule, self.loss_config(),
                                    self.dtype, self.config.model.attention_kernel,
                                    bool(self.config.train.remat))
        return loss, {k: v for k, v in metrics.items() if not k.startswith("layer_")}


class TextModelTask(_FaceDiffuserTask):
    """TDM training: the UNet on plain captions (text-only fine-tuning)."""

    name = "face_diffuser_tdm"
    layout = "tdm"
    components = ("text_encoder", "vae", "unet")
    trainable = ("unet",)

    def batch_shapes(self):
        return {"image": (*self.image_hw, 3), "input_ids": (77,)}

    def loss(self, params, frozen, batch, rng):
        modules = self.modules({**frozen, **params}, self.dtype)
        model = FaceDiffuserModel(modules)
        b = batch["image"].shape[0]
        f = modules["vae"].downsample_factor
        shape = (b, self.image_hw[0] // f, self.image_hw[1] // f, modules["unet"].config.in_channels)
        draws = make_draws(rng, shape, self.schedule.num_train_timesteps)
        return tdm_loss(model, batch, draws, self.schedule, self.dtype,
                        self.config.model.attention_kernel, bool(self.config.train.remat))


# --------------------------------------------------------------------------------------------
# Random init and export
# --------------------------------------------------------------------------------------------


def random_model(config_dir: str, layout: str, seed: int = 0) -> FaceDiffuserModel:
    """A randomly initialised SDM/TDM built from a config folder (unet/, vae/, text_encoder/,
    and for the SDM image_encoder/ and postfuse/)."""
    from leffa_jax import components as components_lib
    from leffa_jax.weights import plan_face_diffuser as fd_plan

    rngs = nnx.Rngs(seed)
    system = fd_plan.SDM if layout == "sdm" else fd_plan.TDM
    return FaceDiffuserModel({c.name: components_lib.build(c, config_dir, rngs=rngs)
                              for c in system})


def check_pretrained(model_config, layout: str) -> None:
    """ConfigError naming the key and the fix unless `model.base` is an SD1.5 diffusers folder
    with unet/, vae/, text_encoder/ and (SDM) `model.clip` a CLIP folder; cheap (no weights
    read)."""
    base, clip = model_config.base, model_config.get("clip", "")
    if not base or not os.path.isdir(base):
        raise ConfigError(f"config.model.init 'pretrained' starts from Stable Diffusion 1.5: set "
                          f"config.model.base to its diffusers folder (got {base!r}), e.g. a "
                          "download of runwayml/stable-diffusion-v1-5")
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not os.path.isdir(os.path.join(base, n))]
    if missing:
        raise ConfigError(f"config.model.base {base} lacks {', '.join(m + '/' for m in missing)}:"
                          " give the whole SD1.5 diffusers folder")
    if layout == "sdm" and (not clip or not os.path.isfile(os.path.join(clip, "config.json"))):
        raise ConfigError(f"config.model.init 'pretrained' builds the SDM's image encoder from "
                          f"CLIP ViT-L/14: set config.model.clip to its transformers folder "
                          f"(got {clip!r}), e.g. a download of openai/clip-vit-large-patch14")


def pretrained_model(base_dir: str, clip_dir: str, layout: str, config_dir: str, seed: int = 0
                     ) -> FaceDiffuserModel:
    """The released recipe's starting point (FastComposer/Face-diffuser train.py): UNet, VAE and
    text encoder of an SD1.5 diffusers folder; for the SDM the vision tower + projection of a
    CLIP folder (the official openai/clip-vit-large-patch14 CLIPModel, or a
    CLIPVisionModelWithProjection) and a fresh postfuse MLP drawn as PyTorch's nn.Linear default
    (seeded by `seed`). `config_dir`: the staged configs (`config_folder`), also written on
    export."""
    from leffa_jax import components as components_lib
    from leffa_jax.nn.postfuse import torch_default_init
    from leffa_jax.weights import folder as weights_folder
    from leffa_jax.weights import pipeline_folders, plans
    from leffa_jax.weights import plan_face_diffuser as fd_plan
    from leffa_jax.weights.modules import module_from_flat

    system = fd_plan.SDM if layout == "sdm" else fd_plan.TDM
    from_base = tuple(c for c in system if c.name in fd_plan.BASE_FOLDERS)
    plan = plans.plan_folder(base_dir, from_base)
    flat = plan.read_params()
    modules = {c.name: module_from_flat(plan.components[c.name], base_dir,
                                        weights_folder.split_params(flat, c.name))
               for c in from_base}
    if layout == "sdm":
        modules["image_encoder"] = pipeline_folders.load_image_encoder(clip_dir, projection=True)
        component = next(c for c in system if c.name == "postfuse_module")
        postfuse = components_lib.build(component, config_dir, rngs=nnx.Rngs(seed))
        torch_default_init(postfuse, jax.random.key(seed))
        modules["postfuse_module"] = postfuse
    return FaceDiffuserModel({c.name: modules[c.name] for c in system})


def save_model(model: FaceDiffuserModel, out_dir: str, config_dir: str) -> None:
    """A leffa_jax SDM/TDM checkpoint folder (loadable by `face_diffuser.load_model`, written
    back to the official layout by `convert face-diffuser-to-torch`)."""
    from leffa_jax.weights import folder as weights_folder
    from leffa_jax.weights import plan_face_diffuser as fd_plan
    from leffa_jax.weights.modules import module_to_flat

    system = fd_plan.SDM if "postfuse_module" in model.component_names else fd_plan.TDM
    components = []
    params = {}
    from leffa_jax import components as components_lib

    for c in system:
        module = getattr(model, c.name)
        components.append(components_lib.with_options(c, **components_lib.recorded_options(
            c, module)))
        params.update({f"{c.name}.{k}": v for k, v in module_to_flat(module).items()})
    weights_folder.save_flax_checkpoint(out_dir, params, config_dir, components, overwrite=True)


def numpy_batch(batch: dict) -> dict:
    return {k: np.asarray(v) for k, v in batch.items()}
