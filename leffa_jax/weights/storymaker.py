"""StoryMaker adapter weights: the released `mask.bin` layout <-> a leffa_jax adapter file.

Official layout (reference section 9.1; a torch pickle read with `weights_only=True`, or a
.safetensors with the same keys behind the two prefixes):
    image_proj_model.<faceid_plus state-dict key>          113 tensors (real model)
    ip_adapter.<i>.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight    every processor i
    ip_adapter.<i>.{to_k_ip,to_v_ip}.weight                        odd i (attn2)
Processor i is the i-th attention in diffusers' `attn_processors` order
(`systems.storymaker.processor_paths`), so converting needs the base UNet's config.

leffa_jax adapter file (`ADAPTER_FORMAT`): one .safetensors, keys in Flax layout
    image_proj_model.<flax path>        (Linear kernels (in, out), LayerNorm `scale`)
    unet.<flax path>                    `...attn1.to_q.lora_layer.down.kernel`, `...attn2.to_k_ip.kernel`
and metadata {"format", "version", "adapter_config" (JSON of AdapterConfig), "processors"
(JSON list of the UNet attention paths in official index order)}, so it converts back to
mask.bin without the base model. Transposes only: official -> leffa_jax -> official is
bit-exact.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from leffa_jax.weights import outputs
from leffa_jax.weights.tensor_io import (
    CheckpointError,
    CheckpointNotFoundError,
    write_safetensors,
)

ADAPTER_FORMAT = "leffa_jax_storymaker_adapter"
ADAPTER_VERSION = "1"
_RAW_LEAVES = ("pos_embed", "bg_embed", "latents")  # nn.Parameters kept as they are
_LORA = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_IP = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


# ----------------------------------------------------------------------------- reading

def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a .bin needs torch (`pip install -e .[torch] -c "
                              "constraints.txt`), or convert it to .safetensors first") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True) ({e}); "
                              "the file is truncated, corrupt or not a state dict") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a dict, got {type(state).__name__}")
    flat = _flatten(state)
    bad = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: non-tensor entries {bad[:4]}")
    return {k: v.detach().cpu().numpy() for k, v in flat.items()}


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, "np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as safetensors ({e})") from None


def read_official(path: str, *, other_prefixes: bool = False) -> dict[str, np.ndarray]:
    """The official layout as {'image_proj_model.<key>' / 'ip_adapter.<key>': array}.
    other_prefixes: ignore tensors under other prefixes (e.g. a file holding the whole model)
    instead of failing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"StoryMaker adapter {path} not found (the released "
                                      "checkpoint is RED-AIGC/StoryMaker mask.bin)")
    flat = _read_safetensors(path)[0] if path.endswith(".safetensors") else _read_torch(path)
    keep = {k: v for k, v in flat.items() if k.split(".", 1)[0] in ("image_proj_model",
                                                                      "ip_adapter")}
    stray = sorted(set(flat) - set(keep))
    if stray and not other_prefixes:
        raise CheckpointError(f"{path}: {len(stray)} tensors outside image_proj_model.* / "
                              f"ip_adapter.*: {stray[:6]}; is this a StoryMaker mask.bin?")
    for prefix in ("image_proj_model.", "ip_adapter."):
        if not any(k.startswith(prefix) for k in keep):
            raise CheckpointError(f"{path}: no {prefix}* tensors; a StoryMaker mask.bin holds "
                                  "{'image_proj_model': ..., 'ip_adapter': ...}")
    return keep


