"""Leffa training: sharded over a device mesh, resumable, bf16 compute with float32 masters.

    python -m leffa_jax.train --config configs/tryon_512.py --workdir DIR [--config.key=value ...]

One optimizer step (`make_train_step`), everything inside one jitted program:
    1. frozen VAE: z = E(person), z_masked = E(person * (mask < .5)), z_ref = E(garment), each a
       posterior SAMPLE times the scaling factor (no gradient);
    2. t ~ U{0..999}, eps ~ N(0, 1), z_t = add_noise(z, eps, t); z_ref zeroed with probability
       `ref_drop_prob` per sample (the unconditional branch of guidance);
    3. feats = reference_unet(z_ref, t); eps_hat = generative_unet([z_t | mask | z_masked |
       densepose], t, feats) with, in the Leffa stage, a flow probe on the selected layers;
    4. loss = ||eps_hat - eps||^2 + Leffa loss (samples whose reference was dropped are gated out);
    5. gradient accumulation over `grad_accum` micro-batches (lax.scan), global-norm clipping,
       AdamW, EMA; a non-finite loss or gradient leaves the state untouched and stops the run.
The state (params of both UNets, optimiser state, EMA, step, RNG) is sharded by the rules in
`leffa_jax/sharding.py`; the batch over ('data', 'fsdp'). Checkpoints (Orbax, async) hold the
state and the data-iterator state, so a killed run continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from leffa_jax import schedulers, sharding
from leffa_jax.model import LeffaModel
from leffa_jax.objectives import (
    LeffaLossConfig,
    epsilon_mse,
    flow_probe,
    leffa_loss_from_flows,
    selected_layers,
)

TRAINABLE = ("unet_encoder", "unet")
BATCH_KEYS = ("person", "garment", "mask", "densepose", "garment_mask")


class NonFiniteLossError(FloatingPointError):
    pass


@struct.dataclass
class TrainState:
    step: jax.Array           # int32 scalar: optimizer updates done
    params: dict[str, Any]    # {'unet_encoder': nnx.State, 'unet': nnx.State}, float32 masters
    opt_state: Any
    ema: dict[str, Any]
    rng: jax.Array            # base key; step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------- set-up

def leffa_loss_config(config) -> LeffaLossConfig:
    lc = config.leffa
    return LeffaLossConfig(lam=lc.lam, tau=lc.tau, t_threshold=lc.t_threshold,
                           min_ratio=lc.min_ratio, kind=lc.kind, fused=lc.fused,
                           chunk_size=lc.get("chunk_size") or None,
                           layers=tuple(lc.layers) if lc.get("layers") else None)


def make_optimizer(config) -> optax.GradientTransformation:
    t = config.train
    if t.get("warmup_steps", 0):
        lr = optax.linear_schedule(0.0, t.lr, t.warmup_steps)
    else:
        lr = optax.constant_schedule(t.lr)
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay),
    ), lr


def init_model(config) -> LeffaModel:
    """The model the run starts from (`config.model.init`):
    "random"               random init from `config.model.base` (a config folder, or "tiny");
    "sd_inpainting:DIR"    both UNets from a diffusers SD(XL)-inpainting folder (see
                           `LeffaModel.from_sd_inpainting`), VAE from it too;
    "leffa:PATH"           an official checkpoint (+ `config.model.base`) or a leffa_jax folder,
                           e.g. the `export/` of the previous stage's workdir.
    """
    from leffa_jax.model import tiny_config_dir

    init = config.model.init
    base = config.model.base
    base = tiny_config_dir() if base in ("", "tiny") else base
    if init == "random":
        return LeffaModel(base, rngs=nnx.Rngs(config.train.seed))
    kind, _, path = init.partition(":")
    if kind == "sd_inpainting":
        return LeffaModel.from_sd_inpainting(path)
    if kind == "leffa":
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.model.init: {path} not found (for a previous "
                                    "stage, point at its workdir's export/ folder)")
        return LeffaModel.from_pretrained(path, None if os.path.isdir(path) else base)
    raise ValueError(f"config.model.init={init!r}: use random, sd_inpainting:DIR or leffa:PATH")


def split_model(model: LeffaModel):
    """-> (graphdefs, trainable params {'unet_encoder', 'unet'}, (vae graphdef, vae params))."""
    gds, params = {}, {}
    for name in TRAINABLE:
        gds[name], params[name] = nnx.split(getattr(model, name))
    vae = nnx.split(model.vae)
    return gds, params, vae


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)


# ----------------------------------------------------------------------------- the step

def make_loss_fn(gds, vae_gd, schedule, config, image_hw, latent_hw):
    """loss_fn(params, vae_params, batch, rng) -> (loss, aux). Pure; shapes are static."""
    dtype = jnp.dtype(config.train.dtype)
    lcfg = leffa_loss_config(config)
    use_leffa = bool(config.leffa.enabled)
    kernel = config.model.attention_kernel
    remat = bool(config.train.remat)
    p_drop = float(config.train.ref_drop_prob)

    def loss_fn(params, vae_params, batch, rng):
        vae = nnx.merge(vae_gd, _cast(vae_params, dtype))
        ref_unet = nnx.merge(gds["unet_encoder"], _cast(params["unet_encoder"], dtype))
        gen_unet = nnx.merge(gds["unet"], _cast(params["unet"], dtype))
        sf = vae.config.scaling_factor
        f = vae.downsample_factor
        person = batch["person"].astype(dtype)
        garment = batch["garment"].astype(dtype)
        mask = batch["mask"].astype(dtype)
        b = person.shape[0]
        k_post, k_t, k_noise, k_drop = jax.random.split(rng, 4)

        def encode(x, key):
            post = vae.encode(x)
            z = vae.sample_posterior(post, jax.random.normal(key, post.mean.shape, dtype))
            return jax.lax.stop_gradient(z * sf)

        kp = jax.random.split(k_post, 3)
        z = encode(person, kp[0])
        z_masked = encode(person * (mask < 0.5).astype(dtype), kp[1])
        z_ref = encode(garment, kp[2])
        drop = jax.random.uniform(k_drop, (b,)) < p_drop
        z_ref = jnp.where(drop[:, None, None, None], 0.0, z_ref).astype(dtype)
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, z.shape, jnp.float32)
        z_t = schedulers.add_noise(schedule, z.astype(jnp.float32), noise, t).astype(dtype)
        gen_in = jnp.concatenate([z_t, mask[:, ::f, ::f], z_masked,
                                  batch["densepose"].astype(dtype)[:, ::f, ::f]], axis=-1)
        feats = ref_unet(z_ref, t, collect_features=True, attention_kernel=kernel,
                         remat=remat).features
        probe = None
        if use_leffa:
            layers = selected_layers(gen_unet, latent_hw, image_hw, lcfg)
            probe = flow_probe(layers, lcfg.tau, fused=lcfg.fused, chunk_size=lcfg.chunk_size)
        out = gen_unet(gen_in, t, reference_features=feats, probe=probe,
                       attention_kernel=kernel, remat=remat)
        mse = epsilon_mse(out.sample, noise)
        leffa = jnp.zeros((), jnp.float32)
        if use_leffa:
            # a dropped (zero) reference has nothing to point at: gate those samples out too
            t_gate = jnp.where(drop, schedule.num_train_timesteps, t)
            leffa = leffa_loss_from_flows(out.probes, batch["garment"], batch["person"],
                                          batch["garment_mask"], t_gate, lcfg)
        return mse + leffa, {"mse": mse, "leffa": leffa}

    return loss_fn


def make_train_step(gds, vae_gd, schedule, tx, lr_fn, config, image_hw) -> Callable:
    """train_step(state, vae_params, batch) -> (state, metrics). Not jitted (see `compile_step`)."""
    f = 8
    latent_hw = (image_hw[0] // f, image_hw[1] // f)
    loss_fn = make_loss_fn(gds, vae_gd, schedule, config, image_hw, latent_hw)
    accum = int(config.train.grad_accum)
    ema_decay = float(config.train.ema_decay)

    def train_step(state: TrainState, vae_params, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, vae_params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]),
                                 batch)

            def body(carry, xs):
                g_acc, l_acc, a_acc = carry
                mb, i = xs
                (lv, a), g = grad_fn(state.params, vae_params, mb, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + lv,
                        jax.tree.map(jnp.add, a_acc, a)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            za = {"mse": jnp.zeros(()), "leffa": jnp.zeros(())}
            (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), za),
                                                 (micro, jnp.arange(accum)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss, aux = loss / accum, jax.tree.map(lambda a: a / accum, aux)
        gnorm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if config.train.ema_warmup:
            d = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        else:
            d = ema_decay
        ema = jax.tree.map(lambda e, p: e * d + (1 - d) * p, state.ema, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        new = TrainState(state.step + 1, params, opt_state, ema, state.rng)
        # a non-finite step changes nothing (the host stops the run and names the step)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = {"loss": loss, "mse": aux["mse"], "leffa": aux["leffa"], "grad_norm": gnorm,
                   "lr": lr_fn(state.step), "finite": finite, "step": state.step}
        return new, metrics

    return train_step


def init_state(params, tx, seed: int) -> TrainState:
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(seed))


def compile_step(train_step, state, vae_params, batch, mesh, rules=sharding.DEFAULT_RULES,
                 min_shard_size: int = 2 ** 14):
    """jit with explicit in/out shardings and the state donated. Returns (step_fn, shardings)."""
    st_sh = sharding.tree_shardings(jax.eval_shape(lambda: state), mesh, rules,
                                    min_shard_size=min_shard_size)
    vae_sh = sharding.tree_shardings(jax.eval_shape(lambda: vae_params), mesh, rules,
                                     min_shard_size=min_shard_size)
    b_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    step = jax.jit(train_step, in_shardings=(st_sh, vae_sh, b_sh),
                   out_shardings=(st_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    return step, (st_sh, vae_sh, b_sh)


# ----------------------------------------------------------------------------- the loop

def _select_batch(batch: dict) -> dict:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"data batch lacks {missing}; it has {sorted(batch)}")
    return {k: batch[k] for k in BATCH_KEYS}


def export_model(model_like: LeffaModel, params: dict, vae_params, out_dir: str) -> None:
    """Write params (e.g. the EMA) as a leffa_jax checkpoint folder `from_pretrained` loads."""
    for name in TRAINABLE:
        nnx.update(getattr(model_like, name), jax.device_get(params[name]))
    nnx.update(model_like.vae, jax.device_get(vae_params))
    model_like.save_pretrained(out_dir)


@dataclasses.dataclass
class RunResult:
    step: int
    metrics: list[dict]
    workdir: str


def train(config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None,
          callback: Callable[[int, dict], None] | None = None) -> RunResult:
    """Run (or resume) training in `workdir`. `max_steps` stops early (tests use it to simulate
    a kill between checkpoints)."""
    from leffa_jax import checkpoint as ckpt_lib
    from leffa_jax import observe
    from leffa_jax.data import pipeline as data_pipeline

    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    mesh = sharding.make_mesh([config.mesh.data, config.mesh.fsdp])
    model = init_model(config)
    gds, params, (vae_gd, vae_params) = split_model(model)
    overrides = dict(config.model.get("scheduler_overrides", {}))
    overrides.setdefault("rescale_betas_zero_snr",
                         schedulers.uses_zero_terminal_snr(model.config_dir))
    schedule = schedulers.make_schedule(model.scheduler_config(), **overrides)
    tx, lr_fn = make_optimizer(config)
    dcfg = config.data
    image_hw = (dcfg.height, dcfg.width)
    if config.train.batch_size != dcfg.batch_size:
        raise ValueError(f"train.batch_size {config.train.batch_size} != data.batch_size "
                         f"{dcfg.batch_size}")
    if config.train.batch_size % (mesh.size * config.train.grad_accum) and \
            config.train.batch_size % mesh.size:
        raise ValueError(f"batch_size {config.train.batch_size} must divide over {mesh.size} "
                         "devices")
    train_step = make_train_step(gds, vae_gd, schedule, tx, lr_fn, config, image_hw)
    state = init_state(params, tx, config.train.seed)
    del params

    dataset = data_pipeline.make_dataset(dcfg, "train")
    data_iter = iter(dataset)
    manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                         every=config.checkpoint.every,
                                         keep=config.checkpoint.keep,
                                         use_async=config.checkpoint.use_async)
    first = _select_batch(next(iter(dataset)))
    example = data_pipeline.shard_batch(first, mesh)
    rules = tuple(config.get("sharding_rules") or sharding.DEFAULT_RULES)
    step_fn, (st_sh, vae_sh, _) = compile_step(train_step, state, vae_params, example, mesh,
                                               rules, config.get("sharding_min_size", 2 ** 14))
    state = jax.device_put(state, st_sh)
    vae_params = jax.device_put(vae_params, vae_sh)
    restored = manager.restore_latest(state, data_iter)
    if restored is not None:
        state = jax.device_put(restored, st_sh)
    start = int(jax.device_get(state.step))
    total = int(config.train.steps)
    end = min(total, start + max_steps) if max_steps is not None else total
    flops = observe.step_flops(step_fn, state, vae_params, example)
    logger = observe.Logger(workdir, config, flops=flops, start=start, total=total,
                            enabled=jax.process_index() == 0)
    # Test hooks: SIGKILL this process after dispatching a step, or right after a save started.
    kill_at = int(os.environ.get("LEFFA_TEST_KILL_AT_STEP", "0"))
    kill_in_save = int(os.environ.get("LEFFA_TEST_KILL_IN_SAVE_AT_STEP", "0"))
    history = []
    pending = None  # (metrics future, batch indices) of the previous step: checked one step late
    step = start
    try:
        while step < end:
            host_batch = next(data_iter)
            index = host_batch.get("index")
            batch = data_pipeline.shard_batch(_select_batch(host_batch), mesh)
            state, metrics = step_fn(state, vae_params, batch)
            step += 1
            if step == kill_at:
                _sigkill()
            if pending is not None:
                history.append(_check(pending, callback))
                logger.log(history[-1])
            pending = (metrics, index)
            if manager.should_save(step) or step == end:
                history.append(_check(pending, callback))
                logger.log(history[-1])
                pending = None
                manager.save(step, state, data_iter)
                if step == kill_in_save:
                    _sigkill()
            if config.log.image_every and step % config.log.image_every == 0:
                ema = observe.host_params(state.ema)  # every process: collective if multi-host
                logger.images(step, model, ema, observe.host_params(vae_params), host_batch,
                              config)
        if pending is not None:
            history.append(_check(pending, callback))
            logger.log(history[-1])
    finally:
        manager.wait()
        logger.close()
    if step >= total and jax.process_index() == 0:
        export_model(model, state.ema if config.train.export_ema else state.params, vae_params,
                     os.path.join(workdir, "export"))
    return RunResult(step, history, workdir)


def _sigkill() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _check(pending, callback) -> dict:
    metrics, index = pending
    m = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v))
         for k, v in jax.device_get(metrics).items()}
    if not m["finite"]:
        idx = None if index is None else np.asarray(index).tolist()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {int(m['step']) + 1} (loss {m['loss']}, "
            f"grad norm {m['grad_norm']}); batch sample indices {idx}. The state of that step was "
            "not applied and no checkpoint was written from it; check the data of those samples "
            "or lower the learning rate, then resume from the last checkpoint.")
    if callback is not None:
        callback(int(m["step"]) + 1, m)
    return m


# ----------------------------------------------------------------------------- CLI

def main(argv) -> None:
    from absl import flags

    del argv
    config = flags.FLAGS.config
    if os.environ.get("LEFFA_MULTIHOST"):
        jax.distributed.initialize()
    result = train(config, flags.FLAGS.workdir)
    if jax.process_index() == 0:
        last = result.metrics[-1] if result.metrics else {}
        print(json.dumps({"step": result.step, "loss": last.get("loss")}))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, logs and exports go")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
