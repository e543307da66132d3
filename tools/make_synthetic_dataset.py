"""Write a synthetic VITON-HD-, DressCode- or DeepFashion-layout dataset with exact flow_gt.

    python tools/make_synthetic_dataset.py --layout viton_hd --out /tmp/syn_vhd \
        --num_train 16 --num_test 8 --height 128 --width 96 --seed 0

See leffa_jax/data/synthetic.py for the figures, the warp and the flow_gt convention.
"""

from __future__ import annotations

import argparse
import time

from leffa_jax.data import synthetic


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layout", choices=synthetic.LAYOUTS, default="viton_hd")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--num_train", type=int, default=16)
    p.add_argument("--num_test", type=int, default=8)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_agnostic_mask", action="store_true", help="VITON-HD: omit agnostic-mask/")
    a = p.parse_args(argv)
    t = time.perf_counter()
    root = synthetic.make_synthetic_dataset(
        a.out,
        a.layout,
        num_train=a.num_train,
        num_test=a.num_test,
        height=a.height,
        width=a.width,
        seed=a.seed,
        agnostic_mask=not a.no_agnostic_mask,
    )
    print(
        f"wrote {a.layout} layout ({a.num_train} train + {a.num_test} test) to {root} "
        f"in {time.perf_counter() - t:.2f}s"
    )


if __name__ == "__main__":
    main()
