"""Weights between PyTorch (official Leffa `.pth`, diffusers folders) and Flax, both ways.

The only module that knows PyTorch names and NCHW layouts. torch is imported lazily, only to read
`.pth` / `.bin` (safetensors files need no torch).

Names: the NNX module tree mirrors diffusers, so a torch key and a Flax path are the same string up
to the leaf. Leaf rules (`torch_to_flax_leaf`, `flax_to_torch_leaf`):
    Conv2d  weight (O, I, kh, kw)  <->  kernel (kh, kw, I, O)
    Linear  weight (O, I)          <->  kernel (I, O)
    norms   weight (C,)            <->  scale (C,)
    bias                           <->  bias
Transposes are exact, dtypes are kept, dead weights (attn2, the reference UNet's conv_out,
SDXL's add_embedding) are ordinary parameters: torch -> Flax -> torch is bit-exact.

Component names: official checkpoint prefixes `vae.`, `unet_encoder.` (reference UNet) and `unet.`
(generative UNet) are kept as the component names on the Flax side too (`COMPONENTS`).

Conversion streams tensor by tensor (mmap'd `.pth`, lazily read safetensors, a streaming
safetensors writer), so peak memory stays near one copy of the largest tensor plus page cache.

A leffa_jax checkpoint directory (written by `save_flax_checkpoint`):
    leffa_jax.json                          format marker, component -> (kind, in_channels)
    config/{unet,vae,scheduler}/...json     the base-model configs
    params.safetensors                      Flax names, e.g. `unet.down_blocks.0.resnets.0.conv1.kernel`
    orbax/                                  (optional) the same tree as an Orbax checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

FORMAT_NAME = "leffa_jax"
FORMAT_VERSION = 1
# component -> kind of module (official checkpoint prefix == component name).
COMPONENTS = {"vae": "vae", "unet_encoder": "unet", "unet": "unet"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (names the file and problem)."""


# ----------------------------------------------------------------------------- leaf rules

