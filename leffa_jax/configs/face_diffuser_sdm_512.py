"""Face-diffuser SDM (subject-augmented model) at 512 px: the released recipe (run_train.sh).

    python -m leffa_jax.train --config leffa_jax/configs/face_diffuser_sdm_512.py \\
        --workdir runs/fd_sdm --config.model.init=pretrained --config.model.base=SD15_DIR \\
        --config.model.clip=CLIP_VIT_L14_DIR --config.data.root=ffhq_wild_files

Hardware: official 4 GPUs x batch 8 (bf16, 150k steps); here one v4-8 / 4-8 accelerators with
the same global batch 32. `model.init=pretrained` is the released recipe's start: SD1.5's UNet,
VAE and text encoder (SD15_DIR, the diffusers folder), CLIP ViT-L/14's vision tower and
projection (CLIP_VIT_L14_DIR, openai/clip-vit-large-patch14 as downloaded), a fresh postfuse MLP.
Or a converted SDM folder (`python -m leffa_jax.convert
face-diffuser --checkpoint SDM/pytorch_model.bin --base SD15_DIR --out SDM_flax`) to fine-tune
the release. Trained: UNet, postfuse MLP and the last 2 CLIP vision layers; loss = denoising
(masked with p 0.5) + 1e-3 localisation. Expected (FastComposer issue #8): denoise ~0.09,
localisation falling from 0 to about -0.6. Time: days for the full 150k steps (not measured).
"""

from leffa_jax.configs.face_diffuser_common import base_config


def get_config():
    c = base_config("face_diffuser_sdm")
    c.train.steps = 150_000
    c.train.batch_size = 32
    c.train.dtype = "bfloat16"
    c.data.name = "fastcomposer"
    c.data.resolution = 512
    c.data.object_resolution = 224
    c.checkpoint.every = 5000
    c.log.every = 50
    c.log.image_every = 0
    return c
