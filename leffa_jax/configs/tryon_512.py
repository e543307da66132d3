"""Try-on stage 1: 512x384 on VITON-HD, from SD1.5-inpainting (paper: 10k steps, batch 256).

    python -m leffa_jax.train --config leffa_jax/configs/tryon_512.py \
        --workdir gs://BUCKET/runs/tryon_512 \
        --config.model.init=sd_inpainting:/path/to/stable-diffusion-inpainting \
        --config.data.tfds_dir=gs://BUCKET/tfds

Sized for a TPU v5p-64 (32 chips) or 8x H100: batch 256 with FSDP over all devices, bf16,
remat. Expect ~6.6 TFLOP per image per step, roughly 60 images/s per 8 H100 at 50% MFU
(~1 h for 10k steps on v5p-64); the epsilon loss settles near 0.1.
"""

from leffa_jax.configs.common import base_config


def get_config():
    c = base_config()
    c.model.init = "sd_inpainting:stable-diffusion-inpainting"
    c.train.steps = 10_000
    c.train.batch_size = 256
    c.data.name = "viton_hd"
    c.data.height, c.data.width = 512, 384
    c.data.num_workers = 8
    c.checkpoint.every = 1000
    return c
