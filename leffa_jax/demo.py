"""The README's main job on an embedded default (no downloads): a tiny Leffa that does try-on.

    python -m leffa_jax.demo [--workdir DIR] [--steps N] [--from-scratch]

As the paper trains Leffa (a try-on model first, then fine-tuned with the Leffa loss added):
1. generates the synthetic VITON-HD-layout set (`leffa_jax/data/synthetic.py`): garments are
   known smooth warps, so the true correspondence `flow_gt` is known, and for every unseen test
   pair (person, another person's garment) the exact result is drawn too
   (`test/image-unpaired/`);
2. starts from the shipped tiny try-on baseline (`leffa_jax/assets/tiny_tryon_baseline`, float16:
   its VAE and both UNets trained on this set without the Leffa loss, 10k steps, about 40
   minutes on 2 CPU cores); `--from-scratch` trains that baseline here instead (VAE stage,
   `systems/autoencoder.py`, then the baseline stage; the `autoencoder` and `baseline` sections
   of `leffa_jax/configs/synthetic_tiny.py`);
3. fine-tunes it twice, from the same weights and data: with the Leffa loss and without it (the
   ablation);
4. prints the flow endpoint error (pixels) of each model's attention against `flow_gt` on the
   unseen test pairs (best layer and mean over layers), with the baseline and the identity flow;
5. samples the unseen unpaired test pairs with each model and prints SSIM and PSNR of the result
   against the true try-on inside the garment region; writes the PNGs and `grid.png` (person |
   garment | mask | result with the Leffa loss | without | ground truth | the person with the
   garment warped by the attention flow of the best layer).
About 5 minutes on 2 idle CPU cores; what to expect is in docs/demo.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from leffa_jax.cli import positive_int

GRID_SCALE = 4  # the grid's panels are upscaled (nearest) so a 32x24 picture is visible
SAMPLE_STEPS = 20
BASELINE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                            "tiny_tryon_baseline")


def load_config():
    from leffa_jax.configs import synthetic_tiny

    return synthetic_tiny.get_config()


def test_batches(config, n_batches: int = 2, mode: str = "paired"):
    """Up to `n_batches` batches of 4 test examples (in file order) of the `mode` split."""
    from leffa_jax.data import pipeline

    c = config.data.copy_and_resolve_references()
    c.unlock()
    c.batch_size, c.flip_prob, c.mode = 4, 0.0, mode
    it = iter(pipeline.make_dataset(c, "test", process_index=0, process_count=1))
    out = []
    for _ in range(n_batches):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def concat(batches) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


def autoencoder_config(base):
    """The VAE stage's config: `base` with task "autoencoder" and `base.autoencoder`'s steps/lr;
    the raw parameters are exported (no EMA)."""
    c = base.copy_and_resolve_references()
    c.task = "autoencoder"
    c.train.steps = int(base.autoencoder.steps)
    c.train.lr = float(base.autoencoder.lr)
    c.train.export_ema = False
    c.train.loss_weighting = "uniform"  # no timesteps in this task
    c.leffa.enabled = False
    c.checkpoint.every = c.train.steps
    return c


def baseline_config(base, init: str):
    """The baseline stage's config: `base` without the Leffa loss, from `init` (the VAE stage's
    export), with `base.baseline`'s steps / lr / decay."""
    c = base.copy_and_resolve_references()
    c.model.init = init
    c.leffa.enabled = False
    c.train.steps = int(base.baseline.steps)
    c.train.lr = float(base.baseline.lr)
    c.train.decay = str(base.baseline.decay)
    c.checkpoint.every = 1000
    return c


def _cast_params(model, dtype):
    """`model` with the parameters of its VAE and both UNets cast to `dtype` (in place)."""
    import jax
    from flax import nnx

    for name in ("vae", "unet_encoder", "unet"):
        module = getattr(model, name)
        nnx.update(module, jax.tree.map(lambda x: x.astype(dtype), nnx.state(module, nnx.Param)))
    return model


def save_baseline(export_dir: str, out_dir: str, provenance: str = "") -> None:
    """A leffa_jax checkpoint folder with the parameters of `export_dir` in float16 (how the
    shipped baseline is stored; `load_float32` reads it back); `provenance`: how it was made
    (leffa_jax.json)."""
    import jax.numpy as jnp

    from leffa_jax.model import LeffaModel

    model = _cast_params(LeffaModel.from_pretrained(export_dir), jnp.float16)
    model.save_pretrained(out_dir, meta={"resolution": [32, 24], "stored_dtype": "float16",
                                         "provenance": provenance})


def load_float32(path: str):
    """LeffaModel.from_pretrained with every floating parameter cast to float32."""
    import jax.numpy as jnp

    from leffa_jax.model import LeffaModel

    return _cast_params(LeffaModel.from_pretrained(path), jnp.float32)


