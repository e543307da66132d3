"""Defaults shared by the Face-diffuser training configs (tasks `face_diffuser_sdm` and
`face_diffuser_tdm`, leffa_jax/systems/face_diffuser_train.py): the generic loop's settings plus
the model, loss and data sections, with the released recipe's values (run_train.sh)."""

import ml_collections

from leffa_jax.data.fastcomposer import default_config as data_config
from leffa_jax.training.config import base_config as loop_config


def base_config(task: str = "face_diffuser_sdm") -> ml_collections.ConfigDict:
    c = loop_config()
    c.task = task
    c.model = ml_collections.ConfigDict()
    c.model.base = ""                 # SD1.5 diffusers folder (configs, tokenizer, scheduler);
    #                                   "" = the tiny random model of the shared fixtures
    c.model.clip = ""                 # CLIP ViT-L/14 transformers folder (CLIPModel or its
    #                                   vision model); "" = the built-in ViT-L/14 config
    c.model.init = "random"           # random | pretrained (SD1.5 base + CLIP weights, fresh
    #                                   postfuse) | a converted SDM/TDM folder | an official .bin
    c.model.attention_kernel = "xla"  # xla | dot_product | cudnn

    c.face_diffuser = ml_collections.ConfigDict()
    c.face_diffuser.localization_weight = 1e-3   # --object_localization_weight (run_train.sh)
    c.face_diffuser.localization_layers = 5
    c.face_diffuser.object_localization = True
    c.face_diffuser.mask_loss = True
    c.face_diffuser.mask_loss_prob = 0.5
    c.face_diffuser.vision_trainable_layers = 2  # --image_encoder_trainable_layers

    c.train.lr = 1e-5                 # constant (no warm-up), AdamW (0.9, 0.999), wd 1e-2
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.0           # EMA off in the official runs
    c.train.export_ema = False
    c.data = data_config()
    c.data.batch_size = c.train.get_ref("batch_size")
    return c
