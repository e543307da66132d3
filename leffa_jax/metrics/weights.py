"""Weights of the metric networks, converted from the users' own PyTorch files (never downloaded).

| network | file | where it is looked for |
| --- | --- | --- |
| FID Inception (pytorch-fid) | `pt_inception-2015-12-05-*.pth` | `$TORCH_HOME/hub/checkpoints` (pytorch-fid's download cache) |
| FID Inception (clean-fid) | `inception-2015-12-05.pt` (TorchScript) | `/tmp` (clean-fid's cache on Linux), the working folder, `$TORCH_HOME/hub/checkpoints` |
| SqueezeNet 1.1 | `squeezenet1_1-*.pth` (torchvision) | `$TORCH_HOME/hub/checkpoints` |
| LPIPS linear layers | `squeeze.pth` | inside the installed `torchmetrics` (`functional/image/lpips_models`) or `lpips` (`weights/v0.1`) package |

`$TORCH_HOME` defaults to `$XDG_CACHE_HOME/torch` or `~/.cache/torch`. Every loader also takes an
explicit path (the CLI's `--inception`, `--clean-inception`, `--squeezenet`, `--lpips-lins`).
Both Inception files hold the same TensorFlow network; the pytorch-fid state dict mirrors
torchvision names, clean-fid's TorchScript uses `layers.conv` / `layers.mixed_*.tower*` names with
BatchNorm `beta/mean/var` (no scale) -> `CLEAN_FID_NAMES` maps them.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import zipfile
from collections.abc import Mapping

import numpy as np
from flax import nnx

from leffa_jax.weights.modules import module_with_params
from leffa_jax.weights.tensor_io import CheckpointError, CheckpointNotFoundError, TensorSource

WHERE = {
    "inception": ("pytorch-fid's FID Inception weights pt_inception-2015-12-05-6726825d.pth",
                  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                  "pt_inception-2015-12-05-6726825d.pth (pytorch-fid downloads it to "
                  "$TORCH_HOME/hub/checkpoints on first use)"),
    "clean_inception": ("clean-fid's TorchScript Inception inception-2015-12-05.pt",
                        "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                        "metrics/inception-2015-12-05.pt (clean-fid saves it to /tmp)"),
    "squeezenet": ("torchvision's SqueezeNet 1.1 weights squeezenet1_1-b8a52dc0.pth",
                   "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth (torchvision "
                   "saves it to $TORCH_HOME/hub/checkpoints)"),
    "lpips_lins": ("the LPIPS linear layers squeeze.pth",
                   "`pip install torchmetrics` (torchmetrics/functional/image/lpips_models/"
                   "squeeze.pth) or `pip install lpips` (lpips/weights/v0.1/squeeze.pth)"),
}


def torch_home() -> str:
    return os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")


def _package_file(package: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(package)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def candidates(kind: str) -> list[str]:
    """The usual cache locations of a weight file, in search order."""
    hub = os.path.join(torch_home(), "hub", "checkpoints")
    if kind == "inception":
        return sorted(glob.glob(os.path.join(hub, "pt_inception-2015-12-05-*.pth")))
    if kind == "clean_inception":
        return [os.path.join(d, "inception-2015-12-05.pt") for d in ("/tmp", os.getcwd(), hub)]
    if kind == "squeezenet":
        return sorted(glob.glob(os.path.join(hub, "squeezenet1_1-*.pth")))
    if kind == "lpips_lins":
        return [p for p in (_package_file("torchmetrics", "functional", "image", "lpips_models",
                                          "squeeze.pth"),
                            _package_file("lpips", "weights", "v0.1", "squeeze.pth")) if p]
    raise ValueError(f"unknown weight kind {kind!r}; one of {sorted(WHERE)}")


def find(kind: str, path: str | None = None, flag: str | None = None) -> str:
    """`path` if given (it must exist), else the first existing usual location; a
    CheckpointNotFoundError naming the file and where to get it otherwise."""
    what, source = WHERE[kind]
    if path:
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"{what}: {path} does not exist")
        return path
    for p in candidates(kind):
        if os.path.isfile(p):
            return p
    looked = ", ".join(candidates(kind)) or os.path.join(torch_home(), "hub", "checkpoints")
    hint = f" or pass it with {flag}" if flag else ""
    raise CheckpointNotFoundError(
        f"{what} not found (looked in: {looked}). leffa_jax never downloads: get it from "
        f"{source}{hint}.")


def read_state(path: str) -> dict[str, np.ndarray]:
    """{key: float32 array} of a torch state dict file or a TorchScript archive."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
        if scripted:
            try:
                import torch
            except ImportError:
                raise CheckpointError(f"{path}: reading a TorchScript file needs torch; install "
                                      "`pip install -e .[torch] -c constraints.txt`") from None
            try:
                module = torch.jit.load(path, map_location="cpu")
            except Exception as e:
                raise CheckpointError(f"{path}: cannot load TorchScript ({e}); the file is "
                                      "truncated or corrupt: get it again") from None
            return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}
    src = TensorSource(path)
    return {k: np.asarray(src[k], np.float32) for k in src.keys()}


