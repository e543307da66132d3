"""CLIP-I / CLIP-T over folders, for `python -m leffa_jax.evaluate --metrics clip_i,clip_t`.

A CLIP folder is a transformers `CLIPModel` folder as the hub ships it (e.g.
openai/clip-vit-large-patch14): config.json + model.safetensors / pytorch_model.bin
(`clip_score.load_clip`), preprocessor_config.json (`CLIPImageProcessorConfig`), and for CLIP-T
vocab.json + merges.txt + tokenizer_config.json (`CLIPTokenizer`). Images are read as transformers
reads them (RGB, alpha on white), preprocessed inside the jitted, device-sharded embedding step
(uint8 NHWC batches of one shape, `extract.Runner`); prompts are padded to the tokenizer's
model_max_length (one program). Only the (N, P) unit embeddings stay in memory.

CLIP-I = mean over pairs of cos(image_embeds(pred), image_embeds(gt)); CLIP-T = mean over
predictions of torchmetrics' CLIPScore, 100 * max(cos(image_embeds, text_embeds), 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from leffa_jax.metrics import clip_score, extract
from leffa_jax.nn.clip_preprocess import CLIPImageProcessorConfig, _as_rgb_uint8, clip_preprocess


class ClipModels:
    """Encoders, preprocessing and tokenizer of one CLIP folder; ValueError/FileNotFoundError
    name the missing file."""

    def __init__(self, folder: str, text: bool, shard: bool = True):
        from leffa_jax.text.tokenizer import CLIPTokenizer

        vision, text_model = clip_score.load_clip(folder)
        self.image_config = CLIPImageProcessorConfig.from_json(folder)
        cfg = self.image_config
        self.images = extract.Runner(
            vision, lambda m, x: clip_score.image_embeds(m, clip_preprocess(x, cfg)), shard)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder) if text else None
        self.texts = (extract.Runner(text_model, clip_score.text_embeds, shard) if text
                      else None)

    def image_embeddings(self, items: Sequence, load: Callable[..., np.ndarray],
                         batch_size: int, progress=None) -> np.ndarray:
        """(N, P) unit embeddings of `load(item)` (uint8 (H, W, 3)), batched by shape."""
        return extract.stream(items, load, self.images, batch_size, progress)

    def text_embeddings(self, captions: Sequence[str], batch_size: int) -> np.ndarray:
        """(N, P) unit embeddings of the captions (padded to model_max_length)."""
        out = []
        for i in range(0, len(captions), batch_size):
            tok = self.tokenizer(list(captions[i:i + batch_size]), padding="max_length")
            out.append(self.texts(tok["input_ids"].astype(np.int32),
                                  tok["attention_mask"].astype(np.int32)))
        return np.concatenate(out)


def load_image(path: str, resize: Callable | None = None) -> np.ndarray:
    """uint8 (H, W, 3) as transformers' CLIPImageProcessor converts a PIL image; `resize`
    (PIL -> PIL) applied first when given."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return _as_rgb_uint8(resize(img) if resize is not None else img)


def caption_for(captions: dict[str, str], pred: str, pred_root: str,
                gt: str | None = None) -> str | None:
    """A prediction's caption: keyed by its path relative to the prediction folder, its file
    name, or its name without extension; then (paired) its ground truth's file name or stem."""
    keys = [os.path.relpath(pred, pred_root), os.path.basename(pred),
            os.path.splitext(os.path.basename(pred))[0]]
    if gt is not None:
        keys += [os.path.basename(gt), os.path.splitext(os.path.basename(gt))[0]]
    for k in keys:
        if k in captions:
            return captions[k]
    return None


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit embeddings (N,)."""
    return np.sum(a.astype(np.float32) * b.astype(np.float32), -1)
