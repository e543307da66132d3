"""Magic Clothing training (never released by the authors) as a Task of the generic trainer.

What is known (MAGIC_CLOTHING_REFERENCE.md section 6): only the garment extractor is trained,
initialised from the base UNet; denoiser, VAE and text encoder are frozen; a dropped garment is
zero features. One loss evaluation (`MagicClothingTask.loss`):

    1. frozen VAE: z = posterior SAMPLE of the person x sf; z_g = posterior MEAN of the garment
       x its cloth mask (as at inference) x sf;
    2. per sample u ~ U(0, 1): garment dropped when u < p_g or p_g + p_t <= u < p_g + p_t + p_gt,
       text dropped (empty prompt) when p_g <= u < p_g + p_t + p_gt (defaults 0.05 each:
       `train.garment_drop_prob`, `text_drop_prob`, `both_drop_prob`), so every branch of the
       joint guidance [neg|0, neg|g, pos|g] is learned;
    3. t ~ U{0..T-1}, z_t = add_noise(z, eps, t); feats = extractor(z_g, 0, empty-prompt context)
       (its post-norm1 states), zeroed for dropped garments; eps_hat = unet(z_t, t, text context,
       reference_features=feats);
    4. loss = ||eps_hat - eps||^2 [+ the Leffa flow loss on the denoiser's attention over the
       garment tokens, `leffa.enabled`, the person's garment region as target mask].

`model.base`: an SD1.5 diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), ""
for the tiny random SD1.5 of the shared fixtures (demo, tests); `model.init`: "base" (extractor
= a copy of the denoiser) or "extractor:FILE" (resume from a released-layout file);
`model.denoiser`: "" or a flat diffusers UNet .safetensors replacing the base UNet's weights (the
tiny demo starts from its shipped denoiser, `assets/tiny_magic_clothing`).
`model.train_denoiser` also trains the denoiser (only for the tiny demo, whose base is random).
Export: `garment_extractor.safetensors` in the released layout (the official code loads it);
with a trained or replaced denoiser also `base/`, the base folder holding it.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from leffa_jax import schedulers
from leffa_jax.objectives import (
    LOSS_WEIGHTINGS,
    epsilon_mse,
    flow_probe,
    leffa_loss_from_flows,
    loss_weights,
    selected_layers,
)
from leffa_jax.systems import magic_clothing as mc_lib
from leffa_jax.systems.leffa import check_data, leffa_loss_config
from leffa_jax.training.config import ConfigError
from leffa_jax.training.task import Task

EXPORT_FILE = "garment_extractor.safetensors"
EXPORT_BASE = "base"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# The tiny demo's shipped start (tools/make_tiny_magic_clothing_baseline.py; provenance.json there)
BASELINE_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "assets" / "tiny_magic_clothing")
BASELINE_DENOISER = "denoiser.safetensors"
BASELINE_EXTRACTOR = EXPORT_FILE


def base_config():
    """Defaults of the Magic Clothing training configs (configs/magic_clothing_*.py): the generic
    loop's and the try-on data section's (configs/common.py), plus captions and the condition
    dropout. The authors released no hyper-parameters (reference section 6): the dropout (0.05
    garment, 0.05 text, 0.05 both) follows IMAGDressing-v1, the closest published recipe; lr,
    batch and steps are choices."""
    from leffa_jax.configs.common import base_config as leffa_base

    c = leffa_base()
    c.task = "magic_clothing"
    c.model.base = ""                 # SD1.5 diffusers folder; "" = the tiny fixture model
    c.model.vae = ""                  # optional separate VAE folder (e.g. sd-vae-ft-mse)
    c.model.init = "base"             # base | extractor:FILE
    c.model.denoiser = ""             # optional flat UNet .safetensors replacing the base's weights
    c.model.train_denoiser = False    # the paper freezes it
    c.train.garment_drop_prob = 0.05
    c.train.text_drop_prob = 0.05
    c.train.both_drop_prob = 0.05
    c.data.flip_prob = 0.0            # garment masks are read by name
    c.data.captions = ""              # captions file ({name: caption} json or name<TAB>caption)
    c.data.caption_template = "a photography of a model, best quality, high quality"
    return c


def tiny_base() -> str:
    """The tiny random SD1.5 folder of the shared fixtures (LEFFA_SHARED or ../shared)."""
    shared = os.environ.get("LEFFA_SHARED") or str(
        pathlib.Path(__file__).resolve().parents[3] / "shared")
    return os.path.join(shared, "fixtures", "magic_clothing", "model")


def export_base(base: str, unet, out_dir: str) -> None:
    """A copy of the SD1.5 diffusers folder `base` (files hard-linked where the filesystem
    allows) whose unet/ holds `unet` (diffusers key layout, float32), written whole or not at all
    (built beside `out_dir`, then renamed over it)."""
    import shutil

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    unet_dir = os.path.join(base, "unet")

    def skip_unet_weights(folder, names):
        if os.path.samefile(folder, unet_dir):
            return [n for n in names if n.endswith((".safetensors", ".bin", ".msgpack", ".ckpt"))]
        return []

    staging = f"{out_dir}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging, ignore=skip_unet_weights, copy_function=link_or_copy)
    mc_lib.write_extractor(unet, os.path.join(staging, "unet", UNET_WEIGHTS), overwrite=True)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.rename(staging, out_dir)


class MagicClothingTask(Task):
    name = "magic_clothing"
    components = ("vae", "text_encoder", "unet", "extractor")
    trainable = ("extractor",)
    loss_weightings = LOSS_WEIGHTINGS

    def __init__(self, config):
        super().__init__(config)
        if config.model.get("train_denoiser", False):
            self.trainable = ("extractor", "unet")
        self.dtype = jnp.dtype(config.train.dtype)
        self.image_hw = (int(config.data.height), int(config.data.width))
        self.loss_config = leffa_loss_config(config) if config.get("leffa") else None
        self.mc: mc_lib.MagicClothing | None = None
        self.schedule = None
        self.latent_hw = None
        self.null_ids = None

    # ------------------------------------------------------------------ config
    def base(self) -> str:
        return self.config.model.base or tiny_base()

    def validate(self) -> None:
        c = self.config
        if c.train.batch_size != c.data.batch_size:
            raise ConfigError(f"train.batch_size {c.train.batch_size} != data.batch_size "
                              f"{c.data.batch_size}: set both (or only train.batch_size)")
        if not os.path.isdir(self.base()):
            raise ConfigError(f"model.base {self.base()} is not a folder: give an SD1.5 "
                              "diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
        denoiser = c.model.get("denoiser")
        if denoiser and not os.path.isfile(denoiser):
            raise ConfigError(f"model.denoiser {denoiser} not found: give a flat diffusers UNet "
                              "state dict of the base's architecture (.safetensors / .bin), or "
                              "'' for the base's own unet/")
        kind, _, path = c.model.init.partition(":")
        if c.model.init != "base" and (kind != "extractor" or not os.path.isfile(path)):
            raise ConfigError(f"model.init={c.model.init!r}: use 'base' (the extractor starts as "
                              "a copy of the denoiser) or 'extractor:FILE' (an existing "
                              "released-layout .safetensors)")
        probs = [float(c.train.get(k, 0.05)) for k in ("garment_drop_prob", "text_drop_prob",
                                                        "both_drop_prob")]
        if min(probs) < 0 or sum(probs) > 1:
            raise ConfigError(f"train.garment/text/both_drop_prob {probs}: each >= 0, sum <= 1")
        if (c.model.get("train_denoiser", False) or denoiser) and not os.path.isdir(
                os.path.join(self.base(), "unet")):
            key = "model.train_denoiser" if c.model.get("train_denoiser", False) else \
                "model.denoiser"
            raise ConfigError(f"{key}: model.base {self.base()} has no unet/ folder; the export "
                              "writes the denoiser into a copy of the base diffusers folder: "
                              "give that folder (not a leffa_jax conversion)")
        if float(c.data.get("flip_prob", 0.0)) > 0:
            raise ConfigError("data.flip_prob > 0: garment masks are read by file name, so "
                              "flips would desynchronise them; set --config.data.flip_prob=0")
        captions = c.data.get("captions")
        if captions and not os.path.isfile(captions):
            raise ConfigError(f"data.captions {captions} not found (or '' for the template)")
        check_data(c.data)

    # ------------------------------------------------------------------ model and data
    def init_model(self):
        kind, _, path = self.config.model.init.partition(":")
        self.mc = mc_lib.load_magic_clothing(self.base(), path if kind == "extractor" else None,
                                             vae=self.config.model.get("vae") or None,
                                             denoiser=self.config.model.get("denoiser") or None)
        return self.mc.model

    def prepare(self, model):
        from leffa_jax.systems.text2image import _ScheduleSource

        if self.mc is None or self.mc.model is not model:
            raise ValueError("MagicClothingTask.prepare: pass the model from init_model()")
        config = self.mc.system.scheduler_config
        self.schedule = schedulers.schedule_for_model(
            _ScheduleSource(config, model.config_dir),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr")))
        factor = model.vae_factor
        self.latent_hw = (self.image_hw[0] // factor, self.image_hw[1] // factor)
        self.null_ids = jnp.asarray(mc_lib.tokenize(self.mc, [""]))
        return super().prepare(model)

    def batch_shapes(self):
        h, w = self.image_hw
        return {"person": (h, w, 3), "garment": (h, w, 3), "garment_cloth_mask": (h, w, 1),
                "garment_mask": (h, w, 1), "input_ids": (77,)}

    def dataset(self, split: str = "train"):
        from leffa_jax.data.garment_text import make_garment_text_dataset
        from leffa_jax.systems.text2image_model import load_tokenizer

        tokenizer = (self.mc.tokenizer if self.mc is not None else
                     load_tokenizer(os.path.join(self.base(), "tokenizer")))
        return make_garment_text_dataset(self.config.data, tokenizer, split)

    # ------------------------------------------------------------------ loss
    def loss(self, params, frozen, batch, rng):
        dtype, schedule, c = self.dtype, self.schedule, self.config
        m = self.modules({**frozen, **params}, dtype)
        kernel = c.model.attention_kernel
        remat = bool(c.train.remat)
        b = batch["person"].shape[0]
        k_post, k_t, k_noise, k_drop = jax.random.split(rng, 4)
        vae, sf = m["vae"], m["vae"].config.scaling_factor
        post = vae.encode(batch["person"].astype(dtype))
        z = jax.lax.stop_gradient(vae.sample_posterior(
            post, jax.random.normal(k_post, post.mean.shape, dtype)) * sf).astype(jnp.float32)
        garment = batch["garment"] * batch["garment_cloth_mask"]
        z_g = jax.lax.stop_gradient(vae.encode(garment.astype(dtype)).mean * sf)
        u = jax.random.uniform(k_drop, (b,))
        pg, pt, pb = (float(c.train.get(k, 0.05)) for k in ("garment_drop_prob",
                                                             "text_drop_prob", "both_drop_prob"))
        drop_g = (u < pg) | ((u >= pg + pt) & (u < pg + pt + pb))
        drop_t = (u >= pg) & (u < pg + pt + pb)
        ids = jnp.where(drop_t[:, None], self.null_ids, batch["input_ids"])
        text = m["text_encoder"](jnp.concatenate([self.null_ids, ids]), dtype=dtype)
        text = jax.lax.stop_gradient(text.last_hidden_state)
        null, context = text[:1], text[1:]
        feats = m["extractor"](z_g.astype(dtype), jnp.zeros((), jnp.int32),
                               jnp.broadcast_to(null, (b,) + null.shape[1:]),
                               collect_features=True, attention_kernel=kernel,
                               remat=remat).features
        keep = (~drop_g).astype(dtype)[:, None, None]
        feats = [f * keep for f in feats]
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, z.shape, jnp.float32)
        z_t = schedulers.add_noise(schedule, z, noise, t).astype(dtype)
        use_leffa = self.loss_config is not None and bool(c.leffa.enabled)
        probe = None
        if use_leffa:
            layers = selected_layers(m["unet"], self.latent_hw, self.image_hw, self.loss_config)
            probe = flow_probe(layers, self.loss_config.tau, fused=self.loss_config.fused,
                               chunk_size=self.loss_config.chunk_size)
        out = m["unet"](z_t, t, context, reference_features=feats, probe=probe,
                        attention_kernel=kernel, remat=remat)
        mse = epsilon_mse(out.sample, noise, loss_weights(c.train, schedule, t))
        flow = jnp.zeros((), jnp.float32)
        if use_leffa:
            t_gate = jnp.where(drop_g, schedule.num_train_timesteps, t)
            flow = leffa_loss_from_flows(out.probes, garment, batch["person"],
                                         batch["garment_mask"], t_gate, self.loss_config)
        metrics = {"mse": mse, "leffa": flow,
                   "garment_dropped": jnp.mean(drop_g.astype(jnp.float32)),
                   "text_dropped": jnp.mean(drop_t.astype(jnp.float32))}
        return mse + flow, metrics

    # ------------------------------------------------------------------ outputs
    def export(self, model, params, frozen, out_dir: str) -> None:
        """out_dir/garment_extractor.safetensors (released layout; written atomically); with
        `model.train_denoiser` or `model.denoiser` also out_dir/base/, the base folder with the
        denoiser used (`export_base`), so that `sample --task garment2image --base out_dir/base`
        uses it."""
        self.load_into(model, params, frozen)
        os.makedirs(out_dir, exist_ok=True)
        mc_lib.write_extractor(model.extractor, os.path.join(out_dir, EXPORT_FILE),
                               overwrite=True)
        if "unet" in self.trainable or self.config.model.get("denoiser"):
            export_base(self.base(), model.unet, os.path.join(out_dir, EXPORT_BASE))

    def image_row(self, model, params, frozen, host_batch):
        """garment (masked) | person | sample from the template caption (joint guidance)."""
        from leffa_jax import viz

        self.load_into(model, params, frozen)
        garment = viz.to_uint8(host_batch["garment"][0])
        mask = (np.asarray(host_batch["garment_cloth_mask"][0, ..., 0]) * 255).astype(np.uint8)
        h, w = self.image_hw
        out = mc_lib.generate(self.mc, garment, self.config.data.get("caption_template") or None,
                              garment_mask_image=mask, a_prompt=None, height=h, width=w,
                              steps=int(self.config.log.sample_steps), seed=0, shard=False)
        return [viz.to_uint8(np.asarray(out.garment_pixels[0])),
                viz.to_uint8(host_batch["person"][0]), out.images[0]]


# ----------------------------------------------------------------------------- demo
def garment_use(task: MagicClothingTask, model, batch, timesteps=(250, 500, 750, 900),
                draws: int = 4) -> dict[int, dict[str, tuple[float, float]]]:
    """Does the model read the garment? {t: {variant: (epsilon MSE in the person's garment
    region, over the whole latent)}} of the denoiser on `batch` (host arrays, e.g. unseen test
    pairs) with the right garment, another pair's ("other": the batch rolled by one) and zero
    garment features ("zero"), averaged over `draws` noise draws: `MagicClothingTask.loss`'s
    computation without dropout. A model that reads the garment has its lowest error with the
    right one. `task` must be prepared with `model`."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    vae, sf = model.vae, model.vae.config.scaling_factor
    z = vae.encode(batch["person"]).mean * sf
    z_g = vae.encode(batch["garment"] * batch["garment_cloth_mask"]).mean * sf
    b = z.shape[0]
    text = model.text_encoder(batch["input_ids"]).last_hidden_state
    null = model.text_encoder(jnp.broadcast_to(task.null_ids, batch["input_ids"].shape)
                              ).last_hidden_state
    mask = jax.image.resize(batch["garment_mask"], (b, *z.shape[1:3], 1), "linear")

    @jax.jit
    def errors(z_t, t, noise, z_garment, keep):
        feats = model.extractor(z_garment, jnp.zeros((), jnp.int32), null,
                                collect_features=True).features
        eps = model.unet(z_t, t, text, reference_features=[f * keep for f in feats]).sample
        err = (eps - noise) ** 2
        return jnp.sum(err * mask) / (jnp.sum(mask) * err.shape[-1]), jnp.mean(err)

    variants = {"right": (z_g, 1.0), "other": (jnp.roll(z_g, 1, axis=0), 1.0),
                "zero": (z_g, 0.0)}
    out = {}
    for t_val in timesteps:
        rows = {k: [] for k in variants}
        for seed in range(draws):
            noise = jax.random.normal(jax.random.key(seed), z.shape)
            t = jnp.full((b,), t_val, jnp.int32)
            z_t = schedulers.add_noise(task.schedule, z, noise, t)
            for name, (zg, keep) in variants.items():
                rows[name].append([float(e) for e in errors(z_t, t, noise, zg,
                                                            jnp.float32(keep))])
        out[int(t_val)] = {k: tuple(np.mean(v, axis=0).tolist()) for k, v in rows.items()}
    return out


