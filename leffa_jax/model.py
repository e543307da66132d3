"""LeffaModel: VAE + reference UNet + generative UNet, from official or leffa_jax checkpoints.

Data flow (NHWC everywhere):
    garment (B,H,W,3) --vae.encode--> ref_latent (B,h,w,4) * sf
        --reference_features(ref_latent, t)--> one (B, N_i, C_i) per transformer layer
    gen_input (B,h,w,12) = [noisy latent 4 | mask 1 | masked-image latent 4 | densepose 3]
        --predict_noise(gen_input, t, features)--> eps (B,h,w,4)

Attribute names follow the official checkpoint prefixes (`vae`, `unet_encoder` = reference UNet,
`unet` = generative UNet), so the conversion maps components one to one;
`reference_unet`/`generative_unet` are readable aliases.
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from leffa_jax import convert
from leffa_jax.nn.config import UNetConfig, VAEConfig
from leffa_jax.nn.unet import UNet, UNetOutput
from leffa_jax.nn.vae import AutoencoderKL, Posterior

GEN_IN_CHANNELS = 12  # 4 noisy latent + 1 mask + 4 masked-image latent + 3 densepose
REF_IN_CHANNELS = 4


class LeffaModel(nnx.Module):
    def __init__(self, config_dir: str, *, rngs: nnx.Rngs, gen_in_channels: int = GEN_IN_CHANNELS,
                 ref_in_channels: int = REF_IN_CHANNELS):
        """Random initialisation from a base config folder (unet/, vae/, scheduler/)."""
        self.config_dir = os.fspath(config_dir)
        self.vae = AutoencoderKL(VAEConfig.from_json(os.path.join(config_dir, "vae")), rngs=rngs)
        ucfg = os.path.join(config_dir, "unet")
        self.unet_encoder = UNet(UNetConfig.from_json(ucfg, in_channels=ref_in_channels), rngs=rngs)
        self.unet = UNet(UNetConfig.from_json(ucfg, in_channels=gen_in_channels), rngs=rngs)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, checkpoint: str, base_config_dir: str | None = None) -> LeffaModel:
        """Official Leffa `.pth`/`.safetensors` (needs `base_config_dir`: the SD1.5 or SDXL
        inpainting config folder), or a leffa_jax checkpoint folder (configs inside)."""
        checkpoint = os.fspath(checkpoint)
        if os.path.isdir(checkpoint):
            meta, flat = convert.read_flax_checkpoint(checkpoint)
            config_dir = os.path.join(checkpoint, "config")
            comps = meta["components"]
        else:
            if base_config_dir is None:
                raise ValueError(f"{checkpoint} is an official checkpoint file: pass "
                                 "base_config_dir (e.g. configs of stable-diffusion-inpainting)")
            source, mapping, in_ch = convert.plan_official(checkpoint, base_config_dir)
            flat = {f"{c}.{fp}": convert.torch_to_flax_leaf(k, source[k])[1]
                    for c, m in mapping.items() for fp, k in m.items()}
            config_dir = base_config_dir
            comps = {c: {"in_channels": in_ch[c]} for c in mapping}
        missing = {"vae", "unet_encoder", "unet"} - set(comps)
        if missing:
            raise convert.CheckpointError(f"{checkpoint}: not a Leffa checkpoint, components "
                                          f"{sorted(missing)} are missing (has {sorted(comps)})")
        return cls.from_params(config_dir, flat, comps["unet"]["in_channels"],
                               comps["unet_encoder"]["in_channels"])

    @classmethod
    def from_sd_inpainting(cls, folder: str) -> LeffaModel:
        """Training initialisation from a diffusers SD(XL)-inpainting folder (unet/, vae/,
        scheduler/): both UNets start from its UNet; the reference UNet's conv_in keeps the 4
        noisy-latent input channels, the generative UNet's conv_in gets 3 zero-initialised
        densepose channels after the 9 inpainting ones (so at step 0 it computes SD-inpainting)."""
        import numpy as np

        flat = {}
        for comp in ("unet", "vae"):
            source = convert.TensorSource(convert.find_diffusers_weights(os.path.join(folder, comp)))
            for k in source.keys():
                fp, arr = convert.torch_to_flax_leaf(k, source[k])
                flat[f"{comp}.{fp}"] = arr
        kernel = flat["unet.conv_in.kernel"]  # (3, 3, 9, C)
        if kernel.shape[2] != 9:
            raise convert.CheckpointError(f"{folder}/unet: conv_in has {kernel.shape[2]} input "
                                          "channels; an inpainting UNet has 9")
        for k in [k for k in flat if k.startswith("unet.")]:
            flat["unet_encoder." + k[5:]] = flat[k]
        flat["unet_encoder.conv_in.kernel"] = np.ascontiguousarray(kernel[:, :, :4])
        pad = np.zeros(kernel.shape[:2] + (GEN_IN_CHANNELS - 9, kernel.shape[3]), kernel.dtype)
        flat["unet.conv_in.kernel"] = np.concatenate([kernel, pad], axis=2)
        return cls.from_params(folder, flat)

    @classmethod
    def from_params(cls, config_dir: str, flat: dict, gen_in_channels: int = GEN_IN_CHANNELS,
                    ref_in_channels: int = REF_IN_CHANNELS) -> LeffaModel:
        """Build from flat {'<component>.<flax path>': array} (strictly checked)."""
        model = nnx.eval_shape(lambda: cls(config_dir, rngs=nnx.Rngs(0),
                                           gen_in_channels=gen_in_channels,
                                           ref_in_channels=ref_in_channels))
        for comp in ("vae", "unet_encoder", "unet"):
            sub = {k[len(comp) + 1:]: v for k, v in flat.items() if k.startswith(comp + ".")}
            in_ch = None if comp == "vae" else getattr(model, comp).config.in_channels
            setattr(model, comp, convert.module_from_flat(comp, config_dir, sub, in_ch))
        model.config_dir = config_dir
        return model

    def save_pretrained(self, out_dir: str, formats=("safetensors",)) -> None:
        """Write a leffa_jax checkpoint folder (loadable by `from_pretrained`)."""
        flat = {}
        for comp in ("vae", "unet_encoder", "unet"):
            flat.update({f"{comp}.{k}": v
                         for k, v in convert.module_to_flat(getattr(self, comp)).items()})
        comps = {"vae": {"kind": "vae", "in_channels": None},
                 "unet_encoder": {"kind": "unet", "in_channels": self.unet_encoder.config.in_channels},
                 "unet": {"kind": "unet", "in_channels": self.unet.config.in_channels}}
        convert.save_flax_checkpoint(out_dir, flat, self.config_dir, comps, formats)

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
    import numpy as np

    model = nnx.eval_shape(lambda: LeffaModel(config_dir, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    items = []
    for comp in ("vae", "unet_encoder", "unet"):
        for p, v in nnx.to_flat_state(nnx.state(getattr(model, comp), nnx.Param)):
            path_ = ".".join(map(str, p))
            base = 1.0 if path_.endswith("scale") else 0.0
            fan_in = int(np.prod(v.shape[:-1])) if path_.endswith("kernel") else 1
            std = (1.0 / np.sqrt(fan_in)) if path_.endswith("kernel") else scale
            arr = (base + std * rng.standard_normal(v.shape)).astype(np.float32)
            key, t = convert.flax_to_torch_leaf(path_, arr)
            items.append((f"{comp}.{key}", np.ascontiguousarray(t)))
    convert.write_safetensors(path, items)
    return path


def tiny_config_dir() -> str:
    """The embedded tiny SD1.5-like config (demo and tests; no downloads)."""
    return os.path.join(os.path.dirname(__file__), "assets", "tiny_sd15")

