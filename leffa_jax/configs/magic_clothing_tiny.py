"""Tiny Magic Clothing on the synthetic VITON-HD-layout set (CPU, 2 cores): the embedded demo.

    python -m leffa_jax.systems.magic_clothing_train --demo --workdir /tmp/mc_demo
    # or the training alone:
    python -m leffa_jax.train --config leffa_jax/configs/magic_clothing_tiny.py \\
        --workdir /tmp/mc_tiny

Hardware: 2 CPU cores. Base: the tiny random SD1.5 of the shared fixtures (32x24 images, CLIP
width 32, real CLIP vocabulary); because that base is random, the demo trains the denoiser
together with the extractor (`model.train_denoiser`), unlike the paper. The VAE is the one of
the Leffa demo's tiny try-on baseline (`leffa_jax/assets/tiny_tryon_baseline`, trained on this
synthetic set; `model.vae`), so latents decode to pictures. The run starts from the shipped tiny
Magic Clothing baseline (`leffa_jax/assets/tiny_magic_clothing`: `model.denoiser` and
`model.init=extractor:...`; 6000 steps of this config from scratch, its provenance.json), because
the denoiser only starts reading the garment between 2000 and 6000 steps. 200 steps of
fine-tuning take about 2 minutes (1 min of steps, batch 8, epsilon MSE about 0.1); the image grid
(garment | person | sample from the template caption, joint guidance, UniPC) lands in the
workdir's images every `log.image_every` steps, and at the end
`export/garment_extractor.safetensors` (released layout) and `export/base/` (the base folder with
the trained denoiser). The demo command also prints the garment-use measure (right garment <
none < another garment's, docs/magic_clothing.md) and writes grid.png. From scratch (23 min on a
quiet 2-core VM): `--config leffa_jax/configs/magic_clothing_tiny.py:scratch`.
Sample from a run:

    python -m leffa_jax.sample --task garment2image --base /tmp/mc_tiny/export/base \\
        --vae leffa_jax/assets/tiny_tryon_baseline \\
        --extractor /tmp/mc_tiny/export/garment_extractor.safetensors --garment GARMENT.png \\
        --height 32 --width 24 --out /tmp/mc_tiny/samples
"""

import os

from leffa_jax.demo import BASELINE_DIR
from leffa_jax.systems.magic_clothing_train import (
    BASELINE_DENOISER,
    BASELINE_EXTRACTOR,
    base_config,
)
from leffa_jax.systems.magic_clothing_train import BASELINE_DIR as MC_BASELINE_DIR


def get_config(arg: str | None = None):
    """arg: None (fine-tune the shipped baseline) or "scratch" (train it from the random base,
    6000 steps: `--config leffa_jax/configs/magic_clothing_tiny.py:scratch`)."""
    if arg not in (None, "", "scratch"):
        raise ValueError(f"magic_clothing_tiny.py:{arg}: the variants are '' (fine-tune the "
                         "shipped baseline) and 'scratch' (6000 steps from the random base)")
    c = base_config()
    c.train.steps = 6000 if arg == "scratch" else 200
    c.train.batch_size = 8
    c.train.lr = 1e-3
    c.train.dtype = "float32"
    c.train.remat = False
    c.train.ema_decay = 0.99
    c.train.ema_warmup = True
    c.model.train_denoiser = True
    c.model.vae = BASELINE_DIR
    if arg != "scratch":  # start from the shipped baseline: its denoiser and extractor
        c.model.denoiser = os.path.join(MC_BASELINE_DIR, BASELINE_DENOISER)
        c.model.init = "extractor:" + os.path.join(MC_BASELINE_DIR, BASELINE_EXTRACTOR)
    c.train.loss_weighting = "truncated_snr"  # as the Leffa demo (configs/synthetic_tiny.py)
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.log.every = 10
    c.log.image_every = 100
    c.log.sample_steps = 10
    c.data.name = "synthetic"
    c.data.height, c.data.width = 32, 24
    c.data.synthetic.height, c.data.synthetic.width = 32, 24
    c.data.synthetic.num_train, c.data.synthetic.num_test = 64, 8
    c.data.num_workers = 0
    return c
