"""Does a trained tiny Magic Clothing model use the garment? The epsilon MSE of its denoiser on
the unseen test pairs (in the person's garment region, and over the whole latent) with the right
garment, another pair's garment (the batch rolled by one) and zero garment features, at a few
timesteps and noise draws (`magic_clothing_train.garment_use`).

    python tools/magic_clothing_garment_use.py WORKDIR
    python tools/magic_clothing_garment_use.py        # the shipped baseline the demo starts from

WORKDIR: a finished run of leffa_jax/configs/magic_clothing_tiny.py (its export/base/ and
export/garment_extractor.safetensors). A model that reads the garment has a lower error with the
right one; results are in docs/magic_clothing.md. About 20 s on CPU.
"""

import sys

from leffa_jax.configs import magic_clothing_tiny
from leffa_jax.systems.magic_clothing_train import garment_use, print_garment_use, trained_task

if __name__ == "__main__":
    if len(sys.argv) > 2:
        raise SystemExit(__doc__)
    task, model = trained_task(magic_clothing_tiny.get_config(),
                               sys.argv[1] if len(sys.argv) == 2 else None)
    print_garment_use(garment_use(task, model, next(iter(task.dataset("test")))))
