"""Defaults shared by every Leffa training config (the paper's
recipe): the generic loop's settings (`leffa_jax.training.config`) plus Leffa's model, loss
and data sections."""

import ml_collections

from leffa_jax.data.config import default_data_config
from leffa_jax.training.config import base_config as loop_config


def base_config() -> ml_collections.ConfigDict:
    c = loop_config()
    c.task = "leffa"                  # leffa_jax.systems.TASKS
    c.model = ml_collections.ConfigDict()
    c.model.base = "tiny"            # config folder of the base model (unet/ vae/ scheduler/)
    c.model.init = "random"          # random | sd_inpainting:DIR | leffa:PATH
    c.model.attention_kernel = "xla"  # xla | dot_product | cudnn
    c.model.scheduler_overrides = ml_collections.ConfigDict()

    c.train.ref_drop_prob = 0.1       # zero the reference latent (for guidance)

    c.leffa = ml_collections.ConfigDict()
    c.leffa.enabled = False
    c.leffa.lam = 1e-3
    c.leffa.tau = 2.0
    c.leffa.t_threshold = 500
    c.leffa.min_ratio = 1 / 32
    c.leffa.kind = "l2"               # l2 (paper) | smooth_l1 (early draft)
    c.leffa.fused = True              # flash-style flow, never materialises N x N
    c.leffa.chunk_size = 0            # 0: automatic
    c.leffa.layers = ()               # explicit layer indices (empty: by min_ratio)

    c.data = default_data_config()
    c.data.batch_size = c.train.get_ref("batch_size")
    return c
