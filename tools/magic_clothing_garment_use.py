"""Does a trained tiny Magic Clothing model use the garment? The epsilon MSE of its denoiser on
the unseen test pairs (in the person's garment region, and over the whole latent) with the right
garment, another pair's garment (the batch rolled by one) and zero garment features, at a few
timesteps and noise draws: the computation of `MagicClothingTask.loss` with the garment swapped.

    python tools/magic_clothing_garment_use.py WORKDIR

WORKDIR: a finished run of leffa_jax/configs/magic_clothing_tiny.py (its export/base/ and
export/garment_extractor.safetensors). A model that reads the garment has a lower error with the
right one; results for the shipped config are in docs/magic_clothing.md. About a minute on CPU.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from leffa_jax import schedulers
from leffa_jax.configs import magic_clothing_tiny
from leffa_jax.systems import make_task


def main(work: str, timesteps=(250, 500, 750, 900), draws: int = 4) -> None:
    c = magic_clothing_tiny.get_config()
    c.model.base = os.path.join(work, "export", "base")
    c.model.init = "extractor:" + os.path.join(work, "export", "garment_extractor.safetensors")
    task = make_task(c)
    task.validate()
    model = task.init_model()
    task.prepare(model)
    batch = {k: jnp.asarray(v) for k, v in next(iter(task.dataset("test"))).items()}
    vae, sf = model.vae, model.vae.config.scaling_factor
    z = vae.encode(batch["person"]).mean * sf
    z_g = vae.encode(batch["garment"] * batch["garment_cloth_mask"]).mean * sf
    b = z.shape[0]
    text = model.text_encoder(batch["input_ids"]).last_hidden_state
    null = model.text_encoder(jnp.broadcast_to(task.null_ids, batch["input_ids"].shape)
                              ).last_hidden_state
    mask = jax.image.resize(batch["garment_mask"], (b, *z.shape[1:3], 1), "linear")

    @jax.jit
    def eps(z_t, t, z_garment, keep):
        feats = model.extractor(z_garment, jnp.zeros((), jnp.int32), null,
                                collect_features=True).features
        return model.unet(z_t, t, text, reference_features=[f * keep for f in feats]).sample

    variants = {"right": (z_g, 1.0), "other": (jnp.roll(z_g, 1, axis=0), 1.0),
                "zero": (z_g, 0.0)}
    print("epsilon MSE in the garment region (whole latent): right / other garment / none")
    for t_val in timesteps:
        rows = {k: [] for k in variants}
        for seed in range(draws):
            noise = jax.random.normal(jax.random.key(seed), z.shape)
            t = jnp.full((b,), t_val, jnp.int32)
            z_t = schedulers.add_noise(task.schedule, z, noise, t)
            for name, (zg, keep) in variants.items():
                err = (eps(z_t, t, zg, jnp.float32(keep)) - noise) ** 2
                rows[name].append((float(jnp.sum(err * mask) / (jnp.sum(mask) * err.shape[-1])),
                                   float(jnp.mean(err))))
        print(f"t={t_val:4d}  " + "  ".join(
            f"{k}: {np.mean([r[0] for r in v]):.4f} ({np.mean([r[1] for r in v]):.4f})"
            for k, v in rows.items()), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
