"""Magic Clothing garment extractor at 512x384 on VITON-HD (the paper's 512 setting).

    python -m leffa_jax.train --config leffa_jax/configs/magic_clothing_512.py \\
        --workdir gs://bucket/mc_512 --config.model.base /data/Realistic_Vision_V4.0_noVAE \\
        --config.model.vae /data/sd-vae-ft-mse --config.data.root /data/zalando-hd-resized \\
        [--config.data.captions /data/captions.json]

Hardware: a TPU v5e-16 / v4-8 or 8x A100/H100 80 GB (bf16, FSDP over the mesh, gradient
checkpointing). Trains the extractor only (a full SD1.5 UNet, 860 M parameters); denoiser, VAE
and text encoder frozen. Expectation: the released 512 extractors were saved at 60k/100k steps (file names); the
loss, throughput and image quality of this recipe are NOT measured here (no such hardware or
data in this project): check the image grids in the workdir. Captions: a per-image file
(data.captions) or the template caption. Export: export/garment_extractor.safetensors, which the
official ClothAdapter loads.
"""

from leffa_jax.systems.magic_clothing_train import base_config


def get_config():
    c = base_config()
    c.model.base = ""  # set: an SD1.5 folder, e.g. Realistic_Vision_V4.0_noVAE
    c.train.steps = 100_000
    c.train.batch_size = 64
    c.train.lr = 1e-5
    c.train.dtype = "bfloat16"
    c.train.remat = True
    c.checkpoint.every = 2000
    c.log.every = 50
    c.log.image_every = 2000
    c.data.name = "viton_hd"
    c.data.height, c.data.width = 512, 384
    c.data.num_workers = 8
    return c