def torch_to_flax_leaf(key: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
    """torch key + tensor -> Flax path string + array (layout only; dtype kept)."""
    base, leaf = key.rsplit(".", 1)
    if leaf == "bias":
        return key, arr
    if leaf != "weight":
        raise CheckpointError(f"unexpected tensor {key!r}: only .weight/.bias leaves are known")
    if arr.ndim == 4:
        return f"{base}.kernel", arr.transpose(2, 3, 1, 0)
    if arr.ndim == 2:
        return f"{base}.kernel", arr.T
    if arr.ndim == 1:
        return f"{base}.scale", arr
    raise CheckpointError(f"tensor {key!r} has unsupported rank {arr.ndim} (shape {arr.shape})")


def flax_to_torch_leaf(path: str, arr: np.ndarray) -> tuple[str, np.ndarray]:
    base, leaf = path.rsplit(".", 1)
    if leaf == "bias":
        return path, arr
    if leaf == "scale":
        return f"{base}.weight", arr
    if leaf == "kernel":
        if arr.ndim == 4:
            return f"{base}.weight", arr.transpose(3, 2, 0, 1)
        if arr.ndim == 2:
            return f"{base}.weight", arr.T
    raise CheckpointError(f"unexpected Flax parameter {path!r} with shape {arr.shape}")


def torch_shape_to_flax(key: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """Like `torch_to_flax_leaf`, on shapes only (for strict checks before reading data)."""
    path, arr = torch_to_flax_leaf(key, np.broadcast_to(np.zeros((), np.uint8), shape))
    return path, tuple(arr.shape)


# ----------------------------------------------------------------------------- readers

class TensorSource:
    """Lazy, random-access view of a checkpoint file: keys, shapes and one tensor at a time.

    Supports `.safetensors` (lazy reads), `.pth`/`.pt`/`.bin`/`.ckpt` (torch zip format, mmap'd,
    `weights_only=True`), and sharded diffusers `*.index.json` files.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise CheckpointError(f"checkpoint not found: {self.path}")
        if os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is a folder; give a checkpoint file (.pth, "
                                  ".safetensors, .bin) or use the diffusers-folder conversion")
        self._get: dict[str, Callable[[], np.ndarray]] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        self._handles: list[Any] = []
        if self.path.endswith(".index.json"):
            self._open_index()
        elif self.path.endswith(".safetensors"):
            self._open_safetensors(self.path)
        elif self.path.endswith((".pth", ".pt", ".bin", ".ckpt")):
            self._open_torch(self.path)
        else:
            raise CheckpointError(f"{self.path}: unknown checkpoint extension (expected .pth, .pt, "
                                  ".bin, .ckpt, .safetensors or .safetensors.index.json)")

    def _open_safetensors(self, path: str) -> None:
        from safetensors import safe_open

        try:
            f = safe_open(path, framework="np")
            keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); the file is "
                                  "truncated or corrupt: download or convert it again") from None
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + header_len + end > size:
            raise CheckpointError(f"{path}: file is truncated ({size} bytes, header promises "
                                  f"{8 + header_len + end}): download or convert it again")
        self._handles.append(f)
        for k in keys:
            info = header[k]
            self._shape[k] = tuple(info["shape"])
            self._dtype[k] = info["dtype"]
            if info["dtype"] == "BF16":
                self._get[k] = (lambda k=k, f=f: _read_bf16_safetensors(path, header_len,
                                                                         header[k]))
            else:
                self._get[k] = (lambda k=k, f=f: f.get_tensor(k))

    def _open_torch(self, path: str) -> None:
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading .pth/.bin needs torch; install the extra "
                                  "`pip install -e .[torch] -c constraints.txt`, or convert to "
                                  ".safetensors first") from None
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True) ({e}); "
                                  "the file is truncated, corrupt or not a state dict") from None
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{path}: expected a state dict (mapping of tensors), got "
                                  f"{type(sd).__name__}")
        for k, t in sd.items():
            if not isinstance(t, torch.Tensor):
                continue
            self._shape[k] = tuple(t.shape)
            self._dtype[k] = str(t.dtype).replace("torch.", "")
            self._get[k] = (lambda t=t: _torch_to_numpy(t))
        self._handles.append(sd)

    def _open_index(self) -> None:
        with open(self.path) as f:
            index = json.load(f)
        folder = os.path.dirname(self.path)
        for shard in sorted(set(index["weight_map"].values())):
            sub = TensorSource(os.path.join(folder, shard))
            self._get.update(sub._get)
            self._shape.update(sub._shape)
            self._dtype.update(sub._dtype)
            self._handles.append(sub)

    def keys(self) -> list[str]:
        return list(self._get)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def dtype(self, key: str) -> str:
        return self._dtype[key]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._get[key]()

    def __contains__(self, key: str) -> bool:
        return key in self._get


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_bf16_safetensors(path: str, header_len: int, info: dict) -> np.ndarray:
    start, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(8 + header_len + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=ml_dtypes.bfloat16).reshape(info["shape"]).copy()


# ----------------------------------------------------------------------------- writers

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
              np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float64): "F64",
              np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
              np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


class LazyTensor:
    """Shape and dtype now, data on call: lets writers lay out a file before reading tensors."""

    def __init__(self, shape: tuple[int, ...], dtype, fn: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._fn = tuple(shape), np.dtype(dtype), fn

    def __call__(self) -> np.ndarray:
        return self._fn()


def _materialise(a) -> np.ndarray:
    return a() if callable(a) else np.asarray(a)


def write_safetensors(path: str, items: Iterable[tuple[str, Any]], *,
                      metadata: dict[str, str] | None = None) -> None:
    """Streaming safetensors writer: items are (name, array or LazyTensor); the header is laid
    out from shapes, then tensors are read and written one at a time. Writes to a temporary
    name and renames, so a crash never leaves a truncated file under the final name."""
    items = list(items)
    header: dict[str, Any] = {}
    offset = 0
    for name, a in items:
        dt = np.dtype(a.dtype)
        if dt not in _ST_DTYPES:
            raise CheckpointError(f"cannot write {name}: dtype {dt} has no safetensors code")
        nbytes = int(np.prod(a.shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(a.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _name, a in items:
            f.write(np.ascontiguousarray(_materialise(a)).tobytes())
    os.replace(tmp, path)  # never leave a half-written file under the final name


# ----------------------------------------------------------------------------- model side

def expected_params(component: str, config_dir: str, in_channels: int | None = None
                    ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Flax path -> (shape, dtype) of a component built from its base config (no allocation)."""
    from flax import nnx

    module = build_abstract(component, config_dir, in_channels)
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(map(str, p)): (tuple(v.shape), v.dtype) for p, v in flat}


def build_abstract(component: str, config_dir: str, in_channels: int | None = None):
    from flax import nnx

    from leffa_jax.nn.config import UNetConfig, VAEConfig
    from leffa_jax.nn.unet import UNet
    from leffa_jax.nn.vae import AutoencoderKL

    kind = COMPONENTS.get(component, component)
    if kind == "vae":
        cfg = VAEConfig.from_json(os.path.join(config_dir, "vae"))
        return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    cfg = UNetConfig.from_json(os.path.join(config_dir, "unet"), in_channels=in_channels)
    return nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))