def build(cls, flat: Mapping[str, np.ndarray], where: str):
    """`cls(rngs=...)` holding exactly `flat` {flax path: array} (strict keys and shapes)."""
    return module_with_params(nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0))), flat, where)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO


# ---- Inception -----------------------------------------------------------------------------

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _clean_fid_names() -> dict[str, str]:
    """clean-fid TorchScript conv prefix -> pytorch-fid BasicConv2d prefix."""
    names = {"layers.conv": "Conv2d_1a_3x3", "layers.conv_1": "Conv2d_2a_3x3",
             "layers.conv_2": "Conv2d_2b_3x3", "layers.conv_3": "Conv2d_3b_1x1",
             "layers.conv_4": "Conv2d_4a_3x3"}
    blocks = dict(zip(["mixed"] + [f"mixed_{i}" for i in range(1, 11)],
                      ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"], strict=True))
    kinds = {"5b": "A", "5c": "A", "5d": "A", "6a": "B", "6b": "C", "6c": "C", "6d": "C", "6e": "C",
             "7a": "D", "7b": "E", "7c": "E"}
    conv_seq = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"]
    inner = {
        "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
              **{f"tower_1.{c}": f"branch3x3dbl_{i + 1}" for i, c in enumerate(conv_seq[:3])},
              "tower_2.conv": "branch_pool"},
        "B": {"conv": "branch3x3",
              **{f"tower.{c}": f"branch3x3dbl_{i + 1}" for i, c in enumerate(conv_seq[:3])}},
        "C": {"conv": "branch1x1",
              **{f"tower.{c}": f"branch7x7_{i + 1}" for i, c in enumerate(conv_seq[:3])},
              **{f"tower_1.{c}": f"branch7x7dbl_{i + 1}" for i, c in enumerate(conv_seq)},
              "tower_2.conv": "branch_pool"},
        "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
              **{f"tower_1.{c}": f"branch7x7x3_{i + 1}" for i, c in enumerate(conv_seq[:4])}},
        "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1",
              "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
              "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
              "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
              "tower_2_conv": "branch_pool"},
    }
    for src, dst in blocks.items():
        for a, b in inner[kinds[dst]].items():
            names[f"layers.{src}.{a}"] = f"Mixed_{dst}.{b}"
    return names


CLEAN_FID_NAMES = _clean_fid_names()


