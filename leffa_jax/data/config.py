"""Data configuration (ml_collections). Every field of the input pipeline is documented here."""

from __future__ import annotations

import ml_collections

DATASETS = ("viton_hd", "dresscode", "deepfashion")
SYNTHETIC = {
    "synthetic": "viton_hd",
    "synthetic_viton_hd": "viton_hd",
    "synthetic_dresscode": "dresscode",
    "synthetic_deepfashion": "deepfashion",
}


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with defaults. Fields:

    name: "viton_hd" | "dresscode" | "deepfashion" (folder layouts as downloaded), or
        "synthetic" / "synthetic_viton_hd" / "synthetic_dresscode" / "synthetic_deepfashion"
        (same layouts written by ``tools/make_synthetic_dataset.py``; when ``root`` is empty or
        absent the set is generated there, or in a temp folder, from ``synthetic.seed``).
    root: the dataset folder (local or any etils.epath path, e.g. gs://...). Ignored when
        ``tfds_dir`` is set.
    tfds_dir: a TFDS data_dir holding the ArrayRecord form built by ``tools/build_tfds.py``;
        when set the pipeline reads ``tfds.data_source`` instead of the folders.
    split: "train" | "test".
    mode: "paired" | "unpaired" (test splits of try-on sets; train is always paired).
    height, width: output size (H x W), e.g. 1024x768, 512x384, 512x352, 256x176.
    category: DressCode garment category "upper_body" | "lower_body" | "dresses" | "all";
        also the mask category for VITON-HD (default upper_body).
    mask_source: "auto" (the dataset's own agnostic mask when it ships one, else computed) |
        "compute" (always from parse map + keypoints) | "dataset" (error when absent).
    mask_protect_fixed: the corrected mask variant (fixed regions removed); off = official.
    pose_garment_mask: pose transfer's garment_mask: "ones" | "foreground" (DensePose I > 0).
    image_resample: "bicubic" | "bilinear" for images; masks, parse maps and densepose always
        use nearest.
    batch_size: the GLOBAL batch size; each process yields batch_size // process_count.
    drop_remainder: drop the last incomplete batch (default: True for train, False for test).
    shuffle: shuffle each epoch (default: True for train, False for test).
    num_epochs: None repeats forever (training); an int stops after that many epochs.
    num_workers: grain multiprocess workers (0 = in-process).
    prefetch_buffer_size: per-worker output buffer for mp_prefetch.
    read_threads: threads reading/decoding per process (grain ReadOptions.num_threads).
    flip_prob: probability of a horizontal flip applied to every modality together.
    seed: shuffle and flip seed (the same on every process).
    on_bad_sample: "error" (raise naming the file) | "skip" (drop and count the sample).
    load_flow_gt: "auto" (when the layout has flow_gt/) | "never".
    synthetic: options of the generated set (num_train, num_test, height, width, seed).
    """
    c = ml_collections.ConfigDict()
    c.name = "viton_hd"
    c.root = ""
    c.tfds_dir = ""
    c.split = "train"
    c.mode = "paired"
    c.height = 1024
    c.width = 768
    c.category = "upper_body"
    c.mask_source = "auto"
    c.mask_protect_fixed = False
    c.pose_garment_mask = "ones"
    c.image_resample = "bicubic"
    c.batch_size = 8
    c.drop_remainder = ml_collections.config_dict.placeholder(bool)
    c.shuffle = ml_collections.config_dict.placeholder(bool)
    c.num_epochs = ml_collections.config_dict.placeholder(int)
    c.num_workers = 0
    c.prefetch_buffer_size = 2
    c.read_threads = 4
    c.flip_prob = 0.5
    c.seed = 0
    c.on_bad_sample = "error"
    c.load_flow_gt = "auto"
    c.synthetic = ml_collections.ConfigDict(
        {"num_train": 16, "num_test": 8, "height": 128, "width": 96, "seed": 0}
    )
    return c


def dataset_kind(name: str) -> str:
    """Layout kind ("viton_hd" | "dresscode" | "deepfashion") of a config ``name``."""
    if name in DATASETS:
        return name
    if name in SYNTHETIC:
        return SYNTHETIC[name]
    raise ValueError(
        f"unknown dataset name {name!r}: use one of {DATASETS + tuple(SYNTHETIC)} (data.name)"
    )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field when a value is not allowed."""
    dataset_kind(config.name)
    choices = {
        "split": ("train", "test"),
        "mode": ("paired", "unpaired"),
        "category": ("upper_body", "lower_body", "dresses", "all"),
        "mask_source": ("auto", "compute", "dataset"),
        "pose_garment_mask": ("ones", "foreground"),
        "image_resample": ("bicubic", "bilinear"),
        "on_bad_sample": ("error", "skip"),
        "load_flow_gt": ("auto", "never"),
    }
    for field, allowed in choices.items():
        if config[field] not in allowed:
            raise ValueError(f"data.{field} must be one of {allowed}, got {config[field]!r}")
    if config.height <= 0 or config.width <= 0:
        raise ValueError(f"data.height/width must be positive, got {config.height}x{config.width}")
    if not 0.0 <= config.flip_prob <= 1.0:
        raise ValueError(f"data.flip_prob must be in [0, 1], got {config.flip_prob}")
    if config.batch_size <= 0:
        raise ValueError(f"data.batch_size must be positive, got {config.batch_size}")