def check_keys(got: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]],
               where: str) -> None:
    """Strict check: missing, unexpected and mis-shaped keys are one error listing them."""
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    misshaped = sorted(k for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
    if not (missing or unexpected or misshaped):
        return

    def show(keys, fmt=str, n=12):
        body = "\n    ".join(fmt(k) for k in keys[:n])
        more = f"\n    ... and {len(keys) - n} more" if len(keys) > n else ""
        return body + more

    parts = [f"{where} does not fit the model:"]
    if missing:
        parts.append(f"  {len(missing)} missing:\n    {show(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected:\n    {show(unexpected)}")
    if misshaped:
        parts.append(f"  {len(misshaped)} with wrong shape (checkpoint vs model):\n    "
                     + show(misshaped, lambda k: f"{k}: {tuple(got[k])} vs {tuple(want[k])}"))
    parts.append("  Is the checkpoint of another architecture, or the base config folder the "
                 "wrong one (SD1.5 vs SDXL)?")
    raise CheckpointError("\n".join(parts))


def _split_components(source: TensorSource, components: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in components}
    stray = []
    for k in source.keys():
        comp = k.split(".", 1)[0]
        (out[comp] if comp in out else stray).append(k)
    if stray:
        raise CheckpointError(f"{source.path}: {len(stray)} keys outside the components "
                              f"{sorted(out)}: {stray[:8]}")
    for c, ks in out.items():
        if not ks:
            raise CheckpointError(f"{source.path}: no '{c}.*' tensors; an official Leffa "
                                  f"checkpoint has {sorted(COMPONENTS)}")
    return out


def _in_channels(source: TensorSource, prefix: str) -> int | None:
    key = f"{prefix}conv_in.weight"
    return source.shape(key)[1] if key in source else None


def plan_official(path: str, config_dir: str) -> tuple[TensorSource, dict[str, dict[str, str]],
                                                         dict[str, int | None]]:
    """Validate an official Leffa checkpoint against the base config; returns the source, per
    component {flax path: torch key}, and the UNets' input channels."""
    source = TensorSource(path)
    split = _split_components(source, COMPONENTS)
    mapping, in_ch = {}, {}
    for comp, keys in split.items():
        pre = comp + "."
        in_ch[comp] = _in_channels(source, pre) if COMPONENTS[comp] == "unet" else None
        want = {k: s for k, (s, _) in expected_params(comp, config_dir, in_ch[comp]).items()}
        got, m = {}, {}
        for k in keys:
            fp, shape = torch_shape_to_flax(k[len(pre):], source.shape(k))
            got[fp], m[fp] = shape, k
        check_keys(got, want, f"{path} [{comp}] with base config {config_dir}")
        mapping[comp] = m
    return source, mapping, in_ch


def load_flax_params(source: TensorSource, mapping: dict[str, str]) -> dict[str, np.ndarray]:
    """Flat {flax path: array} read tensor by tensor."""
    return {fp: torch_to_flax_leaf(k, source[k])[1] for fp, k in mapping.items()}


def flat_to_nested(flat: Mapping[str, Any]) -> dict:
    """{'a.0.b': x} -> {'a': {0: {'b': x}}} (integer keys for list indices, as NNX uses)."""
    root: dict = {}
    for path, v in flat.items():
        node = root
        parts = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return root


def nested_to_flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(nested_to_flat(v, name + "."))
        else:
            out[name] = v
    return out


def module_from_flat(component: str, config_dir: str, flat: Mapping[str, Any],
                     in_channels: int | None = None):
    """Build the NNX module of `component` holding exactly the given parameters."""
    import jax.numpy as jnp
    from flax import nnx

    abstract = build_abstract(component, config_dir, in_channels)
    graphdef, state = nnx.split(abstract)
    want = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    check_keys({k: tuple(v.shape) for k, v in flat.items()}, want, f"[{component}] parameters")
    nnx.replace_by_pure_dict(state, flat_to_nested({k: jnp.asarray(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def module_to_flat(module) -> dict[str, np.ndarray]:
    from flax import nnx

    return {".".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# ----------------------------------------------------------------------------- checkpoints

def _copy_configs(config_dir: str, out_dir: str) -> None:
    """Copy the base configs; the scheduler config gets an explicit `rescale_betas_zero_snr`
    (the official code decides it from the base folder's NAME, which the copy loses)."""
    from leffa_jax.schedulers import uses_zero_terminal_snr

    for sub in ("unet", "vae", "scheduler"):
        src = os.path.join(config_dir, sub)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out_dir, "config", sub), dirs_exist_ok=True)
    sched = os.path.join(out_dir, "config", "scheduler", "scheduler_config.json")
    if os.path.exists(sched):
        with open(sched) as f:
            cfg = json.load(f)
        if "rescale_betas_zero_snr" not in cfg:
            cfg["rescale_betas_zero_snr"] = uses_zero_terminal_snr(config_dir)
            with open(sched, "w") as f:
                json.dump(cfg, f, indent=2)


def save_flax_checkpoint(out_dir: str, params: Mapping[str, LazyTensor | np.ndarray],
                         config_dir: str, components: Mapping[str, dict],
                         formats: Iterable[str] = ("safetensors",)) -> None:
    """Write a leffa_jax checkpoint folder. `params` maps '<component>.<flax path>' to arrays (or
    LazyTensors, for streaming). `components`: name -> {"kind", "in_channels"}."""
    formats = set(formats)
    if not formats <= {"safetensors", "orbax"}:
        raise ValueError(f"unknown formats {formats - {'safetensors', 'orbax'}}")
    os.makedirs(out_dir, exist_ok=True)
    _copy_configs(config_dir, out_dir)
    if "safetensors" in formats:
        write_safetensors(os.path.join(out_dir, "params.safetensors"), list(params.items()),
                          metadata={"format": FORMAT_NAME})
    if "orbax" in formats:
        import orbax.checkpoint as ocp

        tree = {k: _materialise(v) for k, v in params.items()}
        tree = _stringify_keys(flat_to_nested(tree))
        target = os.path.abspath(os.path.join(out_dir, "orbax"))
        if os.path.exists(target):
            shutil.rmtree(target)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(target, tree)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "components": dict(components),
            "files": sorted(formats)}
    with open(os.path.join(out_dir, "leffa_jax.json"), "w") as f:
        json.dump(meta, f, indent=2)


def _stringify_keys(tree):
    return {str(k): _stringify_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def is_flax_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "leffa_jax.json"))


def read_flax_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (meta, {'<component>.<flax path>': array}). Reads params.safetensors, else orbax/."""
    meta_path = os.path.join(path, "leffa_jax.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a leffa_jax checkpoint (no leffa_jax.json); "
                              "convert an official checkpoint with `python -m leffa_jax.convert "
                              "to-flax`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT_NAME}")
    st = os.path.join(path, "params.safetensors")
    if os.path.exists(st):
        src = TensorSource(st)
        return meta, {k: src[k] for k in src.keys()}
    orbax_dir = os.path.join(path, "orbax")
    if os.path.isdir(orbax_dir):
        import orbax.checkpoint as ocp

        try:
            tree = ocp.StandardCheckpointer().restore(os.path.abspath(orbax_dir))
        except Exception as e:
            raise CheckpointError(f"{orbax_dir}: cannot restore Orbax checkpoint ({e})") from None
        return meta, {k: np.asarray(v) for k, v in nested_to_flat(tree).items()}
    raise CheckpointError(f"{path}: neither params.safetensors nor orbax/ is present")


# ----------------------------------------------------------------------------- conversions

def official_to_flax(checkpoint: str, config_dir: str, out_dir: str,
                     formats: Iterable[str] = ("safetensors",)) -> dict:
    """Official Leffa `.pth`/`.safetensors` + base config folder -> leffa_jax checkpoint."""
    source, mapping, in_ch = plan_official(checkpoint, config_dir)
    params = {f"{comp}.{fp}": _lazy_flax(source, k) for comp, m in mapping.items()
              for fp, k in m.items()}
    comps = {c: {"kind": COMPONENTS[c], "in_channels": in_ch[c]} for c in mapping}
    save_flax_checkpoint(out_dir, params, config_dir, comps, formats)
    return comps


_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
              "float64": np.float64}


def _lazy_flax(source: TensorSource, key: str) -> LazyTensor:
    _, shape = torch_shape_to_flax(key, source.shape(key))
    dtype = _NP_DTYPES.get(source.dtype(key))
    if dtype is None:
        raise CheckpointError(f"{source.path}: tensor {key} has unsupported dtype "
                              f"{source.dtype(key)}")
    return LazyTensor(shape, dtype, lambda: torch_to_flax_leaf(key, source[key])[1])


def diffusers_to_flax(folder: str, out_dir: str, formats: Iterable[str] = ("safetensors",)) -> dict:
    """diffusers-format model folder (unet/, vae/) -> leffa_jax checkpoint with components
    `unet` and `vae` (as in the folder; Leffa initialisation is `leffa_jax.model`'s job)."""
    params, comps = {}, {}
    for comp in ("unet", "vae"):
        sub = os.path.join(folder, comp)
        weights = find_diffusers_weights(sub)
        source = TensorSource(weights)
        in_ch = _in_channels(source, "") if comp == "unet" else None
        want = {k: s for k, (s, _) in expected_params(comp, folder, in_ch).items()}
        got, m = {}, {}
        for k in source.keys():
            fp, shape = torch_shape_to_flax(k, source.shape(k))
            got[fp], m[fp] = shape, k
        check_keys(got, want, f"{weights} with config {sub}/config.json")
        for fp, k in m.items():
            params[f"{comp}.{fp}"] = _lazy_flax(source, k)
        comps[comp] = {"kind": comp, "in_channels": in_ch}
    save_flax_checkpoint(out_dir, params, folder, comps, formats)
    return comps


def find_diffusers_weights(sub: str) -> str:
    if not os.path.isdir(sub):
        raise CheckpointError(f"{sub} not found: a diffusers folder has unet/ and vae/ subfolders")
    for name in ("diffusion_pytorch_model.safetensors",
                 "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"):
        p = os.path.join(sub, name)
        if os.path.exists(p):
            return p
    raise CheckpointError(f"{sub}: no diffusion_pytorch_model.(safetensors|bin) found")


def flax_to_torch_state(ckpt_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """leffa_jax checkpoint -> (torch key, array) in the original names, shapes and dtypes."""
    _, flat = read_flax_checkpoint(ckpt_dir)
    for name, arr in flat.items():
        comp, path = name.split(".", 1)
        key, t = flax_to_torch_leaf(path, arr)
        yield f"{comp}.{key}", np.ascontiguousarray(t)


def flax_to_torch(ckpt_dir: str, out_path: str) -> int:
    """Write a PyTorch state dict (`.pth` via torch.save, or `.safetensors`) that the official
    code loads (`model.load_state_dict(torch.load(path))`). Returns the tensor count."""
    items = list(flax_to_torch_state(ckpt_dir))
    tmp = out_path + ".tmp"
    if out_path.endswith(".safetensors"):
        write_safetensors(out_path, items)
    elif out_path.endswith((".pth", ".pt", ".bin")):
        import torch

        sd = {}
        for k, a in items:
            if a.dtype == ml_dtypes.bfloat16:
                sd[k] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            else:
                sd[k] = torch.from_numpy(a)
        torch.save(sd, tmp)
        os.replace(tmp, out_path)
    else:
        raise CheckpointError(f"{out_path}: output must end in .pth, .pt, .bin or .safetensors")
    return len(items)


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m leffa_jax.convert",
        description="Convert Leffa / Stable Diffusion weights between PyTorch and Flax.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-flax", help="official .pth/.safetensors (with --base-config) or a "
                                        "diffusers folder (--diffusers) -> leffa_jax checkpoint")
    a.add_argument("--checkpoint", help="official Leffa checkpoint (.pth or .safetensors)")
    a.add_argument("--base-config", help="base model folder with unet/ vae/ scheduler/ configs")
    a.add_argument("--diffusers", help="diffusers-format model folder (unet/, vae/)")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--formats", default="safetensors",
                   help="comma list of safetensors,orbax (default safetensors)")
    b = sub.add_parser("to-torch", help="leffa_jax checkpoint -> PyTorch state dict file")
    b.add_argument("--flax", required=True, help="leffa_jax checkpoint folder")
    b.add_argument("--out", required=True, help="output .pth or .safetensors")
    c = sub.add_parser("verify", help="check that a PyTorch file and a PyTorch->Flax->PyTorch "
                                      "round trip of it are bit-identical")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--base-config", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "to-flax":
            formats = [f.strip() for f in args.formats.split(",") if f.strip()]
            if bool(args.checkpoint) == bool(args.diffusers):
                ap.error("give exactly one of --checkpoint (with --base-config) or --diffusers")
            if args.checkpoint:
                if not args.base_config:
                    ap.error("--checkpoint needs --base-config (the SD1.5 or SDXL config folder)")
                comps = official_to_flax(args.checkpoint, args.base_config, args.out, formats)
            else:
                comps = diffusers_to_flax(args.diffusers, args.out, formats)
            print(f"wrote {args.out}: components {comps}")
        elif args.cmd == "to-torch":
            n = flax_to_torch(args.flax, args.out)
            print(f"wrote {args.out}: {n} tensors")
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                official_to_flax(args.checkpoint, args.base_config, tmp)
                back = dict(flax_to_torch_state(tmp))
                src = TensorSource(args.checkpoint)
                bad = [k for k in src.keys()
                       if k not in back or back[k].dtype != src[k].dtype
                       or back[k].shape != src[k].shape or back[k].tobytes() != src[k].tobytes()]
            if bad or len(back) != len(src.keys()):
                print(f"round trip differs for {len(bad)} tensors: {bad[:10]}")
                return 1
            print(f"round trip bit-exact for all {len(back)} tensors")
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
