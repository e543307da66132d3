"""Pose transfer stage 3: 512x352 + the Leffa loss, from stage 2's export (paper: 24k steps).

    python -m leffa_jax.train --config leffa_jax/configs/pose_512_leffa.py \
        --workdir gs://BUCKET/runs/pose_512_leffa \
        --config.model.init=leffa:gs://BUCKET/runs/pose_512/export

Same hardware; expect DeepFashion 512x352 FID near the paper's 4.23.
"""

from leffa_jax.configs.pose_512 import get_config as stage2


def get_config():
    c = stage2()
    c.model.init = "leffa:runs/pose_512/export"
    c.train.steps = 24_000
    c.leffa.enabled = True
    return c
