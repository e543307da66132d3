"""VITON-HD reader (the ``zalando-hd-resized`` release, 1024x768), as users have it on disk::

    ROOT/train_pairs.txt, ROOT/test_pairs.txt      "person.jpg cloth.jpg" per line
    ROOT/{train,test}/image/00000_00.jpg           person
                      cloth/00000_00.jpg           flat garment
                      cloth-mask/00000_00.jpg      (not needed)
                      image-parse-v3/00000_00.png  LIP-schema parse (palette PNG)
                      openpose_json/00000_00_keypoints.json   BODY_25 in image pixels
                      image-densepose/00000_00.jpg DensePose segmentation rendered as RGB
                      agnostic-mask/00000_00_mask.png         (newer releases; used when present)
                      flow_gt/00000_00.npy          (synthetic sets only)

Paired mode uses the person's own garment (same file name); unpaired uses the listed garment.
"""

from __future__ import annotations

from etils import epath

from leffa_jax.data import common


class VitonHDSource(common.PairSource):
    kind = "viton_hd"

    def __init__(
        self,
        root,
        split: str = "train",
        mode: str = "paired",
        *,
        category: str = "upper_body",
        on_bad_sample: str = "error",
        load_flow_gt: str = "auto",
    ):
        super().__init__(on_bad_sample)
        if split not in ("train", "test"):
            raise ValueError(f"VITON-HD split must be 'train' or 'test', got {split!r}")
        if mode not in ("paired", "unpaired"):
            raise ValueError(f"mode must be 'paired' or 'unpaired', got {mode!r}")
        self.root = epath.Path(root)
        self.split, self.mode = split, mode
        self.category = "upper_body" if category == "all" else category
        self.pair_file = self.root / f"{split}_pairs.txt"
        rows = common.read_pair_list(self.pair_file)
        self.pairs = [(p, p if mode == "paired" else g) for p, g in rows]
        self.dir = self.root / split
        if not self.dir.exists():
            raise common.DataError(f"VITON-HD split folder missing: {self.dir} (data.root={root})")
        self.has_agnostic = (self.dir / "agnostic-mask").exists()
        self.has_flow = (
            load_flow_gt == "auto" and mode == "paired" and (self.dir / "flow_gt").exists()
        )

    def files(self, index: int) -> dict[str, str]:
        person, cloth = self.pairs[index]
        stem = person.rsplit(".", 1)[0]
        d = self.dir
        f = {
            "person": d / "image" / person,
            "garment": d / "cloth" / cloth,
            "densepose": d / "image-densepose" / person,
            "parse": d / "image-parse-v3" / f"{stem}.png",
            "keypoints": d / "openpose_json" / f"{stem}_keypoints.json",
        }
        if self.has_agnostic:
            f["agnostic_mask"] = d / "agnostic-mask" / f"{stem}_mask.png"
        if self.has_flow:
            f["flow_gt"] = d / "flow_gt" / f"{stem}.npy"
        return {k: str(v) for k, v in f.items()}

    def _read(self, index: int):
        files = self.files(index)
        where = f"pair {index} of {self.pair_file}"
        blobs = {
            k: common.read_bytes(epath.Path(p), k, where)
            for k, p in files.items()
            if k != "keypoints"
        }
        kp_path = files["keypoints"]
        kp = common.parse_openpose_json(
            common.read_bytes(epath.Path(kp_path), "keypoints", where), kp_path
        )
        return common.make_record(
            kind=self.kind,
            category=self.category,
            name=self.pairs[index][0],
            pair_index=index,
            files=files,
            keypoints=kp,
            keypoints_frame=(0.0, 0.0),
            **blobs,
        )
