"""Store a finished tiny Magic Clothing run as the shipped baseline that the tiny config
fine-tunes from (`leffa_jax/assets/tiny_magic_clothing`): its denoiser and garment extractor as
flat diffusers UNet files in float16, and `provenance.json` saying how they were made.

    python -m leffa_jax.train --config leffa_jax/configs/magic_clothing_tiny.py:scratch \\
        --workdir /tmp/mc_6k               # 6000 steps from scratch: 23 min, quiet 2-core VM
    python tools/magic_clothing_garment_use.py /tmp/mc_6k       # check it reads the garment
    python tools/make_tiny_magic_clothing_baseline.py /tmp/mc_6k "how it was made"

WORKDIR: the run (its export/base/unet/ and export/garment_extractor.safetensors). The folder is
built beside the asset and renamed over it, so a failure leaves the old one.
"""

import json
import os
import shutil
import sys

import numpy as np

from leffa_jax.systems.magic_clothing_train import (
    BASELINE_DENOISER,
    BASELINE_DIR,
    BASELINE_EXTRACTOR,
    EXPORT_BASE,
    EXPORT_FILE,
)
from leffa_jax.weights.plans import find_weights
from leffa_jax.weights.tensor_io import TensorSource, write_safetensors


def float16_copy(src: str, dst: str, provenance: str) -> int:
    source = TensorSource(src)
    items = []
    for key in sorted(source.keys()):
        value = np.asarray(source[key]).astype(np.float16)
        if not np.all(np.isfinite(value)):
            raise SystemExit(f"{src}: {key} does not fit float16 (overflows to inf)")
        items.append((key, value))
    write_safetensors(dst, items, metadata={"provenance": provenance})
    return len(items)


def main(work: str, provenance: str, out_dir: str = BASELINE_DIR) -> None:
    export = os.path.join(work, "export")
    denoiser_dir = os.path.join(export, EXPORT_BASE, "unet")
    extractor = os.path.join(export, EXPORT_FILE)
    if not (os.path.isdir(denoiser_dir) and os.path.isfile(extractor)):
        raise SystemExit(f"{work}: no export/{EXPORT_FILE} and export/{EXPORT_BASE}/unet/: give "
                         "a finished run of the tiny config that trained its denoiser "
                         "(model.train_denoiser, as magic_clothing_tiny.py:scratch)")
    with open(os.path.join(work, "config.json")) as f:
        data = json.load(f)["data"]
    staging = out_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        n = float16_copy(find_weights(denoiser_dir), os.path.join(staging, BASELINE_DENOISER),
                         provenance)
        m = float16_copy(extractor, os.path.join(staging, BASELINE_EXTRACTOR), provenance)
        with open(os.path.join(staging, "provenance.json"), "w") as f:
            json.dump({"stored_dtype": "float16", "resolution": [data["height"], data["width"]],
                       "provenance": provenance,
                       "files": {BASELINE_DENOISER: f"the denoiser ({n} tensors)",
                                 BASELINE_EXTRACTOR: f"the garment extractor ({m} tensors)"}},
                      f, indent=2)
            f.write("\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never left inside the package's assets
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(staging, out_dir)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