# ------------------------------------------------------------------ closed-form image metrics
def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian filter over axes 1, 2 of (B,H,W,C), reflect padding."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        xp = np.pad(x, pad, mode="reflect")
        x = sum(k[i] * np.take(xp, np.arange(i, i + x.shape[axis]), axis=axis)
                for i in range(len(k)))
    return x


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 .01, K2 .03, data range
    1) of uint8 (B,H,W,3) images, the SSIM map averaged over the pixels where mask (B,H,W,1) >
    .5 and the channels -> (B,)."""
    x, y = np.asarray(a, np.float64) / 255, np.asarray(b, np.float64) / 255
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = _gaussian_blur(x), _gaussian_blur(y)
    vx = _gaussian_blur(x * x) - mx * mx
    vy = _gaussian_blur(y * y) - my * my
    cxy = _gaussian_blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    m = np.asarray(mask)[..., 0] > 0.5
    return np.array([s[i][m[i]].mean() for i in range(len(s))])


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB, data range 255) of uint8 (B,H,W,3) images over the pixels where mask
    (B,H,W,1) > .5 -> (B,)."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    m = np.asarray(mask)[..., 0] > 0.5
    mse = np.array([d[i][m[i]].mean() for i in range(len(d))])
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


# ------------------------------------------------------------------ stages
def unpaired_ground_truth(root: str, names) -> np.ndarray:
    """(B,H,W,3) uint8: the drawn true results `test/image-unpaired/<person>` of the test pairs."""
    from leffa_jax.imageio import load_image

    return np.stack([load_image(os.path.join(root, "test", "image-unpaired", n)) for n in names])


def vae_psnr(model, images: np.ndarray) -> float:
    """Mean PSNR (dB) of the VAE's reconstruction (posterior mean) of images in [-1, 1]."""
    import jax
    import jax.numpy as jnp

    from leffa_jax.imageio import to_uint8

    rec = jax.jit(lambda x: model.vae.decode(model.vae.encode(x).mean))(jnp.asarray(images))
    ones = np.ones(images.shape[:3] + (1,), np.float32)
    return float(masked_psnr(to_uint8(np.asarray(rec)), to_uint8(images), ones).mean())


def sample(model, batch: dict, seed: int = 0) -> np.ndarray:
    """Try-on results (B,H,W,3) uint8: official DDPM sampling, guidance 2.5, repaint."""
    from leffa_jax import pipeline

    out = pipeline.generate(model, batch["person"], batch["garment"], batch["mask"],
                            batch["densepose"], steps=SAMPLE_STEPS, guidance=2.5, repaint=True,
                            seed=seed)
    return np.asarray(out.images)


def warped_garments(model, batch: dict, layer: int) -> np.ndarray:
    """(B,H,W,3) uint8: the person with, inside the garment region, the garment warped by the
    model's attention flow at `layer` (t=250): where the model looks, as a picture."""
    import jax.numpy as jnp

    from leffa_jax import evaluate
    from leffa_jax import flow as flow_lib
    from leffa_jax.imageio import to_uint8

    flows = evaluate.attention_flows(model, batch, layers=(layer,))
    warped = np.asarray(flow_lib.warp(jnp.asarray(batch["garment"]), flows[layer]))
    region = np.asarray(batch["garment_mask"]) > 0.5
    return to_uint8(np.where(region, warped, np.asarray(batch["person"])))


