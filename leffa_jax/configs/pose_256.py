"""Pose transfer stage 1: 256x176 on DeepFashion, from SDXL-inpainting (paper: 80k, batch 256).

    python -m leffa_jax.train --config leffa_jax/configs/pose_256.py \
        --workdir gs://BUCKET/runs/pose_256 \
        --config.model.init=sd_inpainting:/path/to/stable-diffusion-xl-1.0-inpainting-0.1 \
        --config.data.tfds_dir=gs://BUCKET/tfds

Sized for TPU v5p-128 or 16x H100 (SDXL UNets, 2.6B params each: FSDP is required), bf16,
remat. Zero-terminal-SNR schedule as the official pose model.
"""

from leffa_jax.configs.common import base_config


def get_config():
    c = base_config()
    c.model.init = "sd_inpainting:stable-diffusion-xl-1.0-inpainting-0.1"
    c.model.scheduler_overrides.rescale_betas_zero_snr = True
    c.train.steps = 80_000
    c.train.batch_size = 256
    c.data.name = "deepfashion"
    c.data.height, c.data.width = 256, 176
    c.data.pose_garment_mask = "foreground"
    c.data.num_workers = 8
    c.checkpoint.every = 2000
    return c
