"""Base-model config folders shipped with the package, usable by name.

Leffa builds on a diffusers inpainting model; building the modules and the noise schedule needs
only that model's config files (`unet/config.json`, `vae/config.json`,
`scheduler/scheduler_config.json`, a few KB); the weights come from the Leffa checkpoint.

The official weights are in the Hugging Face repository `franciszzj/Leffa`
(`huggingface-cli download franciszzj/Leffa --local-dir ckpts`):

    virtual_tryon.pth        virtual try-on (VITON-HD)     base config: sd15-inpainting
    virtual_tryon_dc.pth     virtual try-on (DressCode)    base config: sd15-inpainting
    pose_transfer.pth        pose transfer (DeepFashion)   base config: sdxl-inpainting
    stable-diffusion-inpainting/, stable-diffusion-xl-1.0-inpainting-0.1/   the base folders

The bundled folders hold the config files of those two base folders under their upstream names
(the official zero-terminal-SNR rule reads the folder name, `schedulers.uses_zero_terminal_snr`).
"""

from __future__ import annotations

import os

from leffa_jax.weights.tensor_io import CheckpointNotFoundError

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")

# name -> folder under leffa_jax/assets/
BASE_CONFIGS = {
    "sd15-inpainting": "stable-diffusion-inpainting",
    "sdxl-inpainting": "stable-diffusion-xl-1.0-inpainting-0.1",
    "tiny": "tiny_sd15",  # an SD1.5-like toy for the demo and tests
}


def bundled_names() -> list[str]:
    """The short names `resolve_base_config` accepts (the bundled folder names work too)."""
    return list(BASE_CONFIGS)


def resolve_base_config(name_or_path: str | os.PathLike) -> str:
    """A base config folder (holding unet/, vae/, scheduler/): an existing folder is used as is;
    otherwise a bundled name ("sd15-inpainting", "sdxl-inpainting", "tiny", or the upstream
    folder names) gives the folder shipped in `leffa_jax/assets/`.
    Raises CheckpointNotFoundError naming the path and the bundled names."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    folder = BASE_CONFIGS.get(path, path if path in BASE_CONFIGS.values() else None)
    if folder is not None:
        return os.path.join(ASSETS_DIR, folder)
    what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
    raise CheckpointNotFoundError(
        f"base config {path!r} {what}: give a folder with unet/ vae/ scheduler/ configs (e.g. "
        f"the stable-diffusion-inpainting folder of franciszzj/Leffa) or a bundled name: "
        f"{', '.join(bundled_names())}")
