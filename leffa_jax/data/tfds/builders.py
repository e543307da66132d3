"""TFDS builders: VITON-HD, DressCode and DeepFashion (pose) as ArrayRecord raw records.

Each record is the folder readers' raw record (encoded image bytes, keypoints, names; see
``leffa_jax.data.common``), so ``tfds.data_source(...)`` feeds the same Grain pipeline as the
folders, without TensorFlow. Records keep the pair-list order (``disable_shuffling``), so record
i is pair i of the list.

Build (manual download; local or gs:// data_dir):
    python tools/build_tfds.py --dataset viton_hd --manual_dir /data/VITON-HD --data_dir gs://b/tfds
Read:
    config.tfds_dir = "gs://b/tfds"   (leffa_jax.data.pipeline.make_dataset)
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from leffa_jax.data.deepfashion import DeepFashionSource
from leffa_jax.data.dresscode import DressCodeSource
from leffa_jax.data.viton_hd import VitonHDSource

NAMES = {
    "viton_hd": "leffa_viton_hd",
    "dresscode": "leffa_dresscode",
    "deepfashion": "leffa_deepfashion",
}


def raw_features() -> tfds.features.FeaturesDict:
    def blob():
        return tfds.features.Tensor(shape=(), dtype=np.object_)

    return tfds.features.FeaturesDict(
        {
            "person": blob(),
            "garment": blob(),
            "densepose": blob(),
            "parse": blob(),
            "agnostic_mask": blob(),
            "flow_gt": blob(),
            "keypoints": tfds.features.Tensor(shape=(18, 2), dtype=np.float32),
            "keypoints_frame": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "kind": tfds.features.Text(),
            "category": tfds.features.Text(),
            "name": tfds.features.Text(),
            "files": tfds.features.Text(),
            "pair_index": np.int64,
        }
    )


def _examples(source):
    for i in range(len(source)):
        rec = source[i]
        yield i, rec


class _Base(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw records (encoded files + keypoints) for the Leffa pipeline."}
    DESCRIPTION = ""
    HOMEPAGE = ""
    # tfds derives checksum/metadata paths from the defining module through importlib_resources,
    # which is not installed (no TensorFlow stack); these builders download nothing.
    code_path = None

    def __init__(self, *, load_flow_gt: str = "auto", **kwargs):
        """load_flow_gt="never" leaves synthetic flow_gt out of the records (as real data)."""
        self._load_flow_gt = load_flow_gt
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION,
            features=raw_features(),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
        )

    def _manual_root(self, dl_manager):
        root = dl_manager.manual_dir
        if not root.exists():
            raise FileNotFoundError(
                f"manual_dir {root} does not exist.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        return root


class LeffaVitonHd(_Base):
    """VITON-HD (zalando-hd-resized) for Leffa try-on."""

    DESCRIPTION = "VITON-HD 1024x768 try-on pairs as raw records for leffa_jax."
    HOMEPAGE = "https://github.com/shadow2496/VITON-HD"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download VITON-HD (zalando-hd-resized.zip, from the VITON-HD authors' page) and unzip it; the
    folder must hold train_pairs.txt, test_pairs.txt and train/, test/ with image/, cloth/,
    image-parse-v3/, openpose_json/, image-densepose/ (and agnostic-mask/ if you have the newer
    release). Pass that folder as --manual_dir.
    """

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager)
        return {
            "train": _examples(
                VitonHDSource(root, "train", "paired", load_flow_gt=self._load_flow_gt)
            ),
            "test_paired": _examples(
                VitonHDSource(root, "test", "paired", load_flow_gt=self._load_flow_gt)
            ),
            "test_unpaired": _examples(VitonHDSource(root, "test", "unpaired")),
        }

    def _generate_examples(self, source):  # pragma: no cover - split generators yield directly
        yield from _examples(source)


class LeffaDresscode(_Base):
    """DressCode for Leffa try-on, one config per garment category."""

    DESCRIPTION = "DressCode 1024x768 try-on pairs as raw records for leffa_jax."
    HOMEPAGE = "https://github.com/aimagelab/dress-code"
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=c, description=f"DressCode {c}")
        for c in ("upper_body", "lower_body", "dresses")
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Request DressCode from its authors (form linked from the dress-code repository), unzip it;
    the folder must hold upper_body/, lower_body/, dresses/, each with images/, label_maps/,
    keypoints/, dense/ and train_pairs.txt, test_pairs_paired.txt, test_pairs_unpaired.txt. Pass
    that folder as --manual_dir.
    """

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager)
        c = self.builder_config.name
        return {
            "train": _examples(
                DressCodeSource(
                    root, "train", "paired", category=c, load_flow_gt=self._load_flow_gt
                )
            ),
            "test_paired": _examples(
                DressCodeSource(root, "test", "paired", category=c, load_flow_gt=self._load_flow_gt)
            ),
            "test_unpaired": _examples(
                DressCodeSource(
                    root, "test", "unpaired", category=c, load_flow_gt=self._load_flow_gt
                )
            ),
        }

    def _generate_examples(self, source):  # pragma: no cover
        yield from _examples(source)


class LeffaDeepfashion(_Base):
    """DeepFashion In-shop pose transfer (PIDM / CFLD pairs) with DensePose IUV."""

    DESCRIPTION = "DeepFashion In-shop pose-transfer pairs as raw records for leffa_jax."
    HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download Img/img_highres.zip of the DeepFashion In-shop Clothes Retrieval Benchmark (password
    from the authors) and the train/test pairs (fasion-resize-pairs-{train,test}.csv, train.lst,
    test.lst from DPTN/CFLD); arrange train_highres/ and test_highres/ with CFLD's
    generate_fashion_datasets.py; run DensePose on every image and save the IUV as
    densepose/<image stem>.png (cv2.imwrite of the (I, U, V) array). Pass that folder as
    --manual_dir.
    """

    def _split_generators(self, dl_manager):
        root = self._manual_root(dl_manager)
        return {
            "train": _examples(DeepFashionSource(root, "train", load_flow_gt=self._load_flow_gt)),
            "test": _examples(DeepFashionSource(root, "test", load_flow_gt=self._load_flow_gt)),
        }

    def _generate_examples(self, source):  # pragma: no cover
        yield from _examples(source)


BUILDERS = {"viton_hd": LeffaVitonHd, "dresscode": LeffaDresscode, "deepfashion": LeffaDeepfashion}


def build(
    dataset: str, manual_dir, data_dir, *, configs=None, load_flow_gt: str = "auto"
) -> list[str]:
    """Build the ArrayRecord form of ``dataset`` from ``manual_dir`` into ``data_dir``.

    Returns the built dataset names (``name/config`` for DressCode).
    """
    cls = BUILDERS[dataset]
    names = []
    cfgs = configs or ([c.name for c in cls.BUILDER_CONFIGS] if cls.BUILDER_CONFIGS else [None])
    for cfg in cfgs:
        kwargs = {
            "data_dir": str(data_dir),
            "file_format": "array_record",
            "load_flow_gt": load_flow_gt,
        }
        if cfg is not None:
            kwargs["config"] = cfg
        builder = cls(**kwargs)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        )
        names.append(NAMES[dataset] + (f"/{cfg}" if cfg else ""))
    return names
