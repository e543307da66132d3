"""Training the VAE (`nn/vae.py` AutoencoderKL) of a Leffa model on the try-on images: a Task.

Leffa trains its UNets in the latent space of a pretrained VAE; a model trained from scratch
(the synthetic demo, `leffa_jax/demo.py`) first needs such a VAE. One loss evaluation
(`AutoencoderTask.loss`), inside the generic jitted step (`training/step.py`):

    x = [person; garment]                            the images the Leffa task encodes, (2B,H,W,3)
    q = vae.encode(x); z = mean + std * eps; x_hat = vae.decode(z)
    loss = mean |x_hat - x| + mean (x_hat - x)^2 + kl_weight * KL(q || N(0, 1)) / (H W 3)
metrics {"l1", "mse", "kl"} (kl per latent element, before the weight). The reference and
generative UNets are not touched: the model is built as `systems/leffa.py:init_model` builds it
(`config.model`), so the export is a whole Leffa checkpoint folder with the trained VAE and the
UNets as initialised, which the Leffa stage starts from (`config.model.init = "leffa:<export>"`).

The export also sets the VAE's `scaling_factor` to 1 / std of the posterior means over the
training images (how Stable Diffusion's 0.18215 was chosen), so the diffusion model sees latents
of unit variance. Settings: `config.autoencoder.{kl_weight, scale_batches}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from leffa_jax.systems.leffa import check_data, check_init, init_model
from leffa_jax.training.config import ConfigError
from leffa_jax.training.task import Task
from leffa_jax.weights.folder import CONFIG_FOLDER

BATCH_CHANNELS = (("person", 3), ("garment", 3))


def autoencoder_inputs(batch: dict) -> jax.Array:
    """[person; garment] (2B, H, W, 3): the images the Leffa task encodes (the masked person,
    its third input, is the person with a flat grey region)."""
    return jnp.concatenate([batch["person"], batch["garment"].astype(batch["person"].dtype)], 0)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1)) (closed form)."""
    return 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)


class AutoencoderTask(Task):
    name = "autoencoder"
    components = ("vae",)
    trainable = ("vae",)

    def __init__(self, config):
        super().__init__(config)
        self.dtype = jnp.dtype(config.train.dtype)
        self.image_hw = (int(config.data.height), int(config.data.width))
        ae = config.get("autoencoder") or {}
        self.kl_weight = float(ae.get("kl_weight", 1e-6))
        self.scale_batches = int(ae.get("scale_batches", 4))

    def validate(self) -> None:
        if self.config.train.batch_size != self.config.data.batch_size:
            raise ConfigError(f"train.batch_size {self.config.train.batch_size} != "
                              f"data.batch_size {self.config.data.batch_size}: set both")
        if not (self.kl_weight >= 0 and np.isfinite(self.kl_weight)):
            raise ConfigError(f"autoencoder.kl_weight must be a finite number >= 0, got "
                              f"{self.kl_weight}")
        check_data(self.config.data)
        check_init(self.config)

    def init_model(self):
        return init_model(self.config)

    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: (*self.image_hw, ch) for k, ch in BATCH_CHANNELS}

    def dataset(self, split: str = "train"):
        from leffa_jax.data import pipeline as data_pipeline

        return data_pipeline.make_dataset(self.config.data, split)

    def loss(self, params, frozen, batch, rng):
        """-> (l1 + mse + kl_weight * kl_sum / pixels, {"l1", "mse", "kl"})."""
        vae = self.modules({**frozen, **params}, self.dtype)["vae"]
        x = autoencoder_inputs(batch).astype(self.dtype)
        post = vae.encode(x)
        z = vae.sample_posterior(post, jax.random.normal(rng, post.mean.shape, self.dtype))
        x_hat = vae.decode(z).astype(jnp.float32)
        x = x.astype(jnp.float32)
        l1 = jnp.mean(jnp.abs(x_hat - x))
        mse = jnp.mean((x_hat - x) ** 2)
        kl = kl_to_standard_normal(post.mean.astype(jnp.float32), post.logvar.astype(jnp.float32))
        kl_per_pixel = kl * post.mean.size / x.size  # the KL sum, spread over the image elements
        return l1 + mse + self.kl_weight * kl_per_pixel, {"l1": l1, "mse": mse, "kl": kl}

    def latent_std(self, vae) -> float:
        """Std of the posterior means over `scale_batches` training batches."""
        it = iter(self.dataset("train"))
        encode = jax.jit(lambda x: vae.encode(x).mean)
        values = [np.asarray(encode(autoencoder_inputs(
            {k: jnp.asarray(v) for k, v in next(it).items() if k in self.batch_shapes()})))
            for _ in range(max(1, self.scale_batches))]
        return float(np.concatenate([v.ravel() for v in values]).std())

    def export(self, model, params, frozen, out_dir: str) -> None:
        """The whole Leffa model (trained VAE, UNets as initialised) as a leffa_jax checkpoint
        folder, with `vae.scaling_factor` = 1 / latent std (see the module docstring)."""
        self.load_into(model, params, frozen)
        scale = 1.0 / max(self.latent_std(model.vae), 1e-6)
        with tempfile.TemporaryDirectory(prefix="leffa_ae_config_") as tmp:
            config_dir = os.path.join(tmp, CONFIG_FOLDER)
            shutil.copytree(model.config_dir, config_dir)
            path = os.path.join(config_dir, "vae", "config.json")
            with open(path) as f:
                vae_config = json.load(f)
            vae_config["scaling_factor"] = scale
            with open(path, "w") as f:
                json.dump(vae_config, f, indent=2)
            base_dir, model.config_dir = model.config_dir, config_dir
            model.vae.config = dataclasses.replace(model.vae.config, scaling_factor=scale)
            try:
                model.save_pretrained(out_dir, meta={"resolution": list(self.image_hw)})
            finally:
                model.config_dir = base_dir