def sample_colour_distance(samples: np.ndarray, batch) -> tuple[float, float]:
    """Do samples wear their garment's colours? samples (N, K, H, W, 3) uint8, K samples made
    with garment i of `batch` (N pairs, model range). The mean RGB (0-255) of each sample inside
    the pair's person garment mask (the synthetic people share one layout) against each
    garment's mean RGB inside its cloth mask: -> (mean distance to the garment it was given,
    mean distance to the other garments)."""
    def mean_colour(images, masks):
        m = np.asarray(masks, np.float32)[..., :1]
        return (images * m).sum(axis=(-3, -2)) / m.sum(axis=(-3, -2))

    garments = mean_colour((np.asarray(batch["garment"], np.float32) / 2 + 0.5) * 255,
                           batch["garment_cloth_mask"])                           # (N, 3)
    worn = mean_colour(samples.astype(np.float32),
                       np.asarray(batch["garment_mask"])[:, None])               # (N, K, 3)
    dist = np.linalg.norm(worn[:, :, None] - garments[None, None], axis=-1)     # (N, K, N)
    own = np.eye(len(garments), dtype=bool)[:, None, :].repeat(worn.shape[1], axis=1)
    return float(dist[own].mean()), float(dist[~own].mean())


def print_garment_use(results: dict[int, dict[str, tuple[float, float]]]) -> None:
    print("epsilon MSE in the garment region (whole latent): right / other garment / none")
    for t, row in results.items():
        print(f"t={t:4d}  " + "  ".join(f"{k}: {v[0]:.4f} ({v[1]:.4f})" for k, v in row.items()),
              flush=True)


