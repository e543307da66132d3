"""Grain input pipeline: source -> per-process shard -> shuffle/repeat -> decode+prepare -> flip ->
drop bad samples (counted) -> batch -> multiprocess workers; plus the hand-off to devices.

    ds = make_dataset(config, "train", process_index=jax.process_index(),
                      process_count=jax.process_count())
    it = iter(ds)
    batch = next(it)                      # dict of numpy arrays, leading axis = local batch
    state = it.get_state()                # JSON-able; it.set_state(state) continues exactly
    arrays = shard_batch(batch, mesh)     # global jax.Arrays sharded over ('data', 'fsdp')

Sharding: process p reads records p, p + P, p + 2P, ... of the source (disjoint, covering), then
shuffles its shard with the common seed (a new order each epoch). Each process yields
batch_size // process_count examples per step.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import grain
import ml_collections
import numpy as np
from etils import epath

from leffa_jax.data import common, transforms
from leffa_jax.data import config as config_lib
from leffa_jax.data.deepfashion import DeepFashionSource
from leffa_jax.data.dresscode import CATEGORIES as DRESSCODE_CATEGORIES
from leffa_jax.data.dresscode import DressCodeSource
from leffa_jax.data.viton_hd import VitonHDSource

log = logging.getLogger(__name__)

SKIPPED_KEY = "_num_skipped_before"
READERS = {
    "viton_hd": VitonHDSource,
    "dresscode": DressCodeSource,
    "deepfashion": DeepFashionSource,
}


# ----------------------------------------------------------------------------- sources
class ConcatSource:
    """Random access over several sources in order (DressCode category 'all' from TFDS).

    pair_index is offset so that it counts across the concatenation, as the folder reader does.
    """

    def __init__(self, sources):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        i = int(np.searchsorted(self.offsets, index, side="right") - 1)
        rec = self.sources[i][int(index - self.offsets[i])]
        if common.is_bad(rec):
            return rec
        rec = dict(rec)
        rec["pair_index"] = np.int64(rec["pair_index"]) + int(self.offsets[i])
        return rec


class SkipBadTFDSSource:
    """Wraps a tfds data source so read errors follow on_bad_sample."""

    def __init__(self, source, on_bad_sample: str, description: str):
        self.source = source
        self.on_bad_sample = on_bad_sample
        self.description = description

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:
            return self.source[int(index)]
        except Exception as e:
            msg = f"cannot read record {index} of {self.description}: {e}"
            if self.on_bad_sample == "skip":
                return common.bad_sample(msg)
            raise common.DataError(msg) from e


def _tfds_split(kind: str, split: str, mode: str) -> str:
    if kind == "deepfashion" or split == "train":
        return split
    return f"{split}_{mode}"


def _synthetic_root(config) -> str:
    """Generate the synthetic set (once) when its root is empty or missing; return the root."""
    from leffa_jax.data import synthetic

    kind = config_lib.dataset_kind(config.name)
    syn = config.synthetic
    root = config.root or os.path.join(
        tempfile.gettempdir(),
        f"leffa_synthetic_{kind}_{syn.height}x{syn.width}_{syn.num_train}_{syn.num_test}_s{syn.seed}",
    )
    marker = epath.Path(root) / ".complete"
    if not marker.exists():
        synthetic.make_synthetic_dataset(
            root,
            layout=kind,
            num_train=syn.num_train,
            num_test=syn.num_test,
            height=syn.height,
            width=syn.width,
            seed=syn.seed,
        )
    return root


def make_source(config: ml_collections.ConfigDict, split: str | None = None):
    """The random-access source of raw records for ``config`` (folders or TFDS ArrayRecord)."""
    config_lib.validate(config)
    split = split or config.split
    kind = config_lib.dataset_kind(config.name)
    if config.tfds_dir:
        import tensorflow_datasets as tfds

        from leffa_jax.data.tfds import builders

        tsplit = _tfds_split(kind, split, config.mode)
        if kind == "dresscode":
            cats = DRESSCODE_CATEGORIES if config.category == "all" else (config.category,)
            names = [f"{builders.NAMES[kind]}/{c}" for c in cats]
        else:
            names = [builders.NAMES[kind]]
        srcs = []
        for n in names:
            try:
                src = tfds.data_source(n, split=tsplit, data_dir=config.tfds_dir)
            except Exception as e:
                raise common.DataError(
                    f"cannot open TFDS dataset {n} split {tsplit} in {config.tfds_dir}: {e}. "
                    "Build it with tools/build_tfds.py."
                ) from e
            srcs.append(
                SkipBadTFDSSource(src, config.on_bad_sample, f"{n}[{tsplit}] in {config.tfds_dir}")
            )
        src = srcs[0] if len(srcs) == 1 else ConcatSource(srcs)
        if len(src) == 0:
            raise common.DataError(f"TFDS split {tsplit} of {names} in {config.tfds_dir} is empty")
        return src
    root = config.root
    if config.name.startswith("synthetic"):
        root = _synthetic_root(config)
    if not root:
        raise ValueError("data.root (or data.tfds_dir) must be set")
    kwargs = dict(on_bad_sample=config.on_bad_sample, load_flow_gt=config.load_flow_gt)
    if kind != "deepfashion":
        kwargs["category"] = config.category
    return READERS[kind](root, split, config.mode, **kwargs)


def source_has_flow(source, config) -> bool:
    """Whether the source's records carry flow_gt (folder readers know; TFDS is probed)."""
    if config.load_flow_gt == "never":
        return False
    if hasattr(source, "has_flow"):
        hf = source.has_flow
        return any(hf.values()) if isinstance(hf, dict) else bool(hf)
    for i in range(min(len(source), 4)):
        rec = source[i]
        if not common.is_bad(rec):
            return len(rec["flow_gt"]) > 0
    return False


