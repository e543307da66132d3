"""Tensor files, read and written one tensor at a time.

`TensorSource` reads `.safetensors` (lazily), torch `.pth`/`.pt`/`.bin`/`.ckpt` (mmap'd,
`torch.load(weights_only=True)`) and sharded `*.index.json`; `write_safetensors` lays the header
out from shapes and then writes tensors one by one (arrays or `LazyTensor`s), so converting a
checkpoint keeps about one tensor in memory. torch is imported only for `.pth`/`.bin` files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")

# safetensors / torch dtype names -> numpy dtypes (what conversion can lay out before reading).
NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                "F64": np.float64, "float32": np.float32, "float16": np.float16,
                "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}

_SAFETENSORS_CODES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (names the file and problem)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint (or base config) path that does not exist."""


class TensorSource:
    """Lazy, random-access view of a checkpoint file: keys, shapes, dtypes and one tensor at a
    time (`source[key]` reads it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise CheckpointNotFoundError(f"checkpoint not found: {self.path} does not exist")
        if os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is a folder; give a checkpoint file (.pth, "
                                  ".safetensors, .bin) or use the diffusers-folder conversion")
        self._readers: dict[str, Callable[[], np.ndarray]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._handles: list[Any] = []  # keeps open files / mmap'd state dicts alive
        if self.path.endswith(".index.json"):
            self._open_index()
        elif self.path.endswith(".safetensors"):
            self._open_safetensors(self.path)
        elif self.path.endswith(TORCH_EXTENSIONS):
            self._open_torch(self.path)
        else:
            raise CheckpointError(f"{self.path}: unknown checkpoint extension (expected .pth, .pt, "
                                  ".bin, .ckpt, .safetensors or .safetensors.index.json)")

    def _open_safetensors(self, path: str) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(path, framework="np")
            keys = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); the file is "
                                  "truncated or corrupt: download or convert it again") from None
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + header_len + end > size:
            raise CheckpointError(f"{path}: file is truncated ({size} bytes, header promises "
                                  f"{8 + header_len + end}): download or convert it again")
        self._handles.append(handle)
        for key in keys:
            info = header[key]
            self._shapes[key] = tuple(info["shape"])
            self._dtypes[key] = info["dtype"]
            if info["dtype"] == "BF16":  # safetensors' numpy backend has no bfloat16
                self._readers[key] = (lambda info=info: _read_bf16(path, header_len, info))
            else:
                self._readers[key] = (lambda key=key: handle.get_tensor(key))

    def _open_torch(self, path: str) -> None:
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading .pth/.bin needs torch; install the extra "
                                  "`pip install -e .[torch] -c constraints.txt`, or convert to "
                                  ".safetensors first") from None
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True) ({e}); "
                                  "the file is truncated, corrupt or not a state dict") from None
        if (isinstance(state, Mapping) and "state_dict" in state
                and isinstance(state["state_dict"], Mapping)):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: expected a state dict (mapping of tensors), got "
                                  f"{type(state).__name__}")
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            self._shapes[key] = tuple(tensor.shape)
            self._dtypes[key] = str(tensor.dtype).replace("torch.", "")
            self._readers[key] = (lambda tensor=tensor: _torch_to_numpy(tensor))
        self._handles.append(state)

    def _open_index(self) -> None:
        with open(self.path) as f:
            index = json.load(f)
        folder = os.path.dirname(self.path)
        for shard in sorted(set(index["weight_map"].values())):
            part = TensorSource(os.path.join(folder, shard))
            self._readers.update(part._readers)
            self._shapes.update(part._shapes)
            self._dtypes.update(part._dtypes)
            self._handles.append(part)

    def keys(self) -> list[str]:
        return list(self._readers)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        """safetensors code ("F32", "BF16", ...) or torch name ("float32", ...)."""
        return self._dtypes[key]

    def numpy_dtype(self, key: str) -> np.dtype:
        """The array dtype `source[key]` will have (floating tensors only)."""
        dtype = NUMPY_DTYPES.get(self._dtypes[key])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype "
                                  f"{self._dtypes[key]}")
        return np.dtype(dtype)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._readers[key]()

    def __contains__(self, key: str) -> bool:
        return key in self._readers


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _read_bf16(path: str, header_len: int, info: dict) -> np.ndarray:
    start, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(8 + header_len + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=ml_dtypes.bfloat16).reshape(info["shape"]).copy()


class LazyTensor:
    """Shape and dtype now, data on call: lets writers lay out a file before reading tensors."""

    def __init__(self, shape: tuple[int, ...], dtype, read: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._read = tuple(shape), np.dtype(dtype), read

    def __call__(self) -> np.ndarray:
        return self._read()


def materialise(value) -> np.ndarray:
    """A LazyTensor's data, or the array itself."""
    return value() if callable(value) else np.asarray(value)


def write_safetensors(path: str, items: Iterable[tuple[str, Any]], *,
                      metadata: dict[str, str] | None = None) -> None:
    """Streaming safetensors writer: items are (name, array or LazyTensor); the header is laid
    out from shapes, then tensors are read and written one at a time. Writes to a temporary
    name and renames, so a crash never leaves a truncated file under the final name."""
    items = list(items)
    header: dict[str, Any] = {}
    offset = 0
    for name, value in items:
        dtype = np.dtype(value.dtype)
        if dtype not in _SAFETENSORS_CODES:
            raise CheckpointError(f"cannot write {name}: dtype {dtype} has no safetensors code")
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _name, value in items:
            f.write(np.ascontiguousarray(materialise(value)).tobytes())
    os.replace(tmp, path)


def write_torch(path: str, items: Iterable[tuple[str, np.ndarray]]) -> None:
    """`torch.save` of a state dict {name: tensor} (bfloat16 kept), via a temporary name."""
    import torch

    state = {}
    for name, value in items:
        if value.dtype == ml_dtypes.bfloat16:
            state[name] = torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(value)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
