"""Leffa's training Task: the reference and generative UNets trained, the VAE frozen.

One loss evaluation (`LeffaTask.loss`), inside the generic jitted step (`training/step.py`):
    1. frozen VAE: z = E(person), z_masked = E(person * (mask < .5)), z_ref = E(garment), each a
       posterior SAMPLE times the scaling factor (no gradient);
    2. t ~ U{0..T-1}, eps ~ N(0, 1), z_t = add_noise(z, eps, t); z_ref zeroed with probability
       `config.train.ref_drop_prob` per sample (the unconditional branch of guidance);
    3. feats = reference_unet(z_ref, t); eps_hat = generative_unet(generative_input(z_t,
       inpainting_conditions(mask, z_masked, densepose)), t, feats), in the Leffa stage with a
       flow probe on the selected layers;
    4. loss = ||eps_hat - eps||^2 + Leffa loss (samples whose reference was dropped are gated
       out); metrics {"mse", "leffa"}.
The noise schedule is `schedulers.schedule_for_model(model)` (+ `config.model.
scheduler_overrides`). Batches: person, garment, densepose (H, W, 3) in [-1, 1]; mask,
garment_mask (H, W, 1) in {0, 1} (`leffa_jax.data`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from leffa_jax import schedulers
from leffa_jax.model import LeffaModel, generative_input, inpainting_conditions, tiny_config_dir
from leffa_jax.objectives import (
    LOSS_WEIGHTINGS,
    LeffaLossConfig,
    epsilon_mse,
    flow_probe,
    leffa_loss_from_flows,
    loss_weights,
    selected_layers,
)
from leffa_jax.training.config import ConfigError
from leffa_jax.training.task import Task

BATCH_CHANNELS = (("person", 3), ("garment", 3), ("mask", 1), ("densepose", 3),
                  ("garment_mask", 1))


def leffa_loss_config(config) -> LeffaLossConfig:
    """`config.leffa` -> LeffaLossConfig."""
    leffa = config.leffa
    return LeffaLossConfig(lam=leffa.lam, tau=leffa.tau, t_threshold=leffa.t_threshold,
                           min_ratio=leffa.min_ratio, kind=leffa.kind, fused=leffa.fused,
                           chunk_size=leffa.get("chunk_size") or None,
                           layers=tuple(leffa.layers) if leffa.get("layers") else None)


def init_model(config) -> LeffaModel:
    """The model the run starts from (`config.model.init`):
    "random"               a random SD-inpainting model of `config.model.base` (a config folder,
                           or "tiny") set up as "sd_inpainting" does (both UNets the same);
    "sd_inpainting:DIR"    both UNets from a diffusers SD(XL)-inpainting folder (see
                           `LeffaModel.from_sd_inpainting`), VAE from it too;
    "leffa:PATH"           an official checkpoint (+ `config.model.base`) or a leffa_jax folder,
                           e.g. the `export/` of the previous stage's workdir.
    """
    check_init(config)
    base = config.model.base
    base = tiny_config_dir() if base in ("", "tiny") else base
    kind, _, path = config.model.init.partition(":")
    if kind == "random":
        return LeffaModel.random_sd_inpainting(base, config.train.seed)
    if kind == "sd_inpainting":
        return LeffaModel.from_sd_inpainting(path)
    return LeffaModel.from_pretrained(path, None if os.path.isdir(path) else base)


def check_init(config) -> None:
    """ConfigError unless `config.model.init` names a known kind and an existing path."""
    init = config.model.init
    kind, _, path = init.partition(":")
    if init != "random" and kind not in ("sd_inpainting", "leffa"):
        raise ConfigError(f"config.model.init={init!r}: use random, sd_inpainting:DIR or "
                          "leffa:PATH")
    if kind != "random" and not os.path.exists(path):
        hint = ("for a previous stage, point at its workdir's export/ folder" if kind == "leffa"
                else "give the diffusers SD-inpainting model's folder")
        raise ConfigError(f"config.model.init: {path} not found ({hint})")


def check_data(data) -> None:
    """ConfigError naming the field for a data config that cannot give batches: the values
    (`leffa_jax.data.config.validate`) and, for a real dataset, a set and existing `data.root`
    (remote roots such as gs:// are checked when read)."""
    from leffa_jax.data import config as data_config

    try:
        data_config.validate(data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if data.name.startswith("synthetic") or data.tfds_dir:
        return
    if not data.root:
        raise ConfigError("data.root is empty: set --config.data.root to the dataset folder "
                          "(layout in docs/data.md), or data.tfds_dir to a TFDS data_dir")
    if "://" not in data.root and not os.path.isdir(data.root):
        what = "is not a folder" if os.path.exists(data.root) else "does not exist"
        raise ConfigError(f"data.root {data.root} {what}: set --config.data.root to the "
                          f"{data.name} dataset folder (layout in docs/data.md)")


def _encode_latents(vae, batch: dict, dtype, rng) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(z, z_masked, z_ref): scaled posterior samples of person, masked person and garment."""
    scale = vae.config.scaling_factor
    person = batch["person"].astype(dtype)
    keep = (batch["mask"].astype(dtype) < 0.5).astype(dtype)
    keys = jax.random.split(rng, 3)

    def encode(x, key):
        post = vae.encode(x)
        z = vae.sample_posterior(post, jax.random.normal(key, post.mean.shape, dtype))
        return jax.lax.stop_gradient(z * scale)

    return (encode(person, keys[0]), encode(person * keep, keys[1]),
            encode(batch["garment"].astype(dtype), keys[2]))


class LeffaTask(Task):
    name = "leffa"
    components = ("vae", "unet_encoder", "unet")
    trainable = ("unet_encoder", "unet")
    loss_weightings = LOSS_WEIGHTINGS

    def __init__(self, config):
        super().__init__(config)
        self.dtype = jnp.dtype(config.train.dtype)
        self.image_hw = (int(config.data.height), int(config.data.width))
        self.loss_config = leffa_loss_config(config)
        self.schedule: schedulers.Schedule | None = None
        self.latent_hw: tuple[int, int] | None = None

    def validate(self) -> None:
        """The data settings and folder, the batch sizes and `model.init` (see `check_data`,
        `check_init`); ConfigError naming the key and the fix."""
        self._check_batch_sizes()
        check_data(self.config.data)
        check_init(self.config)

    def _check_batch_sizes(self) -> None:
        train, data = self.config.train.batch_size, self.config.data.batch_size
        if train != data:
            raise ConfigError(f"train.batch_size {train} != data.batch_size {data}: set both "
                              "(or only train.batch_size)")

    def init_model(self) -> LeffaModel:
        return init_model(self.config)

    def prepare(self, model: LeffaModel):
        overrides = dict(self.config.model.get("scheduler_overrides", {}))
        self.schedule = schedulers.schedule_for_model(model, **overrides)
        factor = model.vae.downsample_factor
        self.latent_hw = (self.image_hw[0] // factor, self.image_hw[1] // factor)
        return super().prepare(model)

    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: (*self.image_hw, ch) for k, ch in BATCH_CHANNELS}

    def dataset(self, split: str = "train"):
        from leffa_jax.data import pipeline as data_pipeline

        self._check_batch_sizes()
        return data_pipeline.make_dataset(self.config.data, split)

    def loss(self, params, frozen, batch, rng):
        """-> (mse + leffa, {"mse", "leffa"}); see the module docstring."""
        dtype, schedule, loss_config = self.dtype, self.schedule, self.loss_config
        model = self.modules({**frozen, **params}, dtype)
        kernel = self.config.model.attention_kernel
        remat = bool(self.config.train.remat)
        b = batch["person"].shape[0]
        k_post, k_t, k_noise, k_drop = jax.random.split(rng, 4)
        z, z_masked, z_ref = _encode_latents(model["vae"], batch, dtype, k_post)
        drop = jax.random.uniform(k_drop, (b,)) < float(self.config.train.ref_drop_prob)
        z_ref = jnp.where(drop[:, None, None, None], 0.0, z_ref).astype(dtype)
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, z.shape, jnp.float32)
        z_t = schedulers.add_noise(schedule, z.astype(jnp.float32), noise, t).astype(dtype)
        gen_in = generative_input(z_t, inpainting_conditions(batch["mask"], z_masked,
                                                             batch["densepose"]))
        feats = model["unet_encoder"](z_ref, t, collect_features=True, attention_kernel=kernel,
                                      remat=remat).features
        use_leffa = bool(self.config.leffa.enabled)
        probe = None
        if use_leffa:
            layers = selected_layers(model["unet"], self.latent_hw, self.image_hw, loss_config)
            probe = flow_probe(layers, loss_config.tau, fused=loss_config.fused,
                               chunk_size=loss_config.chunk_size)
        out = model["unet"](gen_in, t, reference_features=feats, probe=probe,
                            attention_kernel=kernel, remat=remat)
        mse = epsilon_mse(out.sample, noise, loss_weights(self.config.train, schedule, t))
        leffa = jnp.zeros((), jnp.float32)
        if use_leffa:
            # a dropped (zero) reference has nothing to point at: gate those samples out too
            t_gate = jnp.where(drop, schedule.num_train_timesteps, t)
            leffa = leffa_loss_from_flows(out.probes, batch["garment"], batch["person"],
                                          batch["garment_mask"], t_gate, loss_config)
        return mse + leffa, {"mse": mse, "leffa": leffa}

    def export(self, model: LeffaModel, params, frozen, out_dir: str) -> None:
        """A leffa_jax checkpoint folder that records the size it was trained at
        (`"resolution": [height, width]` in leffa_jax.json): sampling defaults to it."""
        self.load_into(model, params, frozen).save_pretrained(
            out_dir, meta={"resolution": list(self.image_hw)})

    def image_row(self, model, params, frozen, host_batch) -> list[np.ndarray]:
        """person | garment | mask | sample (EMA, `config.log.sample_steps` steps, guidance
        2.5) | Leffa flow of the first flow layer | garment warped by it."""
        from leffa_jax import pipeline, viz

        self.load_into(model, params, frozen)
        b = {k: np.asarray(v[:1]) for k, v in host_batch.items()}
        row = [viz.to_uint8(b["person"][0]), viz.to_uint8(b["garment"][0]),
               np.repeat(np.round(b["mask"][0] * 255).astype(np.uint8), 3, -1)]
        out = pipeline.generate(model, b["person"], b["garment"], b["mask"], b["densepose"],
                                steps=int(self.config.log.sample_steps), guidance=2.5, seed=0)
        row.append(np.asarray(out.images[0]))
        pics = viz.attention_pictures(model, b["person"][0], b["garment"][0], b["mask"][0],
                                      b["densepose"][0], t=300, layers=None, points=())
        flows = sorted(k for k in pics if k.startswith("flow_l"))
        return row + ([pics[flows[0]], pics[flows[0].replace("flow", "warped")]] if flows else [])
