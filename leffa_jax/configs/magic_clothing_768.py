"""Magic Clothing garment extractor at 768x576 on VITON-HD (the paper's 768 setting).

    python -m leffa_jax.train --config leffa_jax/configs/magic_clothing_768.py \\
        --workdir gs://bucket/mc_768 --config.model.base /data/Realistic_Vision_V4.0_noVAE \\
        --config.model.vae /data/sd-vae-ft-mse --config.data.root /data/zalando-hd-resized \\
        [--config.data.captions /data/captions.json]

Hardware: a TPU v5e-16 / v4-8 or 8x A100/H100 80 GB (bf16, FSDP over the mesh, gradient
checkpointing). Trains the extractor only (a full SD1.5 UNet, 860 M parameters); denoiser, VAE
and text encoder frozen. Expectation: the released 768 extractors were saved at 120k-200k steps (file names); the
loss, throughput and image quality of this recipe are NOT measured here (no such hardware or
data in this project): check the image grids in the workdir. Captions: a per-image file
(data.captions) or the template caption. Export: export/garment_extractor.safetensors, which the
official ClothAdapter loads.
"""

from leffa_jax.configs.magic_clothing_512 import get_config as config_512


def get_config():
    c = config_512()
    c.train.steps = 200_000
    c.data.height, c.data.width = 768, 576
    return c
