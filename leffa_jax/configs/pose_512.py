"""Pose transfer stage 2: 512x352, from stage 1's export (paper: 80k steps).

    python -m leffa_jax.train --config leffa_jax/configs/pose_512.py \
        --workdir gs://BUCKET/runs/pose_512 \
        --config.model.init=leffa:gs://BUCKET/runs/pose_256/export

Same hardware as stage 1.
"""

from leffa_jax.configs.pose_256 import get_config as stage1


def get_config():
    c = stage1()
    c.model.init = "leffa:runs/pose_256/export"
    c.data.height, c.data.width = 512, 352
    return c
