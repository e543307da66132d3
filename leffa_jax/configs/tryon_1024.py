"""Try-on stage 2: 1024x768, from stage 1's export (paper: 36k steps, batch 64).

    python -m leffa_jax.train --config leffa_jax/configs/tryon_1024.py \
        --workdir gs://BUCKET/runs/tryon_1024 \
        --config.model.init=leffa:gs://BUCKET/runs/tryon_512/export

Sized for TPU v5p-64 or 8x H100 (batch 64, FSDP, bf16, remat). ~39 TFLOP per image per step;
about 10 images/s per 8 H100 at 50% MFU (~2.5 days for 36k steps).
"""

from leffa_jax.configs.tryon_512 import get_config as stage1


def get_config():
    c = stage1()
    c.model.init = "leffa:runs/tryon_512/export"
    c.train.steps = 36_000
    c.train.batch_size = 64
    c.data.height, c.data.width = 1024, 768
    return c
