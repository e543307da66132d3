"""Tiny Leffa on the synthetic VITON-HD-layout set: the README's main job (CPU, 2 cores).

    python -m leffa_jax.demo                 # this config's fine-tuning stage, twice (~4 min)
    python -m leffa_jax.train --config leffa_jax/configs/synthetic_tiny.py --workdir /tmp/leffa_tiny \
        --config.model.init=leffa:leffa_jax/assets/tiny_tryon_baseline

Hardware: 2 CPU cores. The stages, as the paper's recipe (try-on model first, then + Leffa
loss): `autoencoder` (the VAE on these images, systems/autoencoder.py, 300 steps, ~1 min), then
`baseline` (both UNets without the Leffa loss, 10 000 steps, ~28 min; its result ships as
leffa_jax/assets/tiny_tryon_baseline), then this config's own `train` section: 300 steps of
fine-tuning with the Leffa loss (~1.5 min). `python -m leffa_jax.demo --from-scratch` runs all
three; the demo prints the flow endpoint error and the try-on SSIM / PSNR on unseen pairs
(what to expect: docs/demo.md). On its own with `model.init = "random"` this trains from a
random model with a random VAE (pictures are then noise).
The Leffa weight is far above the paper's 1e-3 (lam 10, every timestep, every layer) so that its
effect can show within 300 steps; the paper's values are in leffa_jax/configs/tryon_1024_leffa.py.
"""

import ml_collections

from leffa_jax.configs.common import base_config


def get_config():
    c = base_config()
    c.model.base = "tiny"
    c.model.init = "random"
    c.train.steps = 300
    c.train.batch_size = 8
    c.train.lr = 1e-3
    c.train.decay = "cosine"
    # max(|x0 error|^2, |eps error|^2): the noisy steps, where only the garment can tell the
    # model what to paint, weigh as much as the nearly clean ones (objectives.loss_weights)
    c.train.loss_weighting = "truncated_snr"
    c.train.dtype = "float32"
    c.train.remat = False
    c.train.ema_decay = 0.99
    c.train.ema_warmup = True
    c.train.ref_drop_prob = 0.1
    c.leffa.enabled = True
    c.leffa.lam = 10.0
    c.leffa.t_threshold = 1000
    c.leffa.min_ratio = 0.0
    c.checkpoint.every = 150
    c.checkpoint.keep = 2
    c.log.every = 10
    c.log.image_every = 0
    c.log.sample_steps = 10
    c.data.name = "synthetic"
    c.data.height, c.data.width = 32, 24
    c.data.synthetic.height, c.data.synthetic.width = 32, 24
    c.data.synthetic.num_train, c.data.synthetic.num_test = 192, 8
    c.data.num_workers = 0
    # the stages before this one (`python -m leffa_jax.demo --from-scratch`; the shipped
    # baseline, leffa_jax/assets/tiny_tryon_baseline, was made so): the VAE trained on the same
    # images (systems/autoencoder.py), then the try-on model without the Leffa loss from that
    # VAE and a random SD-inpainting-shaped init, as the paper's first stages
    c.autoencoder = ml_collections.ConfigDict(
        {"steps": 300, "lr": 2e-3, "kl_weight": 1e-6, "scale_batches": 4})
    c.baseline = ml_collections.ConfigDict({"steps": 10_000, "lr": 1e-3, "decay": "constant"})
    return c