def inception_flat(state: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """{flax path: array} of `FIDInceptionV3` from a pytorch-fid state dict or clean-fid's
    TorchScript state dict (detected from the keys; classifier weights are dropped)."""
    flat: dict[str, np.ndarray] = {}
    if "layers.conv.weight" in state:  # clean-fid TorchScript
        for prefix, ours in CLEAN_FID_NAMES.items():
            try:
                flat[f"{ours}.kernel"] = _conv_kernel(state[f"{prefix}.weight"])
                flat[f"{ours}.bias"] = state[f"{prefix}.beta"]
                flat[f"{ours}.mean"] = state[f"{prefix}.mean"]
                flat[f"{ours}.var"] = state[f"{prefix}.var"]
            except KeyError as e:
                raise CheckpointError(f"{where}: clean-fid Inception without {e}; is it "
                                      "inception-2015-12-05.pt?") from None
            flat[f"{ours}.scale"] = np.ones_like(state[f"{prefix}.beta"])
        return flat
    if "Conv2d_1a_3x3.conv.weight" not in state:
        raise CheckpointError(f"{where}: not an FID Inception (no Conv2d_1a_3x3.conv.weight nor "
                              "layers.conv.weight); expected pt_inception-2015-12-05-*.pth or "
                              "clean-fid's inception-2015-12-05.pt")
    for key, value in state.items():
        if key.startswith(("fc.", "AuxLogits.")) or key.endswith("num_batches_tracked"):
            continue
        if key.endswith(".conv.weight"):
            flat[key[:-len(".conv.weight")] + ".kernel"] = _conv_kernel(value)
        elif ".bn." in key and key.rsplit(".bn.", 1)[1] in _BN:
            prefix, leaf = key.rsplit(".bn.", 1)
            flat[f"{prefix}.{_BN[leaf]}"] = value
        else:
            flat[key] = value  # reported as unexpected by the strict check
    return flat


def load_inception(path: str | None = None, *, clean: bool = False):
    """FIDInceptionV3 from a pytorch-fid `.pth` (clean=False) or clean-fid TorchScript (clean=True);
    `path=None` searches the usual caches."""
    from leffa_jax.metrics.inception import FIDInceptionV3

    kind = "clean_inception" if clean else "inception"
    path = find(kind, path, "--clean-inception" if clean else "--inception")
    return build(FIDInceptionV3, inception_flat(read_state(path), path), path)


# ---- LPIPS (SqueezeNet + linear layers) ----------------------------------------------------

def squeezenet_flat(state: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """`LPIPSSqueeze.net` paths from torchvision squeezenet1_1 (`features.*`; also accepts the
    lpips/torchmetrics `net.slices.*` / `net.slice{k}.*` full-model names)."""
    flat = {}
    for key, value in state.items():
        k = key
        for pre in ("net.slices.", "net.slice"):
            if k.startswith(pre):  # net.slices.{s}.{i}.* / net.slice{s}.{i}.* -> features.{i}.*
                k = "features." + k[len(pre):].split(".", 1)[1]
        if not k.startswith("features."):
            continue
        _, idx, rest = k.split(".", 2)
        name = "conv0" if idx == "0" else f"fire{idx}"
        mod, leaf = rest.rsplit(".", 1) if "." in rest else ("", rest)
        path = f"net.{name}." + (f"{mod}." if mod else "")
        flat[path + ("kernel" if leaf == "weight" else leaf)] = (
            _conv_kernel(value) if leaf == "weight" else value)
    if not flat:
        raise CheckpointError(f"{where}: no SqueezeNet `features.*` tensors; expected "
                              "torchvision's squeezenet1_1-*.pth")
    return flat


def lins_flat(state: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """`LPIPSSqueeze.lins` paths from lpips' `lin{k}.model.1.weight` (or `lin{k}.model.0.weight`,
    the layout without dropout)."""
    flat = {}
    for k in range(7):
        for key in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight"):
            if key in state:
                flat[f"lins.{k}.kernel"] = _conv_kernel(state[key])
                break
        else:
            raise CheckpointError(f"{where}: no lin{k}.model.1.weight; expected the LPIPS "
                                  "squeeze.pth of the lpips or torchmetrics package")
    return flat


def load_lpips(squeezenet: str | None = None, lins: str | None = None):
    """LPIPSSqueeze from torchvision's squeezenet1_1-*.pth and LPIPS's squeeze.pth."""
    from leffa_jax.metrics.lpips import LPIPSSqueeze

    net_path = find("squeezenet", squeezenet, "--squeezenet")
    lin_path = find("lpips_lins", lins, "--lpips-lins")
    flat = {**squeezenet_flat(read_state(net_path), net_path),
            **lins_flat(read_state(lin_path), lin_path)}
    return build(LPIPSSqueeze, flat, f"{net_path} + {lin_path}")
