"""Tiny Face-diffuser on the synthetic two-subject set (CPU, 2 cores): trains the SDM (default) or,
with `--config.task=face_diffuser_tdm`, the TDM from the tiny random model of the shared fixtures.

    python -m leffa_jax.train --config leffa_jax/configs/face_diffuser_tiny.py --workdir /tmp/fd_sdm
    python -m leffa_jax.train --config leffa_jax/configs/face_diffuser_tiny.py \\
        --workdir /tmp/fd_tdm --config.task=face_diffuser_tdm
    python -m leffa_jax.sample --task subject2image --sdm /tmp/fd_sdm/export \\
        --tdm /tmp/fd_tdm/export --base /tmp/fd_base --prompt "a man <|image|> in the park" \\
        --subject face.png --steps 10 --merge-start 2 --merge-end 6 --height 64 --width 64 \\
        --object-resolution 64 --out /tmp/fd_out

Hardware: 2 CPU cores. 64x64 images (8x8 latents), objects 32 px, batch 4, 100 steps; expect a
few minutes per model; the denoising loss falls from about 1. The sampling base folder needs the
base VAE weights (any SD1.5-layout folder with vae/ weights, tokenizer/ and scheduler/); for
these random tiny models, the fixture's `config/base_sd15` with its `base_vae.*` weights saved as
`vae/diffusion_pytorch_model.safetensors` (what
tests/test_face_diffuser_train.py::test_tiny_config_trains_the_tdm_and_samples_with_both does:
both models trained, then sampled with these commands). The pictures of random tiny models are
noise; the job shows the whole path runs.
"""

from leffa_jax.configs.face_diffuser_common import base_config


def get_config():
    c = base_config("face_diffuser_sdm")
    c.model.base = ""
    c.train.steps = 100
    c.train.batch_size = 4
    c.train.lr = 1e-3
    c.train.dtype = "float32"
    c.train.remat = False
    c.train.ema_decay = 0.0
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    c.log.every = 10
    c.log.image_every = 0
    c.data.name = "synthetic_subjects"
    c.data.resolution = 64
    c.data.object_resolution = 32
    c.data.num_synthetic = 32
    return c