def config_from_shapes(official: Mapping[str, np.ndarray], dim_head: int = 64):
    """AdapterConfig from the official tensors' shapes (dim_head is not in the shapes: the
    released code hard-codes 64 for both resamplers)."""
    from leffa_jax.nn.resampler import ResamplerConfig
    from leffa_jax.systems.storymaker import AdapterConfig

    s = {k: tuple(v.shape) for k, v in official.items()}

    def get(key):
        try:
            return s["image_proj_model." + key]
        except KeyError:
            raise CheckpointError(f"adapter: missing image_proj_model.{key}") from None

    def resampler(prefix, num_queries):
        depth = len({k.split(".")[3] for k in s if k.startswith(f"image_proj_model.{prefix}.layers.")})
        dim, emb = get(f"{prefix}.proj_in.weight")
        inner = get(f"{prefix}.layers.0.0.to_q.weight")[0]
        if inner % dim_head:
            raise CheckpointError(f"adapter {prefix}: attention width {inner} is not a multiple "
                                  f"of dim_head {dim_head}; give the adapter config json")
        return ResamplerConfig(dim, depth, dim_head, inner // dim_head, emb,
                               get(f"{prefix}.proj_out.weight")[0],
                               get(f"{prefix}.layers.0.1.1.weight")[0] // dim, num_queries)

    slots, tokens, d = get("pos_embed")
    ranks = {v[0] for k, v in s.items() if k.endswith("_lora.down.weight")}
    if len(ranks) != 1:
        raise CheckpointError(f"adapter: LoRA ranks {sorted(ranks)}; expected one rank")
    latents = get("resample.latents")
    return AdapterConfig(
        cross_attention_dim=d, clip_embeddings_dim=get("resample.proj_in.weight")[1],
        perceiver=resampler("perceiver_resampler", 0), resampler=resampler("resample",
                                                                           latents[1]),
        id_embeddings_dim=get("proj.0.weight")[1], num_id_tokens=get("proj.2.weight")[0] // d,
        bg_tokens=get("bg_embed")[1], max_characters=slots, lora_rank=ranks.pop())


# ----------------------------------------------------------------------------- leaf rules

def image_proj_to_flax(key: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    base, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    if leaf in _RAW_LEAVES or leaf == "bias":
        return key, array
    if leaf == "weight" and array.ndim == 2:
        return f"{base}.kernel", array.T
    if leaf == "weight" and array.ndim == 1:
        return f"{base}.scale", array
    raise CheckpointError(f"unexpected image_proj_model tensor {key!r} {array.shape}")


def image_proj_to_torch(path: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    base, leaf = path.rsplit(".", 1) if "." in path else ("", path)
    if leaf in _RAW_LEAVES or leaf == "bias":
        return path, array
    if leaf == "kernel":
        return f"{base}.weight", array.T
    if leaf == "scale":
        return f"{base}.weight", array
    raise CheckpointError(f"unexpected image_proj_model parameter {path!r}")


def processor_params_to_unet(ip: Mapping[str, np.ndarray], paths: Sequence[str],
                             where: str = "adapter") -> dict[str, np.ndarray]:
    """{'<i>.to_q_lora.down.weight': ...} (official) -> {'<unet path>.to_q.lora_layer.down.kernel'
    : ...}; paths[i] = the attention of processor i. Unknown keys / indices are errors."""
    out = {}
    for key, array in ip.items():
        m, n = _LORA.match(key), _IP.match(key)
        if not (m or n):
            raise CheckpointError(f"{where}: unexpected ip_adapter key {key!r}")
        index = int((m or n).group(1))
        if index >= len(paths):
            raise CheckpointError(f"{where}: ip_adapter.{index}.* but the base UNet has "
                                  f"{len(paths)} attention processors: adapter and base model do "
                                  "not belong together")
        if m:
            proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
            out[f"{paths[index]}.{proj}.lora_layer.{m.group(3)}.kernel"] = array.T
        else:
            out[f"{paths[index]}.{n.group(2)}.kernel"] = array.T
    return out


def unet_params_to_processors(unet: Mapping[str, np.ndarray], paths: Sequence[str]
                              ) -> dict[str, np.ndarray]:
    """Inverse of `processor_params_to_unet`, keys in processor order."""
    index = {p: i for i, p in enumerate(paths)}
    rows = []
    for path, array in unet.items():
        m = re.match(r"^(.*)\.(to_q|to_k|to_v|to_out\.0)\.lora_layer\.(down|up)\.kernel$", path)
        n = re.match(r"^(.*)\.(to_k_ip|to_v_ip)\.kernel$", path)
        if not (m or n) or (m or n).group(1) not in index:
            raise CheckpointError(f"adapter: UNet parameter {path!r} is no processor parameter")
        i = index[(m or n).group(1)]
        if m:
            name = "to_out" if m.group(2) == "to_out.0" else m.group(2)
            rows.append((i, f"{i}.{name}_lora.{m.group(3)}.weight", array.T))
        else:
            rows.append((i, f"{i}.{n.group(2)}.weight", array.T))
    rows.sort(key=lambda r: (r[0], r[1]))
    return OrderedDict((k, a) for _, k, a in rows)


def is_processor_layout(ip: Mapping[str, np.ndarray]) -> bool:
    return bool(ip) and all(k.split(".", 1)[0].isdigit() for k in ip)


# ----------------------------------------------------------------------------- adapter files

def read_adapter(path: str, config=None):
    """A StoryMaker adapter file -> (AdapterConfig, image_proj {flax path: array}, UNet part).
    The UNet part is {'<i>.<official key>': array} for an official file (convert with
    `processor_params_to_unet`) or {unet flax path: array} for a leffa_jax adapter file."""
    from leffa_jax.systems.storymaker import AdapterConfig

    path = os.fspath(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        flat, meta = _read_safetensors(path)
        if meta.get("format") == ADAPTER_FORMAT:
            if meta.get("version") != ADAPTER_VERSION:
                raise CheckpointError(f"{path}: adapter format version {meta.get('version')}; "
                                      f"this version reads {ADAPTER_VERSION}")
            cfg = config or AdapterConfig.from_dict(json.loads(meta["adapter_config"]))
            proj = {k[len("image_proj_model."):]: v for k, v in flat.items()
                    if k.startswith("image_proj_model.")}
            unet = {k[len("unet."):]: v for k, v in flat.items() if k.startswith("unet.")}
            if len(proj) + len(unet) != len(flat):
                raise CheckpointError(f"{path}: tensors outside image_proj_model.* / unet.*")
            return cfg, proj, unet
    official = read_official(path)
    cfg = config or config_from_shapes(official)
    proj = dict(image_proj_to_flax(k[len("image_proj_model."):], v)
                for k, v in official.items() if k.startswith("image_proj_model."))
    ip = {k[len("ip_adapter."):]: v for k, v in official.items() if k.startswith("ip_adapter.")}
    return cfg, proj, ip


def _base_unet_config(base: str):
    """The UNetConfig of the base model (a diffusers folder, its unet/ folder or a leffa_jax
    checkpoint)."""
    from leffa_jax.nn.config import UNetConfig

    for folder in (os.path.join(base, "config", "unet"), os.path.join(base, "unet"), base):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return UNetConfig.from_json(folder)
    raise CheckpointNotFoundError(f"{base}: no UNet config (unet/config.json); give the SDXL "
                                  "base folder the adapter was trained on")


def official_to_adapter(official_path: str, base: str, out_path: str, *, config=None,
                        overwrite: bool = False) -> int:
    """mask.bin (or its .safetensors) + base model folder -> leffa_jax adapter .safetensors.
    Strict: every processor of the base UNet is covered and shapes match. -> tensor count."""
    from leffa_jax.systems.storymaker import processor_layout

    if not out_path.endswith(".safetensors"):
        raise CheckpointError(f"{out_path}: a leffa_jax adapter file ends in .safetensors")
    outputs.check_output_file(out_path, [official_path, base], (".safetensors",))
    if os.path.exists(out_path) and not overwrite:
        raise CheckpointError(f"{out_path} exists; pass --overwrite to replace it")
    cfg, proj, ip = read_adapter(official_path, config)
    ucfg = _base_unet_config(base)
    paths = [path for path, _ in processor_layout(ucfg)]
    unet = processor_params_to_unet(ip, paths, official_path)
    check_adapter(cfg, proj, unet, ucfg, official_path)
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION,
            "adapter_config": json.dumps(cfg.to_dict()), "processors": json.dumps(paths)}
    items = [(f"image_proj_model.{k}", np.ascontiguousarray(v)) for k, v in proj.items()]
    items += [(f"unet.{k}", np.ascontiguousarray(v)) for k, v in unet.items()]
    write_safetensors(out_path, items, metadata=meta)
    return len(items)


def check_adapter(cfg, proj: Mapping, unet: Mapping, unet_config, where: str) -> None:
    """Strict key/shape check of adapter params against the modules they load into."""
    from flax import nnx

    from leffa_jax.nn.abstract import abstract_init
    from leffa_jax.systems.storymaker import ImageProjection, adapter_shapes
    from leffa_jax.weights.modules import check_keys

    abstract = abstract_init(lambda: ImageProjection(cfg, rngs=nnx.Rngs(0)))
    want = {".".join(map(str, p)): tuple(v.shape)
            for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    check_keys({k: tuple(v.shape) for k, v in proj.items()}, want, f"{where} [image_proj_model]")
    check_keys({k: tuple(v.shape) for k, v in unet.items()}, adapter_shapes(unet_config, cfg),
               f"{where} [ip_adapter]")


def adapter_to_official(adapter_path: str, out_path: str, *, overwrite: bool = False) -> int:
    """leffa_jax adapter .safetensors -> the released layout: a torch pickle
    {'image_proj_model': OrderedDict, 'ip_adapter': OrderedDict} (.bin/.pth), or a flat
    .safetensors with those prefixes. -> tensor count."""
    _, meta = _read_safetensors(adapter_path) if os.path.isfile(adapter_path) else ({}, {})
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{adapter_path}: not a leffa_jax StoryMaker adapter file (convert "
                              "the official mask.bin with `convert storymaker-to-flax` first)")
    outputs.check_output_file(out_path, [adapter_path], (".bin", ".pth", ".safetensors"))
    if os.path.exists(out_path) and not overwrite:
        raise CheckpointError(f"{out_path} exists; pass --overwrite to replace it")
    _, proj, unet = read_adapter(adapter_path)
    paths = json.loads(meta["processors"])
    image_proj = OrderedDict(image_proj_to_torch(k, v) for k, v in proj.items())
    ip = unet_params_to_processors(unet, paths)
    if out_path.endswith(".safetensors"):
        items = [(f"image_proj_model.{k}", np.ascontiguousarray(v)) for k, v in image_proj.items()]
        items += [(f"ip_adapter.{k}", np.ascontiguousarray(v)) for k, v in ip.items()]
        write_safetensors(out_path, items)
        return len(items)
    import torch

    state = {"image_proj_model": OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)))
                                             for k, v in image_proj.items()),
             "ip_adapter": OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)))
                                       for k, v in ip.items())}
    tmp = out_path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_path)
    return len(image_proj) + len(ip)


def save_adapter(model, out_path: str) -> int:
    """Write a StoryMakerModel's adapter (image_proj_model + UNet LoRA / to_k_ip / to_v_ip; a
    merged LoRA is written from its factors, the base kernel untouched) as a leffa_jax adapter
    file. -> tensor count."""
    from flax import nnx

    from leffa_jax.nn.lora import is_lora_path
    from leffa_jax.systems.storymaker import processor_paths

    outputs.check_output_file(out_path, [], (".safetensors",))
    items = [(f"image_proj_model.{'.'.join(map(str, p))}", np.asarray(v[...]))
             for p, v in nnx.to_flat_state(nnx.state(model.image_proj_model, nnx.Param))]
    for p, v in nnx.to_flat_state(nnx.state(model.unet, nnx.Param)):
        path = ".".join(map(str, p))
        if is_lora_path(path) or ".to_k_ip." in path or ".to_v_ip." in path:
            items.append((f"unet.{path}", np.asarray(v[...])))
    meta = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION,
            "adapter_config": json.dumps(model.adapter_config.to_dict()),
            "processors": json.dumps(processor_paths(model.unet))}
    write_safetensors(out_path, items, metadata=meta)
    return len(items)
