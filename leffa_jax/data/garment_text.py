"""Garment + caption batches for Magic Clothing training, on the try-on readers.

The VITON-HD / DressCode / synthetic folder readers and their Grain pipeline
(`data/pipeline.py`) give person, garment (the flat garment photo at the training size),
mask, densepose and the person's garment region (`garment_mask`). This wrapper adds per example:

    garment_cloth_mask (H, W, 1) float32 {0, 1}: the flat garment's mask: VITON-HD's
        `cloth-mask/<garment>` when the layout has it (NEAREST to the training size, > 127),
        else `magic_clothing.background_mask` of the garment (product photos on a plain
        background; DressCode ships no garment masks);
    input_ids (77,) int32: the CLIP tokens of the person image's caption, from a captions file
        (`read_captions`: JSON {image name: caption} or lines `name<TAB or ,>caption`), else the
        template caption.

Garment masks are read by file name, so horizontal flips are refused (data.flip_prob must be 0).
Iterator state (get_state / set_state) is the wrapped pipeline's: resumable.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

DEFAULT_TEMPLATE = "a photography of a model, best quality, high quality"


def read_captions(path: str) -> dict[str, str]:
    """{image file name: caption} from JSON ({name: caption} or [{"file_name", "text"}]),
    JSON lines, or text lines `name<TAB>caption` / `name,caption`. Errors name the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path} (set data.captions to a file "
                                "or '' for the template caption)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and set(data) == {"file_name", "text"}:
        data = [data]  # one JSON-lines row
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    rows = data if isinstance(data, list) else None
    out: dict[str, str] = {}
    if rows is None:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                rows.append(json.loads(line))
                continue
            sep = "\t" if "\t" in line else ","
            name, _, caption = line.partition(sep)
            if not caption.strip():
                raise ValueError(f"{path} line {n}: expected 'name<TAB>caption', got {line!r}")
            out[name.strip()] = caption.strip()
    for row in rows:
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise ValueError(f"{path}: JSON rows need 'file_name' and 'text', got {row!r}")
        out[str(row["file_name"])] = str(row["text"])
    return out


def _cloth_mask_path(garment_path: str) -> str | None:
    folder, name = os.path.split(garment_path)
    parent, leaf = os.path.split(folder)
    if leaf != "cloth":
        return None
    path = os.path.join(parent, "cloth-mask", name)
    return path if os.path.isfile(path) else None


def garment_cloth_mask(garment: np.ndarray, garment_path: str | None, hw) -> np.ndarray:
    """(H, W, 1) float32 {0, 1} mask of a batch garment in [-1, 1] (see the module docstring)."""
    from leffa_jax.systems.magic_clothing import background_mask

    path = _cloth_mask_path(garment_path) if garment_path else None
    if path is not None:
        with Image.open(path) as img:
            m = np.asarray(img.convert("L").resize((hw[1], hw[0]), Image.NEAREST)) > 127
    else:
        pixels = np.clip(np.round((garment + 1) * 127.5), 0, 255).astype(np.uint8)
        try:
            m = background_mask(pixels) > 0
        except ValueError:
            m = np.ones(hw, bool)
    return m[..., None].astype(np.float32)


class _Iterator:
    def __init__(self, parent, inner):
        self.parent, self.inner = parent, inner

    def __iter__(self):
        return self

    def __next__(self):
        return self.parent.add_fields(next(self.inner))

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


class GarmentTextDataset:
    """Iterable of batches: the try-on pipeline's + garment_cloth_mask + input_ids."""

    def __init__(self, dataset, tokenizer, captions: dict[str, str] | None = None,
                 template: str = DEFAULT_TEMPLATE):
        self.dataset, self.tokenizer = dataset, tokenizer
        self.captions, self.template = captions or {}, template
        self.missing_captions = 0

    def _files(self, index: int) -> dict[str, str]:
        source = self.dataset.source
        return source.files(index) if hasattr(source, "files") else {}

    def caption(self, files: dict[str, str]) -> str:
        name = os.path.basename(files.get("person", ""))
        if not self.captions:
            return self.template
        if name in self.captions:
            return self.captions[name]
        self.missing_captions += 1
        return self.template

    def add_fields(self, batch: dict) -> dict:
        batch = dict(batch)
        hw = batch["garment"].shape[1:3]
        files = [self._files(int(i)) for i in batch["index"]]
        batch["garment_cloth_mask"] = np.stack([
            garment_cloth_mask(g, f.get("garment"), hw)
            for g, f in zip(batch["garment"], files, strict=True)])
        captions = [self.caption(f) for f in files]
        batch["input_ids"] = self.tokenizer(captions)["input_ids"].astype(np.int32)
        return batch

    def __iter__(self):
        return _Iterator(self, iter(self.dataset))


def make_garment_text_dataset(data_config, tokenizer, split: str = "train"):
    """The Grain try-on pipeline of `data_config` wrapped as `GarmentTextDataset`
    (data.captions: a captions file or ''; data.caption_template)."""
    from leffa_jax.data import pipeline as data_pipeline

    captions = read_captions(data_config.captions) if data_config.get("captions") else None
    template = data_config.get("caption_template") or DEFAULT_TEMPLATE
    return GarmentTextDataset(data_pipeline.make_dataset(data_config, split), tokenizer,
                              captions, template)
