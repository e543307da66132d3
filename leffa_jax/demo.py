"""The README's main job on an embedded default (no downloads).

    python -m leffa_jax.demo [--workdir DIR]

Builds a random Leffa model in the OFFICIAL PyTorch checkpoint layout from the embedded tiny
config, converts it to a leffa_jax checkpoint and back (checking every tensor bit-exactly), loads
it with `LeffaModel.from_pretrained`, and runs the reference and generative UNets jitted.
When the sampling pipeline is present it also samples one image. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leffa_jax import convert
from leffa_jax.model import LeffaModel, random_official_checkpoint, tiny_config_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m leffa_jax.demo")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="leffa_demo_")
    os.makedirs(work, exist_ok=True)
    cfg = tiny_config_dir()

    t0 = time.time()
    official = random_official_checkpoint(cfg, os.path.join(work, "official_random.safetensors"))
    print(f"[1/4] wrote a random official-layout checkpoint: {official}")

    flax_dir = os.path.join(work, "leffa_flax")
    comps = convert.official_to_flax(official, cfg, flax_dir, ["safetensors", "orbax"])
    back = os.path.join(work, "roundtrip.safetensors")
    n = convert.flax_to_torch(flax_dir, back)
    a, b = convert.TensorSource(official), convert.TensorSource(back)
    same = sum(a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype for k in a.keys())
    summary = ", ".join(f"{c} in_channels={v['in_channels']}" for c, v in comps.items())
    print(f"[2/4] converted to Flax ({summary}) and back: {same}/{n} tensors bit-identical")
    if same != n:
        raise SystemExit("round trip was not bit-exact")

    model = LeffaModel.from_pretrained(flax_dir)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ref_latent, gen_input, t):
        m = nnx.merge(graphdef, state)
        feats = m.reference_features(ref_latent, t)
        return m.predict_noise(gen_input, t, feats), feats

    rng = np.random.default_rng(0)
    ref = jnp.asarray(rng.standard_normal((2, 16, 12, 4)), jnp.float32)
    gen = jnp.asarray(rng.standard_normal((2, 16, 12, 12)), jnp.float32)
    t1 = time.time()
    eps, feats = jax.block_until_ready(forward(state, ref, gen, jnp.array([999, 10])))
    t2 = time.time()
    jax.block_until_ready(forward(state, ref, gen, jnp.array([500, 20])))
    t3 = time.time()
    print(f"[3/4] reference UNet -> {len(feats)} features {[tuple(f.shape) for f in feats]}; "
          f"generative UNet -> eps {tuple(eps.shape)}, std {float(eps.std()):.3f}; "
          f"compile+run {t2 - t1:.1f} s, run {1e3 * (t3 - t2):.1f} ms")

    try:
        from leffa_jax import pipeline
    except ImportError:
        print("[4/4] sampling pipeline not available yet: skipped")
    else:
        img = rng.uniform(-1, 1, (1, 32, 24, 3)).astype(np.float32)
        mask = np.zeros((1, 32, 24, 1), np.float32)
        mask[:, 8:24, 6:18] = 1
        out = pipeline.generate(model, img, img[:, ::-1], mask, img, steps=3, guidance=2.5)
        print(f"[4/4] sampled {out.images.shape} uint8 images (3 DDPM steps, CFG 2.5)")
    print(f"done in {time.time() - t0:.1f} s; files in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
