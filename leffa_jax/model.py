"""LeffaModel: VAE + reference UNet + generative UNet, from official or leffa_jax checkpoints.

Data flow (NHWC everywhere):
    garment (B,H,W,3) --vae.encode--> ref_latent (B,h,w,4) * sf
        --reference_features(ref_latent, t)--> one (B, N_i, C_i) per transformer layer
    gen_input (B,h,w,12) = [noisy latent 4 | mask 1 | masked-image latent 4 | densepose 3]
        --predict_noise(gen_input, t, features)--> eps (B,h,w,4)

The components are `leffa_jax.components.LEFFA`; attribute names follow the official checkpoint
prefixes (`vae`, `unet_encoder` = reference UNet, `unet` = generative UNet), so the conversion
maps components one to one; `reference_unet`/`generative_unet` are readable aliases.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import components
from leffa_jax.nn.abstract import abstract_init
from leffa_jax.nn.layers import resize_nearest_torch
from leffa_jax.nn.unet import UNet, UNetOutput
from leffa_jax.nn.vae import Posterior
from leffa_jax.weights import folder as weights_folder
from leffa_jax.weights import plans
from leffa_jax.weights.base_configs import resolve_base_config
from leffa_jax.weights.modules import module_from_flat, module_to_flat
from leffa_jax.weights.tensor_io import (
    CheckpointError,
    CheckpointNotFoundError,
    write_safetensors,
)

# 4 noisy latent + 1 mask + 4 masked-image latent + 3 densepose; the reference UNet takes 4.
GEN_IN_CHANNELS = components.find(components.LEFFA, "unet").options["in_channels"]
REF_IN_CHANNELS = components.find(components.LEFFA, "unet_encoder").options["in_channels"]


def inpainting_conditions(mask: jax.Array, masked_latent: jax.Array,
                          densepose: jax.Array) -> jax.Array:
    """The generative UNet's conditioning channels, at latent size:
    `[mask 1 | masked-image latent C | densepose 3]` (B, h, w, 1 + C + 3), in masked_latent's
    dtype. mask (B,H,W,1) and densepose (B,H,W,3) are at image size and are taken to the latent
    grid with torch `nearest` (for H, W divisible by the VAE factor: `x[:, ::f, ::f]`)."""
    size = masked_latent.shape[1:3]
    dtype = masked_latent.dtype
    return jnp.concatenate([resize_nearest_torch(mask.astype(dtype), size), masked_latent,
                            resize_nearest_torch(densepose.astype(dtype), size)], axis=-1)


def generative_input(noisy_latent: jax.Array, conditions: jax.Array) -> jax.Array:
    """`[noisy latent | conditions]` (B, h, w, 12): the generative UNet's input, the one place it
    is assembled (training, sampling, evaluation and visualisation all call this)."""
    return jnp.concatenate([noisy_latent, conditions.astype(noisy_latent.dtype)], axis=-1)


class LeffaModel(nnx.Module):
    """The components of `components.LEFFA` as attributes: `vae`, `unet_encoder` (reference
    UNet), `unet` (generative UNet)."""

    def __init__(self, config_dir: str, *, rngs: nnx.Rngs, gen_in_channels: int = GEN_IN_CHANNELS,
                 ref_in_channels: int = REF_IN_CHANNELS):
        """Random initialisation from a base config folder (unet/, vae/, scheduler/) or a bundled
        name ("sd15-inpainting", "sdxl-inpainting", "tiny"; `base_configs.resolve_base_config`)."""
        config_dir = self.config_dir = resolve_base_config(config_dir)
        for component in components.leffa_components(gen_in_channels, ref_in_channels):
            setattr(self, component.name, components.build(component, config_dir, rngs=rngs))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, checkpoint: str, base_config_dir: str | None = None) -> LeffaModel:
        """Official Leffa `.pth`/`.safetensors` (needs `base_config_dir`: the SD1.5 or SDXL
        inpainting config folder, or a bundled name "sd15-inpainting" / "sdxl-inpainting"), or
        a leffa_jax checkpoint folder (configs inside). A folder converted from a diffusers
        SD(XL)-inpainting model (`convert to-flax --diffusers`) gives the Leffa initialisation of
        `from_sd_inpainting`."""
        checkpoint = os.fspath(checkpoint)
        if not os.path.exists(checkpoint):
            raise CheckpointNotFoundError(f"checkpoint {checkpoint} does not exist")
        if os.path.isdir(checkpoint):
            meta, flat = weights_folder.read_flax_checkpoint(checkpoint)
            config_dir = os.path.join(checkpoint, weights_folder.CONFIG_FOLDER)
            found = weights_folder.checkpoint_components(meta)
            if ("unet_encoder" not in found
                    and {c.name for c in components.DIFFUSERS_FOLDER} <= set(found)):
                return cls._from_inpainting_params(config_dir, flat, checkpoint)
        else:
            if base_config_dir is None:
                raise CheckpointError(
                    f"{checkpoint} is an official checkpoint file: pass base_config_dir, the base "
                    "model's config folder or a bundled name: 'sd15-inpainting' for "
                    "virtual_tryon.pth / virtual_tryon_dc.pth, 'sdxl-inpainting' for "
                    "pose_transfer.pth")
            plan = plans.plan_prefixed(checkpoint, base_config_dir)
            flat, config_dir, found = plan.read_params(), plan.config_dir, plan.components
        missing = [c.name for c in components.LEFFA if c.name not in found]
        if missing:
            raise CheckpointError(f"{checkpoint}: not a Leffa checkpoint, components "
                                  f"{sorted(missing)} are missing (has {sorted(found)})")
        channels = {c.role: found[c.name].options.get("in_channels") for c in components.LEFFA}
        return cls.from_params(config_dir, flat, channels["generative"], channels["reference"])

    @classmethod
    def from_sd_inpainting(cls, folder: str) -> LeffaModel:
        """Training initialisation from a diffusers SD(XL)-inpainting folder (unet/, vae/,
        scheduler/): both UNets start from its UNet; the reference UNet's conv_in keeps the 4
        noisy-latent input channels, the generative UNet's conv_in gets 3 zero-initialised
        densepose channels after the 9 inpainting ones (so at step 0 it computes SD-inpainting)."""
        return cls._from_inpainting_params(folder, plans.plan_folder(folder).read_params(), folder)

    @classmethod
    def random_sd_inpainting(cls, config_dir: str, seed: int = 0) -> LeffaModel:
        """`from_sd_inpainting` on a randomly initialised SD-inpainting model of `config_dir`
        (9-channel UNet and VAE): the paper's initialisation structure from random weights, both
        UNets starting from the same UNet (a reference UNet with weights of its own would give
        reference tokens the generative attention cannot read, and learns to ignore)."""
        config_dir = resolve_base_config(config_dir)
        model = cls(config_dir, rngs=nnx.Rngs(seed), gen_in_channels=9)
        flat = {f"unet.{k}": v for k, v in module_to_flat(model.unet).items()}
        flat.update({f"vae.{k}": v for k, v in module_to_flat(model.vae).items()})
        return cls._from_inpainting_params(config_dir, flat, f"random init of {config_dir}")

    @classmethod
    def _from_inpainting_params(cls, config_dir: str, flat: dict, where: str) -> LeffaModel:
        """`from_sd_inpainting` on flat {'unet.*', 'vae.*'} params of an inpainting model."""
        kernel = flat["unet.conv_in.kernel"]  # (3, 3, 9, C)
        if kernel.shape[2] != 9:
            raise CheckpointError(f"{where}: the UNet's conv_in has {kernel.shape[2]} input "
                                  "channels; an SD(XL)-inpainting UNet has 9 (latent 4 | mask 1 |"
                                  " masked-image latent 4), which Leffa starts from")
        flat = dict(flat)
        unet = weights_folder.split_params(flat, "unet")
        flat.update({f"unet_encoder.{k}": v for k, v in unet.items()})
        flat["unet_encoder.conv_in.kernel"] = np.ascontiguousarray(kernel[:, :, :REF_IN_CHANNELS])
        pad = np.zeros(kernel.shape[:2] + (GEN_IN_CHANNELS - 9, kernel.shape[3]), kernel.dtype)
        flat["unet.conv_in.kernel"] = np.concatenate([kernel, pad], axis=2)
        return cls.from_params(config_dir, flat)

    @classmethod
    def from_params(cls, config_dir: str, flat: dict, gen_in_channels: int = GEN_IN_CHANNELS,
                    ref_in_channels: int = REF_IN_CHANNELS) -> LeffaModel:
        """Build from flat {'<component>.<flax path>': array} (strictly checked)."""
        config_dir = resolve_base_config(config_dir)
        model = abstract_init(lambda: cls(config_dir, rngs=nnx.Rngs(0),
                                           gen_in_channels=gen_in_channels,
                                           ref_in_channels=ref_in_channels))
        for component in components.leffa_components(gen_in_channels, ref_in_channels):
            params = weights_folder.split_params(flat, component.name)
            setattr(model, component.name, module_from_flat(component, config_dir, params))
        model.config_dir = config_dir
        return model

    def save_pretrained(self, out_dir: str, formats=("safetensors",), *,
                        meta: dict | None = None) -> None:
        """Write a leffa_jax checkpoint folder (loadable by `from_pretrained`); an existing
        checkpoint folder there is replaced as a whole, any other non-empty folder is refused.
        `meta`: extra top-level leffa_jax.json entries (e.g. {"resolution": [H, W]})."""
        flat, saved = {}, []
        for component in components.LEFFA:
            module = getattr(self, component.name)
            flat.update({f"{component.name}.{k}": v for k, v in module_to_flat(module).items()})
            saved.append(components.with_options(
                component, **components.recorded_options(component, module)))
        weights_folder.save_flax_checkpoint(out_dir, flat, self.config_dir, saved, formats,
                                            overwrite=True, extra_meta=meta)

    # ------------------------------------------------------------------ aliases and facts
    @property
    def reference_unet(self) -> UNet:
        return self.unet_encoder

    @property
    def generative_unet(self) -> UNet:
        return self.unet

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    def scheduler_config(self) -> dict:
        path = os.path.join(self.config_dir, "scheduler", "scheduler_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no scheduler config at {path}")
        with open(path) as f:
            return json.load(f)

    # ------------------------------------------------------------------ computation
    def encode(self, images: jax.Array) -> Posterior:
        """images (B,H,W,3) in [-1,1] -> posterior over UNscaled latents (B,H/8,W/8,4)."""
        return self.vae.encode(images)

    def decode(self, latents: jax.Array) -> jax.Array:
        """SCALED latents (B,h,w,4) -> images (B,H,W,3), about [-1,1], not clipped."""
        return self.vae.decode(latents / self.scaling_factor)

    def reference_features(self, ref_latent: jax.Array, t, *, attention_kernel: str = "xla"
                           ) -> tuple[jax.Array, ...]:
        """ref_latent (B,h,w,4) scaled; t scalar or (B,) -> post-norm1 states, call order."""
        return self.unet_encoder(ref_latent, t, collect_features=True,
                                 attention_kernel=attention_kernel).features

    def predict_noise(self, gen_input: jax.Array, t, reference_features, *, probe=None,
                      attention_kernel: str = "xla", return_probes: bool = False):
        """gen_input (B,h,w,12); -> eps (B,h,w,4) [, {layer: probe value}]."""
        out: UNetOutput = self.unet(gen_input, t, reference_features=reference_features,
                                    probe=probe, attention_kernel=attention_kernel)
        return (out.sample, out.probes) if return_probes else out.sample


def random_official_checkpoint(config_dir: str, path: str, seed: int = 0, scale: float = 0.05
                               ) -> str:
    """Write a random Leffa checkpoint in the OFFICIAL layout (torch names, NCHW) — what the
    demo and tests convert. Parameters are drawn off-init so norms and biases matter."""
    model = abstract_init(lambda: LeffaModel(config_dir, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    items = []
    for component in components.LEFFA:
        to_torch = components.kind_of(component).flax_to_torch
        module = getattr(model, component.name)
        for names, value in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            flax_path = ".".join(map(str, names))
            is_kernel = flax_path.endswith("kernel")
            mean = 1.0 if flax_path.endswith("scale") else 0.0
            std = 1.0 / np.sqrt(np.prod(value.shape[:-1])) if is_kernel else scale
            array = (mean + std * rng.standard_normal(value.shape)).astype(np.float32)
            key, tensor = to_torch(flax_path, array)
            items.append((f"{component.name}.{key}", np.ascontiguousarray(tensor)))
    write_safetensors(path, items)
    return path


def tiny_config_dir() -> str:
    """The embedded tiny SD1.5-like config (demo and tests; no downloads)."""
    return resolve_base_config("tiny")

