"""DressCode reader (1024x768), as users have it on disk::

    ROOT/{upper_body,lower_body,dresses}/
        images/013563_0.jpg          person          images/013563_1.jpg   in-shop garment
        label_maps/013563_4.png      ATR-schema parse map
        keypoints/013563_2.json      {"keypoints": [[x, y, score, id] x 18]} in 384x512 pixels
        dense/013563_5.png           DensePose part index I (0..24), (dense/013563_5_uv.npz unused)
        train_pairs.txt, test_pairs_paired.txt, test_pairs_unpaired.txt   "person garment"
        flow_gt/013563_0.npy         (synthetic sets only)

category "all" concatenates the three categories (in that order). Densepose follows the official
DressCode model's input: the part-index map repeated over 3 channels, then normalised as an image.
"""

from __future__ import annotations

from etils import epath

from leffa_jax.data import common

CATEGORIES = ("upper_body", "lower_body", "dresses")


class DressCodeSource(common.PairSource):
    kind = "dresscode"

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
            raise ValueError(f"DressCode split must be 'train' or 'test', got {split!r}")
        if mode not in ("paired", "unpaired"):
            raise ValueError(f"mode must be 'paired' or 'unpaired', got {mode!r}")
        cats = CATEGORIES if category == "all" else (category,)
        for c in cats:
            if c not in CATEGORIES:
                raise ValueError(
                    f"DressCode category must be one of {CATEGORIES} or 'all', got {c!r}"
                )
        self.root = epath.Path(root)
        self.split, self.mode = split, mode
        self.pair_files = {}
        self.has_flow = {}
        for c in cats:
            d = self.root / c
            if not d.exists():
                raise common.DataError(f"DressCode category folder missing: {d} (data.root={root})")
            fname = "train_pairs.txt" if split == "train" else f"test_pairs_{mode}.txt"
            pf = d / fname
            self.pair_files[c] = pf
            self.has_flow[c] = (
                load_flow_gt == "auto"
                and (split == "train" or mode == "paired")
                and (d / "flow_gt").exists()
            )
            for p, g in common.read_pair_list(pf):
                self.pairs.append((c, p, g))
        if len(set(self.has_flow.values())) > 1:
            raise common.DataError(
                f"flow_gt/ present in some DressCode categories only ({self.has_flow}); "
                "set data.load_flow_gt='never' or add it everywhere"
            )

    def files(self, index: int) -> dict[str, str]:
        c, person, cloth = self.pairs[index]
        pid = person.rsplit("_", 1)[0]
        d = self.root / c
        f = {
            "person": d / "images" / person,
            "garment": d / "images" / cloth,
            "densepose": d / "dense" / f"{pid}_5.png",
            "parse": d / "label_maps" / f"{pid}_4.png",
            "keypoints": d / "keypoints" / f"{pid}_2.json",
        }
        if self.has_flow[c]:
            f["flow_gt"] = d / "flow_gt" / f"{person.rsplit('.', 1)[0]}.npy"
        return {k: str(v) for k, v in f.items()}

    def _read(self, index: int):
        files = self.files(index)
        c, person, _ = self.pairs[index]
        where = f"pair {index} of {self.pair_files[c]}"
        blobs = {
            k: common.read_bytes(epath.Path(p), k, where)
            for k, p in files.items()
            if k != "keypoints"
        }
        kp = common.parse_dresscode_json(
            common.read_bytes(epath.Path(files["keypoints"]), "keypoints", where),
            files["keypoints"],
        )
        return common.make_record(
            kind=self.kind,
            category=c,
            name=person,
            pair_index=index,
            files=files,
            keypoints=kp,
            keypoints_frame=(384.0, 512.0),
            **blobs,
        )
