"""Build the ArrayRecord (TFDS) form of VITON-HD, DressCode or DeepFashion from the folders.

    python tools/build_tfds.py --dataset viton_hd --manual_dir /data/VITON-HD --data_dir /data/tfds
    python tools/build_tfds.py --dataset dresscode --manual_dir /data/DressCode \
        --data_dir gs://my-bucket/tfds --configs upper_body,dresses

Then set data.tfds_dir to --data_dir. See docs/data.md for the manual-download instructions.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=("viton_hd", "dresscode", "deepfashion"), required=True)
    p.add_argument("--manual_dir", required=True, help="the dataset folder as downloaded")
    p.add_argument("--data_dir", required=True, help="TFDS data_dir to write (local or gs://...)")
    p.add_argument(
        "--configs", default="", help="DressCode categories, comma separated (default all)"
    )
    p.add_argument("--no_flow_gt", action="store_true", help="leave synthetic flow_gt/ out")
    a = p.parse_args(argv)
    from leffa_jax.data.tfds import builders

    t = time.perf_counter()
    names = builders.build(
        a.dataset, a.manual_dir, a.data_dir, configs=[c for c in a.configs.split(",") if c] or None
    )
    print(f"built {', '.join(names)} in {a.data_dir} ({time.perf_counter() - t:.1f}s)")


if __name__ == "__main__":
    main()
