"""The StoryMaker fixture (`../shared/fixtures/storymaker/`) laid out as a user has it: a diffusers
SDXL folder (unet/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/, image_encoder/) and the
released `mask.bin` layout ({'image_proj_model': ..., 'ip_adapter': ...}, torch.save), both
written from `weights.safetensors` + `config/` into a temporary folder."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
from conftest import shared_path

from leffa_jax.weights.tensor_io import write_safetensors

FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
         "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors",
         "image_encoder": "model.safetensors"}


def fixture_dir() -> pathlib.Path:
    return shared_path("fixtures", "storymaker")


def load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir() / name) as z:
        return {k: z[k] for k in z.files}


def fixture_weights() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(fixture_dir() / "weights.safetensors"))


def write_mask_bin(weights: dict, path: pathlib.Path) -> pathlib.Path:
    """The official mask.bin from the fixture's image_proj_model.* / ip_adapter.* tensors."""
    import torch

    state = {p: {k[len(p) + 1:]: torch.from_numpy(v.copy()) for k, v in weights.items()
                 if k.startswith(p + ".")} for p in ("image_proj_model", "ip_adapter")}
    torch.save(state, path)
    return path


def write_base_folder(weights: dict, root: pathlib.Path) -> pathlib.Path:
    """A diffusers SDXL pipeline folder with image_encoder/ (as load_storymaker reads it)."""
    config = fixture_dir() / "config"
    root.mkdir(parents=True, exist_ok=True)
    for name, file in FILES.items():
        (root / name).mkdir()
        shutil.copy(config / name / "config.json", root / name / "config.json")
        items = [(k[len(name) + 1:], v) for k, v in weights.items() if k.startswith(name + ".")]
        write_safetensors(str(root / name / file), items)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(config / name, root / name)
    shutil.copy(config / "model_index.json", root / "model_index.json")
    return root


def fixture_system(tmp: pathlib.Path, lora_scale: float = 0.8):
    """-> (StoryMaker TextToImage system, base folder, mask.bin path)."""
    from leffa_jax.systems import storymaker
    from leffa_jax.systems.storymaker import AdapterConfig

    weights = fixture_weights()
    base = write_base_folder(weights, tmp / "base")
    mask = write_mask_bin(weights, tmp / "mask.bin")
    config = fixture_dir() / "config" / "storymaker_adapter.json"
    system = storymaker.load_storymaker(base, mask, adapter_config=config, lora_scale=lora_scale)
    assert AdapterConfig.from_json(config) == system.model.adapter_config
    return system, base, mask


_CACHE: dict = {}


def cached_system(lora_scale: float = 0.8):
    """`fixture_system` once per test process (both StoryMaker test modules share it; loading
    builds every module of the tiny SDXL)."""
    import tempfile

    if lora_scale not in _CACHE:
        tmp = tempfile.TemporaryDirectory(prefix="storymaker-fixture-")
        _CACHE[lora_scale] = (tmp, *fixture_system(pathlib.Path(tmp.name), lora_scale))
    return _CACHE[lora_scale][1:]


def characters_from_npz(f: dict):
    """The fixture's raw character inputs (photo, mask, Face) in slot order."""
    from leffa_jax.systems.storymaker_inputs import Face

    n = f["clip_image_pixels"].shape[0]
    return [(f[f"in_image_{i}"], f[f"in_mask_{i}"],
             Face(f[f"in_face_embedding_{i}"], f[f"in_kps_{i}"])) for i in range(n)]
