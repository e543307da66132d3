"""Tiny Leffa on the synthetic VITON-HD-layout set: the README's main job (CPU, 2 cores).

    python -m leffa_jax.train --config configs/synthetic_tiny.py --workdir /tmp/leffa_tiny

Hardware: 2 CPU cores. Expect: a few minutes; the loss falls from ~1 to ~0.3.
`python -m leffa_jax.demo` runs this twice (with and without the Leffa loss) and prints the flow
endpoint error of the learned attention against the synthetic ground truth.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base_config  # noqa: E402


def get_config():
    c = base_config()
    c.model.base = "tiny"
    c.model.init = "random"
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.lr = 3e-4
    c.train.dtype = "float32"
    c.train.remat = False
    c.train.ema_decay = 0.99
    c.train.ema_warmup = True
    c.train.ref_drop_prob = 0.1
    c.leffa.enabled = True
    c.leffa.lam = 1.0
    c.leffa.t_threshold = 1000
    c.leffa.min_ratio = 0.0
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.log.every = 10
    c.log.image_every = 0
    c.log.sample_steps = 10
    c.data.name = "synthetic"
    c.data.height, c.data.width = 64, 48
    c.data.synthetic.height, c.data.synthetic.width = 64, 48
    c.data.synthetic.num_train, c.data.synthetic.num_test = 64, 8
    c.data.num_workers = 0
    return c
