"""CLIP text / vision configs read strictly from a transformers `config.json`.

Accepts the three layouts transformers writes: a `CLIPTextConfig` file (`model_type`
"clip_text_model", e.g. diffusers' `text_encoder/`), a `CLIPVisionConfig` file
("clip_vision_model", e.g. IP-Adapter's `image_encoder/`), and a full `CLIPConfig` ("clip") whose
`text_config` / `vision_config` sub-dicts are used (legacy `*_config_dict` entries override them,
as in transformers; `projection_dim` is the top-level one, the width of CLIPModel's projections). Missing keys take transformers' defaults. Options this implementation does not
build (other activations, dropout, non-square images or patches) are a `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from leffa_jax.nn.config import ConfigError, read_config_json

ACTIVATIONS = ("quick_gelu", "gelu")
_ZERO = (None, 0, 0.0)
_FIXED = {"hidden_act": ACTIVATIONS, "attention_dropout": _ZERO, "dropout": _ZERO}
_ARCHITECTURES = {
    "text": {"CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel"},
    "vision": {"CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"},
}


def read_clip_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """`path` (a folder holding config.json, or the file) -> dict with `_source` set."""
    return read_config_json(path, "CLIP", "transformers")


def _sub_config(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """The text or vision part of `cfg` (the file itself, or a CLIPConfig's sub-dict)."""
    src = cfg.get("_source", "<dict>")
    model_type = cfg.get("model_type")
    want = f"clip_{kind}_model"
    nested = model_type == "clip" or f"{kind}_config" in cfg or f"{kind}_config_dict" in cfg
    if nested:
        sub = dict(cfg.get(f"{kind}_config") or {})
        sub.update(cfg.get(f"{kind}_config_dict") or {})
        if "projection_dim" in cfg:  # CLIPModel's projections use the top-level width
            sub["projection_dim"] = cfg["projection_dim"]
        sub.setdefault("architectures", cfg.get("architectures"))
        sub["_source"] = f"{src} [{kind}_config]"
        sub["model_type"] = sub.get("model_type", want)
        cfg = sub
    elif model_type not in (None, want):
        raise ConfigError(f"{src}: model_type is {model_type!r}, expected {want!r} or 'clip'")
    if cfg.get("model_type") not in (None, want):
        raise ConfigError(f"{cfg['_source']}: model_type is {cfg['model_type']!r}, expected {want!r}")
    archs = cfg.get("architectures") or []
    bad = [a for a in archs if a not in _ARCHITECTURES[kind]]
    if bad:
        raise ConfigError(f"{cfg.get('_source', src)}: unsupported architectures={bad} "
                          f"(supported: {sorted(_ARCHITECTURES[kind])})")
    return cfg


def _check_common(cfg: dict[str, Any], src: str, hidden: int, heads: int) -> None:
    for key, allowed in _FIXED.items():
        if key in cfg and cfg[key] not in allowed:
            raise ConfigError(f"{src}: unsupported {key}={cfg[key]!r} (supported: {allowed})")
    if hidden % heads:
        raise ConfigError(f"{src}: hidden_size={hidden} is not divisible by "
                          f"num_attention_heads={heads}")


def _int(cfg: dict[str, Any], key: str, default: int, src: str) -> int:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{src}: unsupported {key}={value!r} (expected one integer)")
    return value


def _shared_fields(cfg: dict[str, Any], defaults, src: str) -> dict[str, Any]:
    """The fields text and vision configs read alike: activation, LayerNorm eps, projection."""
    proj = cfg.get("projection_dim", defaults.projection_dim)
    return {"hidden_act": cfg.get("hidden_act", defaults.hidden_act),
            "layer_norm_eps": float(cfg.get("layer_norm_eps") or defaults.layer_norm_eps),
            "projection_dim": None if proj is None else int(proj), "source": src}


class _FromJson:
    @classmethod
    def from_json(cls, path: str | os.PathLike):
        """Read a transformers config.json (a folder holding it, or the file)."""
        return cls.from_dict(read_clip_config_json(path))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_FromJson):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    # 2 selects transformers' legacy pooling (argmax of the ids); anything else: first == eos.
    eos_token_id: int = 49407
    source: str = ""

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> CLIPTextConfig:
        cfg = _sub_config(cfg, "text")
        src = cfg.get("_source", "<dict>")
        d = cls()
        ints = {k: _int(cfg, k, getattr(d, k), src) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings", "eos_token_id")}
        _check_common(cfg, src, ints["hidden_size"], ints["num_attention_heads"])
        return cls(**ints, **_shared_fields(cfg, d, src))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_FromJson):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    source: str = ""

    @property
    def num_positions(self) -> int:
        """Patches + the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> CLIPVisionConfig:
        cfg = _sub_config(cfg, "vision")
        src = cfg.get("_source", "<dict>")
        d = cls()
        ints = {k: _int(cfg, k, getattr(d, k), src) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_channels", "image_size", "patch_size")}
        _check_common(cfg, src, ints["hidden_size"], ints["num_attention_heads"])
        if ints["image_size"] % ints["patch_size"]:
            raise ConfigError(f"{src}: image_size={ints['image_size']} is not a multiple of "
                              f"patch_size={ints['patch_size']}")
        return cls(**ints, **_shared_fields(cfg, d, src))
