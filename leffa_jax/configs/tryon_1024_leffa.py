"""Try-on stage 3: 1024x768 + the Leffa loss (lambda 1e-3, tau 2, t < 500, layers >= 1/32 of the
image: 15 SD1.5 layers), from stage 2's export (paper: 10k steps).

    python -m leffa_jax.train --config leffa_jax/configs/tryon_1024_leffa.py \
        --workdir gs://BUCKET/runs/tryon_1024_leffa \
        --config.model.init=leffa:gs://BUCKET/runs/tryon_1024/export

Same hardware as stage 2. The fused flow adds under 10% to the step (BENCHMARKS.md); expect the
Leffa term around 1e-4..1e-3 and sharper garment details (paper: VITON-HD FID 4.54 paired).
"""

from leffa_jax.configs.tryon_1024 import get_config as stage2


def get_config():
    c = stage2()
    c.model.init = "leffa:runs/tryon_1024/export"
    c.train.steps = 10_000
    c.leffa.enabled = True
    return c