def trained_task(config, work: str | None = None) -> tuple[MagicClothingTask, object]:
    """(prepared task, model): with `work`, the finished run there (its config.json, else
    `config`, holding its export: garment_extractor.safetensors and, when written, base/ with
    its denoiser); without, `config`'s own start."""
    import json

    import ml_collections

    c = config.copy_and_resolve_references()
    if work is not None:
        export = os.path.join(work, "export")
        if not os.path.isfile(os.path.join(export, EXPORT_FILE)):
            raise ConfigError(f"{work} has no export/{EXPORT_FILE}: give the workdir of a "
                              "finished Magic Clothing run (train it to train.steps first)")
        if os.path.isfile(os.path.join(work, "config.json")):
            with open(os.path.join(work, "config.json")) as f:
                c = ml_collections.ConfigDict(json.load(f))
        if os.path.isdir(os.path.join(export, EXPORT_BASE)):  # its trained / replaced denoiser
            c.model.base, c.model.denoiser = os.path.join(export, EXPORT_BASE), ""
        c.model.init = "extractor:" + os.path.join(export, EXPORT_FILE)
    task = MagicClothingTask(c)
    task.validate()
    model = task.init_model()
    task.prepare(model)
    return task, model


def demo(workdir: str, steps: int | None = None, samples_per_garment: int = 2) -> dict:
    """The embedded demo: `configs/magic_clothing_tiny.py` fine-tunes the shipped tiny baseline
    (`assets/tiny_magic_clothing`) on the synthetic set, then on the unseen test pairs prints
    `garment_use` (shipped start vs the fine-tuned model) and writes `workdir/grid.png`: per
    test garment, garment | the test person wearing it | `samples_per_garment` samples from the
    template caption with that garment (joint guidance, UniPC 20 steps), and prints
    `sample_colour_distance` of the samples and of the test people themselves. 3 min on 2 CPU
    cores. -> {"start" / "trained": garment_use results, "colour_distance_samples" /
    "colour_distance_test": (right, other)}."""
    from leffa_jax import imageio, train
    from leffa_jax.configs import magic_clothing_tiny
    from leffa_jax.imageio import to_uint8

    c = magic_clothing_tiny.get_config()
    if steps is not None:
        c.train.steps = int(steps)
    run = os.path.join(workdir, "run")
    train.train(c, run)  # resumes / returns at once when the run is complete
    results = {}
    for name, work in (("start", None), ("trained", run)):
        task, model = trained_task(c, work)  # the trained one is kept for the samples below
        test = next(iter(task.dataset("test")))
        print(f"{name}: " + ("the shipped baseline" if work is None else f"{run}/export"))
        results[name] = garment_use(task, model, test, timesteps=(250, 500, 900))
        print_garment_use(results[name])
    n = test["garment"].shape[0]
    h, w = task.image_hw
    out = mc_lib.generate(
        task.mc, [to_uint8(g) for g in test["garment"]],
        [c.data.caption_template] * n, a_prompt=None,
        garment_mask_image=[(np.asarray(m[..., 0]) * 255).astype(np.uint8)
                            for m in test["garment_cloth_mask"]],
        num_images_per_prompt=samples_per_garment, height=h, width=w, steps=20, seed=0,
        shard=False)
    print("mean colour in the test person's garment region vs the garment's (RGB distance, "
          "0-255): the garment given / the other test garments")
    for name, images in (("samples", np.asarray(out.images).reshape(n, samples_per_garment, h,
                                                                    w, 3)),
                         ("test people (the data)", to_uint8(np.asarray(test["person"]))[:, None])):
        right, other = sample_colour_distance(images, test)
        print(f"  {name:24s} {right:5.1f} / {other:5.1f}")
        results[f"colour_distance_{name.split()[0]}"] = (right, other)
    rows = []
    for i in range(n):
        row = [to_uint8(np.asarray(out.garment_pixels[i])), to_uint8(test["person"][i])]
        row += list(out.images[i * samples_per_garment:(i + 1) * samples_per_garment])
        rows.append(np.concatenate(row, axis=1))
    path = os.path.join(workdir, "grid.png")
    imageio.save_png(path, np.concatenate(rows, axis=0))
    print(f"wrote {path}: per unseen test garment, garment | person wearing it | "
          f"{samples_per_garment} samples with it")
    return results


def main(argv=None) -> int:
    import argparse

    from leffa_jax.cli import positive_int

    parser = argparse.ArgumentParser(
        prog="python -m leffa_jax.systems.magic_clothing_train",
        description="Magic Clothing's embedded demo: the tiny config fine-tunes the shipped tiny "
                    "baseline on the synthetic set (2 CPU cores, 2-3 minutes), prints how much "
                    "the denoiser reads the garment and writes a grid of samples.")
    parser.add_argument("--demo", action="store_true", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="default: the tiny config's")
    args = parser.parse_args(argv)
    demo(args.workdir, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