# ----------------------------------------------------------------------------- bad samples
class _DropBadIterator(grain.DatasetIterator):
    """Drops bad-sample markers; each good element records how many were dropped before it."""

    def __init__(self, parent):
        super().__init__(parent)

    def __next__(self):
        skipped = 0
        while True:
            el = next(self._parent)
            if common.is_bad(el):
                skipped += 1
                continue
            el = dict(el)
            el[SKIPPED_KEY] = np.int32(skipped)
            return el

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class DropBadIterDataset(grain.IterDataset):
    def __init__(self, parent):
        super().__init__(parent)

    def __iter__(self):
        return _DropBadIterator(self._parent.__iter__())

    def __str__(self):
        return "DropBadIterDataset"


# ----------------------------------------------------------------------------- dataset
class LeffaIterator:
    """Iterator over batches; ``get_state``/``set_state`` checkpoint and restore it exactly."""

    def __init__(self, grain_iterator):
        self._it = grain_iterator
        self.num_bad_samples = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._it))
        self.num_bad_samples += int(np.sum(batch.pop(SKIPPED_KEY)))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), "num_bad_samples": self.num_bad_samples}

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state["grain"])
        self.num_bad_samples = int(state.get("num_bad_samples", 0))


class LeffaDataset:
    """Iterable of batches (dicts of numpy arrays) for one process. See module docstring."""

    def __init__(
        self,
        grain_dataset,
        *,
        source,
        num_records: int,
        local_batch_size: int,
        process_index: int,
        process_count: int,
        with_flow: bool,
    ):
        self.grain_dataset = grain_dataset
        self.source = source
        self.num_records = num_records
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.with_flow = with_flow

    def __iter__(self) -> LeffaIterator:
        return LeffaIterator(iter(self.grain_dataset))


def make_dataset(
    config: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source=None,
) -> LeffaDataset:
    """Build the per-process Grain pipeline described by ``config`` (see ``default_data_config``).

    process_index/process_count default to ``jax.process_index()/jax.process_count()``.
    """
    config_lib.validate(config)
    split = split or config.split
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if config.batch_size % process_count:
        raise ValueError(
            f"data.batch_size {config.batch_size} is not divisible by process_count {process_count}"
        )
    local_bs = config.batch_size // process_count
    train = split == "train"
    shuffle = train if config.shuffle is None else config.shuffle
    drop_remainder = train if config.drop_remainder is None else config.drop_remainder
    num_epochs = config.num_epochs if config.num_epochs is not None else (None if train else 1)

    if source is None:
        source = make_source(config, split)
    with_flow = source_has_flow(source, config) and not (
        split == "test" and config.mode == "unpaired"
    )
    settings = transforms.PrepareSettings(
        height=config.height,
        width=config.width,
        image_resample=config.image_resample,
        mask_source=config.mask_source,
        mask_protect_fixed=config.mask_protect_fixed,
        pose_garment_mask=config.pose_garment_mask,
        with_flow=with_flow,
        on_bad_sample=config.on_bad_sample,
    )
    ds = grain.MapDataset.source(source)
    ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise common.DataError(
            f"process {process_index} of {process_count} got no records ({len(source)} in total)"
        )
    if shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(transforms.PrepareExample(settings))
    if config.flip_prob > 0:
        ds = ds.random_map(
            transforms.RandomFlip(config.flip_prob), seed=config.seed + 7919 * process_index + 1
        )
    it = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=config.read_threads, prefetch_buffer_size=max(2 * local_bs, 8)
        )
    )
    it = DropBadIterDataset(it)
    it = it.batch(local_bs, drop_remainder=drop_remainder)
    if config.num_workers > 0:
        _ensure_absl_flags()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.prefetch_buffer_size
            )
        )
    return LeffaDataset(
        it,
        source=source,
        num_records=len(source),
        local_batch_size=local_bs,
        process_index=process_index,
        process_count=process_count,
        with_flow=with_flow,
    )


def _ensure_absl_flags() -> None:
    """grain's multiprocessing reads absl flags: mark them parsed outside absl.app.run."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------- devices
def batch_partition_spec(mesh, partition_spec=None):
    """PartitionSpec for the batch axis: the given one, else the mesh's ('data', 'fsdp') axes."""
    from jax.sharding import PartitionSpec as P

    if partition_spec is not None:
        return partition_spec
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    if not axes:
        return P()
    return P(axes if len(axes) > 1 else axes[0])


def shard_batch(batch: dict[str, np.ndarray], mesh, partition_spec=None) -> dict[str, Any]:
    """Put this process's batch on devices as global jax.Arrays with a NamedSharding.

    Each leaf's leading axis is the process-local batch; the global array has
    local_batch * process_count rows, sharded by ``partition_spec`` (default: the batch axis over
    the mesh's ('data', 'fsdp') axes, other axes replicated).
    """
    import jax
    from jax.sharding import NamedSharding

    spec = batch_partition_spec(mesh, partition_spec)
    sharding = NamedSharding(mesh, spec)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
