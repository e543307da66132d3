"""DeepFashion In-shop pose-transfer reader, in the PIDM / CFLD layout::

    ROOT/train_highres/*.jpg, ROOT/test_highres/*.jpg   images (CFLD's generate_fashion_datasets.py;
                                                        ROOT/train/, ROOT/test/ also accepted)
    ROOT/fasion-resize-pairs-{train,test}.csv           "from,to" columns (the DPTN/PATN files;
                                                        the "fashion-" spelling is accepted too)
    ROOT/densepose/<image stem>.png                     DensePose IUV per image, as written by
                                                        cv2.imwrite of an (I, U, V) array: read as
                                                        RGB it is (V, U, I), U/V in 0..255, I 0..24
    ROOT/flow_gt/<from stem>__<to stem>.npy             (synthetic sets only)

person = the "to" image (target), garment = the "from" image (source person); the mask is all
ones; densepose is the target's IUV normalised ch0,1 /255, ch2 /24, then *2-1.
"""

from __future__ import annotations

import csv
import io

from etils import epath

from leffa_jax.data import common


def _pair_csv(root: epath.Path, split: str) -> epath.Path:
    for spelling in ("fasion", "fashion"):
        p = root / f"{spelling}-resize-pairs-{split}.csv"
        if p.exists():
            return p
    raise common.DataError(
        f"pair list not found: {root}/fasion-resize-pairs-{split}.csv (or fashion-...). "
        "Download the train/test pairs (DPTN/CFLD) into data.root."
    )


class DeepFashionSource(common.PairSource):
    kind = "deepfashion"

    def __init__(
        self,
        root,
        split: str = "train",
        mode: str = "paired",
        *,
        category: str = "",
        on_bad_sample: str = "error",
        load_flow_gt: str = "auto",
        densepose_dir: str = "densepose",
    ):
        super().__init__(on_bad_sample)
        if split not in ("train", "test"):
            raise ValueError(f"DeepFashion split must be 'train' or 'test', got {split!r}")
        self.root = epath.Path(root)
        self.split = split
        self.pair_file = _pair_csv(self.root, split)
        reader = csv.DictReader(io.StringIO(self.pair_file.read_text()))
        if not reader.fieldnames or not {"from", "to"} <= set(reader.fieldnames):
            raise common.DataError(f"{self.pair_file}: expected 'from' and 'to' columns")
        self.pairs = [(r["from"], r["to"]) for r in reader if r.get("from") and r.get("to")]
        if not self.pairs:
            raise common.DataError(f"pair list is empty: {self.pair_file}")
        for cand in (f"{split}_highres", split):
            if (self.root / cand).exists():
                self.image_dir = self.root / cand
                break
        else:
            raise common.DataError(
                f"image folder missing: {self.root}/{split}_highres (or {self.root}/{split})"
            )
        self.densepose_dir = self.root / densepose_dir
        self.has_flow = load_flow_gt == "auto" and (self.root / "flow_gt").exists()

    def files(self, index: int) -> dict[str, str]:
        src, tgt = self.pairs[index]
        s_stem, t_stem = src.rsplit(".", 1)[0], tgt.rsplit(".", 1)[0]
        f = {
            "person": self.image_dir / tgt,
            "garment": self.image_dir / src,
            "densepose": self.densepose_dir / f"{t_stem}.png",
        }
        if self.has_flow:
            f["flow_gt"] = self.root / "flow_gt" / f"{s_stem}__{t_stem}.npy"
        return {k: str(v) for k, v in f.items()}

    def _read(self, index: int):
        files = self.files(index)
        where = f"pair {index} of {self.pair_file}"
        blobs = {k: common.read_bytes(epath.Path(p), k, where) for k, p in files.items()}
        return common.make_record(
            kind=self.kind,
            category="",
            name=self.pairs[index][1],
            pair_index=index,
            files=files,
            **blobs,
        )
