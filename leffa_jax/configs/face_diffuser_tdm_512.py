"""Face-diffuser TDM (text-driven model) at 512 px: text-only fine-tuning of the SD1.5 UNet on the
FastComposer captions (run_train_text_only.sh).

    python -m leffa_jax.train --config leffa_jax/configs/face_diffuser_tdm_512.py \\
        --workdir runs/fd_tdm --config.model.init=pretrained --config.model.base=SD15_DIR \\
        --config.data.root=ffhq_wild_files

`model.init=pretrained` starts from SD1.5's weights (SD15_DIR, the diffusers folder), as the
released recipe; a converted TDM folder (`TDM_flax`) fine-tunes the release.

Hardware: official 4 GPUs x batch 4 (bf16, 150k steps). Trained: the UNet only; loss = epsilon
MSE with 10 % empty captions. Time: days for the full run (not measured).
"""

from leffa_jax.configs.face_diffuser_common import base_config


def get_config():
    c = base_config("face_diffuser_tdm")
    c.train.steps = 150_000
    c.train.batch_size = 16
    c.train.dtype = "bfloat16"
    c.data.name = "fastcomposer"
    c.data.resolution = 512
    c.data.object_augmentation = False   # the TDM reads no subject crops
    c.checkpoint.every = 5000
    c.log.every = 50
    c.log.image_every = 0
    return c