def train_stages(base, work: str, from_scratch: bool) -> str:
    """Stage 2: the baseline's folder (the shipped one, or trained here from scratch)."""
    from leffa_jax import train

    if not from_scratch:
        print(f"[2/5] baseline: the shipped tiny try-on model ({BASELINE_DIR}; trained on this "
              f"set without the Leffa loss: VAE {base.autoencoder.steps} steps, then "
              f"{base.baseline.steps} steps; `--from-scratch` trains it here)")
        return BASELINE_DIR
    t1 = time.time()
    ae = train.train(autoencoder_config(base), os.path.join(work, "vae"))
    vae_dir = os.path.join(work, "vae", "export")
    m = ae.metrics[-1] if ae.metrics else {"l1": float("nan")}
    print(f"[2/5] trained the VAE: {ae.step} steps in {time.time() - t1:.0f} s, final L1 "
          f"{m['l1']:.3f}")
    t1 = time.time()
    r = train.train(baseline_config(base, f"leffa:{vae_dir}"), os.path.join(work, "baseline"))
    m = r.metrics[-1] if r.metrics else {"mse": float("nan")}
    print(f"[2/5] trained the baseline (no Leffa loss): {r.step} steps in "
          f"{time.time() - t1:.0f} s, final loss {m['mse']:.4f}")
    return os.path.join(work, "baseline", "export")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m leffa_jax.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--steps", type=positive_int, default=None, help="fine-tuning steps per run")
    ap.add_argument("--from-scratch", action="store_true",
                    help="train the VAE and the baseline here instead of starting from the shipped "
                         "baseline (about 40 minutes more on 2 CPU cores)")
    ap.add_argument("--vae-steps", type=positive_int, default=None, help="with --from-scratch: VAE steps")
    ap.add_argument("--baseline-steps", type=positive_int, default=None,
                    help="with --from-scratch: baseline steps")
    args = ap.parse_args(argv)
    if not args.from_scratch and (args.vae_steps or args.baseline_steps):
        ap.error("--vae-steps and --baseline-steps set the stages of --from-scratch; add it")
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="leffa_demo_"))
    os.makedirs(work, exist_ok=True)

    import jax

    from leffa_jax import evaluate, train
    from leffa_jax.imageio import grid, save_png, to_uint8

    t0, c0 = time.time(), time.process_time()
    base = load_config()
    base.data.root = root = os.path.join(work, "synthetic_viton_hd")
    if args.steps:
        base.train.steps = args.steps
    if args.vae_steps:
        base.autoencoder.steps = args.vae_steps
    if args.baseline_steps:
        base.baseline.steps = args.baseline_steps
    h, w = base.data.height, base.data.width
    print(f"[1/5] synthetic VITON-HD set in {root} ({base.data.synthetic.num_train} train / "
          f"{base.data.synthetic.num_test} test pairs, {h}x{w})")
    evals = test_batches(base)
    unpaired = concat(test_batches(base, mode="unpaired"))
    with open(os.path.join(root, "test_pairs.txt")) as f:
        names = [line.split()[0] for line in f if line.strip()][:len(unpaired["person"])]
    truth = unpaired_ground_truth(root, names)

    baseline_dir = train_stages(base, work, args.from_scratch)
    base.model.init = f"leffa:{baseline_dir}"
    models = {"baseline": load_float32(baseline_dir)}
    print(f"      its VAE reconstructs the test people at "
          f"{vae_psnr(models['baseline'], unpaired['person']):.1f} dB PSNR (the pictures' ceiling)")
    results = {"baseline": evaluate.flow_epe(models["baseline"], evals)}
    for name, leffa in (("with Leffa loss", True), ("without (ablation)", False)):
        c = base.copy_and_resolve_references()
        c.leffa.enabled = leffa
        wd = os.path.join(work, "with_leffa" if leffa else "without_leffa")
        t1 = time.time()
        r = train.train(c, wd)
        m = r.metrics[-1] if r.metrics else {"loss": float("nan"), "mse": float("nan"),
                                             "leffa": float("nan")}
        print(f"[3/5] fine-tuned {name}: {r.step} steps in {time.time() - t1:.0f} s, final loss "
              f"{m['loss']:.4f} (mse {m['mse']:.4f}, leffa {m['leffa']:.4f})")
        models[name] = load_float32(os.path.join(wd, "export"))
        results[name] = evaluate.flow_epe(models[name], evals)
    print("[4/5] flow endpoint error of the attention vs the true correspondence "
          f"(test pairs, t=250, pixels at {h}x{w}; lower is better):")
    print(f"      {'model':22s} {'best layer':>11s} {'mean over layers':>17s}")
    for name, r in results.items():
        print(f"      {name:22s} {r['best']:11.2f} {r['mean']:17.2f}")
    print(f"      {'identity flow':22s} {results['baseline']['identity']:11.2f}")

    out_dir = os.path.join(work, "samples")
    region = unpaired["garment_mask"]
    images, scores = {}, {}
    for name, model in models.items():
        images[name] = sample(model, unpaired)
        scores[name] = (masked_ssim(images[name], truth, region).mean(),
                        masked_psnr(images[name], truth, region).mean())
    persons = to_uint8(unpaired["person"])
    scores["input person"] = (masked_ssim(persons, truth, region).mean(),
                              masked_psnr(persons, truth, region).mean())
    print(f"[5/5] sampled the {len(names)} unseen unpaired pairs ({SAMPLE_STEPS} DDPM steps, "
          "guidance 2.5, repaint); result vs the true try-on inside the garment region "
          "(higher is better; 'input person' wears its own garment):")
    print(f"      {'model':22s} {'SSIM':>6s} {'PSNR dB':>8s}")
    for name, (ssim, psnr) in scores.items():
        print(f"      {name:22s} {ssim:6.3f} {psnr:8.2f}")

    per_layer = results["with Leffa loss"]["per_layer"]
    best = min(per_layer, key=per_layer.get)
    warped = warped_garments(models["with Leffa loss"], unpaired, best)
    garments = to_uint8(unpaired["garment"])
    masks = np.repeat(np.round(unpaired["mask"] * 255).astype(np.uint8), 3, -1)
    rows = []
    for i, n in enumerate(names):
        stem = os.path.splitext(n)[0]
        for name, sub in (("with Leffa loss", ""), ("without (ablation)", "without_leffa"),
                          ("baseline", "baseline")):
            save_png(os.path.join(out_dir, sub, f"{stem}.png"), images[name][i])
        rows.append([persons[i], garments[i], masks[i], images["with Leffa loss"][i],
                     images["without (ablation)"][i], truth[i], warped[i]])
    picture = grid([[np.repeat(np.repeat(p, GRID_SCALE, 0), GRID_SCALE, 1) for p in row]
                    for row in rows])
    save_png(os.path.join(work, "grid.png"), picture)
    print(f"      grid: {os.path.join(work, 'grid.png')} (rows: test pairs; columns: person | "
          f"garment | mask | result with the Leffa loss | without | ground truth | the garment "
          f"warped by layer {best}'s attention flow); PNGs in {out_dir}")
    jax.clear_caches()
    print(f"done in {time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU; "
          f"everything is in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
