"""Architecture configs read from diffusers `config.json` files.

Only what the SD1.5 / SDXL inpainting families use is supported; any other non-default value is
an error naming the key, so a checkpoint of another architecture fails loudly instead of loading
into the wrong graph.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
    """A config.json that this library cannot build (names the file and the key)."""


def read_config_json(path: str | os.PathLike, what: str,
                     library: str = "diffusers") -> dict[str, Any]:
    """`path` (a folder holding config.json, or the file) -> its dict with `_source` set; a
    missing, non-JSON or non-object file is a ConfigError naming it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{what} config not found: {path} (expected a {library} config.json)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{what} config {path} must hold a JSON object")
    cfg["_source"] = path
    return cfg


def _per_block(value, n: int, key: str, src: str) -> tuple:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ConfigError(f"{src}: '{key}' has {len(value)} entries, expected {n} (one per block)")
        return tuple(value)
    return (value,) * n


# (key, allowed values) for options this implementation does not build.
_UNET_FIXED = {
    "act_fn": ("silu",), "center_input_sample": (False,), "class_embed_type": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "dual_cross_attention": (False,),
    "only_cross_attention": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "resnet_time_scale_shift": ("default",), "time_embedding_type": ("positional",),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,), "attention_type": ("default",), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0, 1),
    "time_embedding_act_fn": (None,), "num_class_embeds": (None,), "dropout": (0.0, 0),
    "addition_embed_type": (None, "text_time"), "upcast_attention": (None, False, True),
    "reverse_transformer_layers_per_block": (None,), "mid_block_scale_factor": (1, 1.0),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    num_heads: tuple[int, ...]  # per down block (diffusers' attention_head_dim quirk resolved)
    cross_attention_dim: int
    use_linear_projection: bool
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    # SDXL's text_time add-embedding (Leffa switches it off; its weights are kept, unused).
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # Attention extensions (not diffusers config keys; set with dataclasses.replace or from_json):
    # image_prompt_dim: width of image-prompt tokens; builds to_k_ip/to_v_ip on every attn2
    # (IP-Adapter / StoryMaker decoupled cross-attention). decoupled_reference: builds attn1's
    # to_k_ip/to_v_ip and takes reference features through them (Magic Clothing "stable").
    image_prompt_dim: int | None = None
    decoupled_reference: bool = False
    source: str = ""

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, in_channels: int | None = None,
                  image_prompt_dim: int | None = None, decoupled_reference: bool = False
                  ) -> UNetConfig:
        src = cfg.get("_source", "<dict>")
        cls_name = cfg.get("_class_name", "UNet2DConditionModel")
        if cls_name != "UNet2DConditionModel":
            raise ConfigError(f"{src}: _class_name is {cls_name!r}, expected 'UNet2DConditionModel'")
        for key, allowed in _UNET_FIXED.items():
            if key in cfg and cfg[key] not in allowed:
                raise ConfigError(f"{src}: unsupported {key}={cfg[key]!r} (supported: {allowed})")
        try:
            boc = tuple(cfg["block_out_channels"])
            down = tuple(cfg["down_block_types"])
            up = tuple(cfg["up_block_types"])
        except KeyError as e:
            raise ConfigError(f"{src}: missing required key {e}") from None
        n = len(boc)
        if len(down) != n or len(up) != n:
            raise ConfigError(f"{src}: {len(down)} down / {len(up)} up block types for {n} "
                              "block_out_channels")
        ok_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
        ok_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
        for t in down:
            if t not in ok_down:
                raise ConfigError(f"{src}: unsupported down block {t!r} (supported: {sorted(ok_down)})")
        for t in up:
            if t not in ok_up:
                raise ConfigError(f"{src}: unsupported up block {t!r} (supported: {sorted(ok_up)})")
        # diffusers quirk: attention_head_dim is the number of heads when num_attention_heads is null.
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = _per_block(heads, n, "attention_head_dim", src)
        tlpb = _per_block(cfg.get("transformer_layers_per_block", 1), n,
                          "transformer_layers_per_block", src)
        if any(isinstance(t, list | tuple) for t in tlpb):
            raise ConfigError(f"{src}: nested transformer_layers_per_block is not supported")
        groups = cfg.get("norm_num_groups", 32)
        for i, (c, h) in enumerate(zip(boc, heads, strict=True)):
            if c % groups:
                raise ConfigError(f"{src}: block_out_channels[{i}]={c} not divisible by "
                                  f"norm_num_groups={groups}")
            if c % h:
                raise ConfigError(f"{src}: block_out_channels[{i}]={c} not divisible by {h} heads")
        cad = cfg.get("cross_attention_dim", 768)
        if isinstance(cad, list | tuple):
            raise ConfigError(f"{src}: per-block cross_attention_dim is not supported")
        text_time = cfg.get("addition_embed_type") == "text_time"
        return cls(
            in_channels=int(in_channels if in_channels is not None else cfg.get("in_channels", 4)),
            out_channels=int(cfg.get("out_channels", 4)),
            block_out_channels=boc, down_block_types=down, up_block_types=up,
            layers_per_block=_per_block(cfg.get("layers_per_block", 2), n, "layers_per_block", src),
            transformer_layers_per_block=tuple(int(t) for t in tlpb),
            num_heads=tuple(int(h) for h in heads),
            cross_attention_dim=int(cad),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            norm_num_groups=int(groups), norm_eps=float(cfg.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=float(cfg.get("freq_shift", 0)),
            downsample_padding=int(cfg.get("downsample_padding", 1)),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") if text_time else None,
            projection_class_embeddings_input_dim=(
                cfg.get("projection_class_embeddings_input_dim") if text_time else None),
            image_prompt_dim=image_prompt_dim, decoupled_reference=decoupled_reference,
            source=src,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike, *, in_channels: int | None = None,
                  **extensions) -> UNetConfig:
        """`extensions`: image_prompt_dim, decoupled_reference (see the fields)."""
        return cls.from_dict(read_config_json(path, "UNet"), in_channels=in_channels, **extensions)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    source: str = ""

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> VAEConfig:
        src = cfg.get("_source", "<dict>")
        cls_name = cfg.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ConfigError(f"{src}: _class_name is {cls_name!r}, expected 'AutoencoderKL'")
        boc = tuple(cfg.get("block_out_channels", (64,)))
        for key, want in (("down_block_types", "DownEncoderBlock2D"),
                          ("up_block_types", "UpDecoderBlock2D")):
            types = cfg.get(key, [want] * len(boc))
            if len(types) != len(boc) or any(t != want for t in types):
                raise ConfigError(f"{src}: {key} must be {len(boc)} x {want!r}, got {types}")
        for key, allowed in {"act_fn": ("silu",), "use_quant_conv": (True,),
                             "use_post_quant_conv": (True,), "mid_block_add_attention": (True,),
                             "latents_mean": (None,), "latents_std": (None,)}.items():
            if key in cfg and cfg[key] not in allowed:
                raise ConfigError(f"{src}: unsupported {key}={cfg[key]!r} (supported: {allowed})")
        groups = int(cfg.get("norm_num_groups", 32))
        for c in boc:
            if c % groups:
                raise ConfigError(f"{src}: channels {c} not divisible by norm_num_groups={groups}")
        return cls(
            in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
            latent_channels=int(cfg.get("latent_channels", 4)), block_out_channels=boc,
            layers_per_block=int(cfg.get("layers_per_block", 1)), norm_num_groups=groups,
            scaling_factor=float(cfg.get("scaling_factor") or 0.18215), source=src)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> VAEConfig:
        return cls.from_dict(read_config_json(path, "VAE"))
