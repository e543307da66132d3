"""Defaults shared by every training config (the paper's recipe, LEFFA_REFERENCE.md section 5)."""

import ml_collections

from leffa_jax.data.config import default_data_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.base = "tiny"            # config folder of the base model (unet/ vae/ scheduler/)
    c.model.init = "random"          # random | sd_inpainting:DIR | leffa:PATH
    c.model.attention_kernel = "xla"  # xla | dot_product | cudnn
    c.model.scheduler_overrides = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000
    c.train.batch_size = 256          # global; must equal data.batch_size
    c.train.lr = 1e-5
    c.train.warmup_steps = 0          # constant LR as in the paper
    c.train.b1, c.train.b2, c.train.eps = 0.9, 0.999, 1e-8
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = False
    c.train.export_ema = True
    c.train.dtype = "bfloat16"        # compute dtype; parameters stay float32
    c.train.remat = True              # gradient checkpointing of resnets/attention/FF
    c.train.grad_accum = 1            # micro-batches per optimizer step
    c.train.ref_drop_prob = 0.1       # zero the reference latent (for guidance)
    c.train.seed = 0

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

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1})
    c.sharding_rules = ()             # ((regex, spec), ...); () -> sharding.DEFAULT_RULES
    c.sharding_min_size = 2 ** 14     # smaller tensors stay replicated
    c.checkpoint = ml_collections.ConfigDict({"every": 1000, "keep": 3, "use_async": True})
    c.log = ml_collections.ConfigDict({"every": 50, "image_every": 1000, "sample_steps": 20,
                                       "progress_bar": True, "print_every_log": False})
    c.data = default_data_config()
    c.data.batch_size = c.train.get_ref("batch_size")
    return c
