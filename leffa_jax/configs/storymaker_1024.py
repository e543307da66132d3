"""StoryMaker adapter training, the official recipe (train.sh of RedAIGC/StoryMaker @ a7ce766).

    python -m leffa_jax.train --config leffa_jax/configs/storymaker_1024.py --workdir DIR \
        --config.model.base=SDXL_DIR --config.model.image_encoder=CLIP_VIT_H_DIR \
        --config.data.root=CHARACTERS_DIR [--config.model.adapter=mask.bin]

SDXL_DIR: the diffusers SDXL base (train.sh: Unstable_Diffusers_V11; the demo's YamerMIX_v11);
CLIP_VIT_H_DIR: laion/CLIP-ViT-H-14-laion2B-s32B-b79K; CHARACTERS_DIR: the folder layout of
leffa_jax/data/characters.py (images, captions, per-character masks, ArcFace embeddings + kps).
`model.adapter`: start from a released mask.bin / a previous run's export (default: a fresh
adapter with the official init; the official run initialises the resamplers and LoRA from
IP-Adapter-FaceID-PlusV2 + IP-Adapter-Plus, which you can convert into an adapter file first).

Recipe (official): resolution 960 x 1286 -> here 1024 x 768 (H x W) crops, both multiples of 64,
time-id target (1286, 960); AdamW lr 1e-4, weight decay 0.01, constant LR, no EMA in the
official run (kept here at 0.9999 for the export; export_ema=False gives the raw params);
global batch 64 (8 GPUs x 1 x accumulation 8) -> batch 64 here (batches > 1 are a departure the
official code cannot run); ip_loss 0.1, mask_loss_weight 5, noise_offset 0.05, drop text / image /
both 0.2 / 0.05 / 0.05, LoRA rank 128, bf16 compute; 100k steps, a checkpoint every 1000.
Hardware: 8 x 80 GB GPUs (FSDP over the batch); about 2.6 B frozen UNet params + 0.83 B adapter
params. Expected: the diffusion loss near 0.1 after a few thousand steps and the attention term
falling from ~0.3; time ~3-4 s per step on 8 x H100 (not measured here).
"""

import ml_collections

from leffa_jax.training.config import base_config


def storymaker_config() -> ml_collections.ConfigDict:
    """The official StoryMaker recipe on the generic loop (see the module docstring)."""
    c = base_config()
    c.task = "storymaker"
    c.model = ml_collections.ConfigDict()
    c.model.base = ""                 # SDXL diffusers folder (or its leffa_jax conversion), "tiny"
    c.model.adapter = ""              # mask.bin / adapter .safetensors; "" = fresh (official init)
    c.model.image_encoder = ""        # CLIP ViT-H folder; "" = the base's image_encoder/
    c.model.adapter_config = ""       # storymaker_adapter.json for non-standard widths
    c.model.lora_rank = 128
    c.model.attention_kernel = "xla"  # xla | dot_product | cudnn
    c.model.cache_dir = ""            # tiny base / synthetic set; "" = ~/.cache/leffa_jax

    c.storymaker = ml_collections.ConfigDict()
    c.storymaker.ip_loss = 0.1        # weight of the attention-mask loss (--ip_loss); 0 = off
    c.storymaker.mask_loss_weight = 5.0
    c.storymaker.noise_offset = 0.05
    c.storymaker.attn_divisor = 60.0  # the official constant
    c.storymaker.drop_image = 0.05    # dataset dropout (mp_dataset.py L220-228)
    c.storymaker.drop_text = 0.2
    c.storymaker.drop_both = 0.05
    c.storymaker.drop_face_tokens = 0.1   # faceid_plus token-group drops (L99-103)
    c.storymaker.drop_clip_tokens = 0.1
    c.storymaker.ip_scale = 1.0       # --scale during training
    c.storymaker.chunk_size = 0       # query chunk of the attention-mass probe; 0 = automatic

    c.data = ml_collections.ConfigDict()
    c.data.root = ""
    c.data.num_characters = 2
    c.data.height, c.data.width = 1024, 768
    c.data.target_size = (1286, 960)  # time ids' target size, fixed as in the official script
    c.data.batch_size = 64
    c.data.seed = 0
    c.data.read_threads = 4           # threads preparing samples (two batches ahead)
    c.data.synthetic_images = 0       # > 0: write and use the synthetic two-character set
    c.data.synthetic_random_order = False  # its characters listed in a random order per image
    #                                        (else left, right)

    c.train.steps = 100_000
    c.train.batch_size = 64
    c.train.lr = 1e-4
    c.train.weight_decay = 1e-2
    c.train.grad_clip = 1e9           # official clipping sees 0 parameters: a no-op
    c.train.dtype = "bfloat16"
    c.train.remat = True
    c.checkpoint.every = 1000
    return c


def get_config():
    return storymaker_config()
