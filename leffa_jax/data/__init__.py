"""Input data for Leffa: dataset readers, agnostic masks, transforms and the Grain pipeline.

Main entry points:
    default_data_config()                      leffa_jax.data.config
    make_dataset(config, split, *, process_index, process_count) -> LeffaDataset
    shard_batch(batch, mesh, partition_spec=None) -> dict of global jax.Arrays
    agnostic_mask_hd / agnostic_mask_dc          leffa_jax.data.masks
    make_synthetic_dataset(root, layout, ...)    leffa_jax.data.synthetic
See docs/data.md.
"""

from leffa_jax.data.common import DataError
from leffa_jax.data.config import default_data_config
from leffa_jax.data.masks import agnostic_mask, agnostic_mask_dc, agnostic_mask_hd, garment_region
from leffa_jax.data.pipeline import (
    LeffaDataset,
    LeffaIterator,
    make_dataset,
    make_source,
    shard_batch,
)
from leffa_jax.data.synthetic import make_synthetic_dataset

__all__ = [
    "DataError",
    "LeffaDataset",
    "LeffaIterator",
    "agnostic_mask",
    "agnostic_mask_dc",
    "agnostic_mask_hd",
    "default_data_config",
    "garment_region",
    "make_dataset",
    "make_source",
    "make_synthetic_dataset",
    "shard_batch",
]
