"""Training: identical losses over meshes, FSDP memory, SIGKILL resume bit-identity, NaN guard.

Run as a script, this file is the SIGKILL test's trainer: the real CLI (`train.run_cli`) plus
loop hooks that SIGKILL the process where LEFFA_TEST_KILL_* say (the loop body has no test code).
"""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from leffa_jax import sharding
from leffa_jax.configs import synthetic_tiny
from leffa_jax.systems.leffa import LeffaTask
from leffa_jax.training import loop
from leffa_jax.training.state import init_state, make_optimizer
from leffa_jax.training.step import compile_step, make_train_step


def tiny_config(**over):
    c = synthetic_tiny.get_config()
    c.data.height, c.data.width = 32, 24
    c.data.synthetic.height, c.data.synthetic.width = 32, 24
    c.data.synthetic.num_train = 16
    c.train.batch_size = 8
    c.data.flip_prob = 0.0
    c.train.loss_weighting = "uniform"  # losses near 1: the tolerances below are absolute
    c.log.progress_bar = False
    c.sharding_min_size = 0
    for k, v in over.items():
        node = c
        *parts, last = k.split(".")
        for p in parts:
            node = node[p]
        node[last] = v
    return c


def leffa_step(c):
    """(task, train_step, state at step 0, frozen params) of the Leffa task for config `c`."""
    task = LeffaTask(c)
    params, frozen = task.prepare(task.init_model())
    tx, lr = make_optimizer(c.train)
    step = make_train_step(task.loss, tx, lr, grad_accum=c.train.grad_accum,
                           ema_decay=c.train.ema_decay, ema_warmup=c.train.ema_warmup)
    return task, step, init_state(params, tx, 0), frozen


def _losses_on_mesh(mesh_shape, steps=5):
    c = tiny_config()
    from leffa_jax.data import pipeline as dp

    task, step, state, frozen = leffa_step(c)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(mesh_shape, devices)
    it = iter(dp.make_dataset(c.data, "train", process_index=0, process_count=1))
    batches = [dp.shard_batch(loop.select_batch(next(it), task.batch_shapes()), mesh)
               for _ in range(steps)]
    fn, (st_sh, frozen_sh, _) = compile_step(step, state, frozen, batches[0], mesh,
                                             min_shard_size=0)
    state = jax.device_put(state, st_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    losses = []
    for b in batches:
        state, m = fn(state, frozen, b)
        losses.append(float(m["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def reference_run():
    return _losses_on_mesh((1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1), (1, 8), (2, 4)])
def test_meshes_give_same_losses(reference_run, mesh_shape):
    want, _ = reference_run
    got, state = _losses_on_mesh(mesh_shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert want[-1] < want[0]  # it learns
    if mesh_shape == (1, 8):
        # FSDP: parameters + optimiser state on one device ~ 1/8 of the replicated size
        tree = (state.params, state.opt_state, state.ema)
        full = sum(x.nbytes for x in jax.tree.leaves(tree))
        per_dev = sharding.per_device_bytes(tree)
        assert abs(per_dev - full / 8) <= 0.1 * full / 8, (per_dev, full / 8)


def test_non_finite_step_is_not_applied_and_named():
    c = tiny_config()
    _, step, state, frozen = leffa_step(c)
    step = jax.jit(step)
    batch = {k: jnp.zeros((8, 32, 24, n)) for k, n in
             (("person", 3), ("garment", 3), ("mask", 1), ("densepose", 3), ("garment_mask", 1))}
    batch["person"] = batch["person"].at[3].set(jnp.nan)
    new, m = step(state, frozen, batch)
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(loop.NonFiniteLossError, match=r"step 1 .*indices \[8, 9, 10"):
        loop.check_metrics(m, np.arange(8, 16))


def _run(workdir, steps, cache_dir, env_extra=None, extra_args=()):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               **(env_extra or {}))
    # the CLI itself; this file as the trainer when a run is to be killed (see the bottom)
    entry = [__file__] if env_extra else ["-m", "leffa_jax.train"]
    args = [sys.executable, *entry, "--config",
            str(REPO / "leffa_jax" / "configs" / "synthetic_tiny.py"), "--workdir", str(workdir),
            f"--config.train.steps={steps}", "--config.checkpoint.every=2",
            "--config.data.height=32", "--config.data.width=24",
            "--config.data.synthetic.height=32", "--config.data.synthetic.width=24",
            "--config.data.synthetic.num_train=16", "--config.train.batch_size=8",
            "--config.log.progress_bar=False", *extra_args]
    return subprocess.run(args, env=env, capture_output=True, text=True)


def _complete_steps(workdir):
    return sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())


def _final_state(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    return tree["params"], tree["ema"], tree["opt_state"], tree["step"], tree["rng"]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """Uninterrupted 6 steps vs: SIGKILL while the step-4 checkpoint is being written, restart,
    SIGKILL after dispatching step 5, restart to the end. Parameters, EMA, optimiser state, step
    and RNG at step 6 must be bit-identical. (Subprocesses share a persistent compilation cache,
    so only the first one compiles.) The uninterrupted run also writes the PNG grid at step 6:
    sampling inside the loop must not touch the training state."""
    cache = tmp_path / "xla_cache"
    base = tmp_path / "uninterrupted"
    r = _run(base, 6, cache, extra_args=("--config.log.image_every=6",
                                         "--config.log.sample_steps=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (base / "images" / "step_0000006.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (base / "tb").iterdir())
    # the trained export records the size it was trained at; sampling defaults to it
    assert json.loads((base / "export" / "leffa_jax.json").read_text())["resolution"] == [32, 24]

    work = tmp_path / "killed"
    r = _run(work, 6, cache, {"LEFFA_TEST_KILL_IN_SAVE_AT_STEP": "4"})
    assert r.returncode == -9, f"expected SIGKILL, got {r.returncode}: {r.stderr[-2000:]}"
    # the interrupted save never becomes a checkpoint (Orbax commits by renaming a tmp folder)
    assert _complete_steps(work)[-1] == 2, _complete_steps(work)
    r = _run(work, 6, cache, {"LEFFA_TEST_KILL_AT_STEP": "5"})
    assert r.returncode == -9, f"expected SIGKILL, got {r.returncode}: {r.stderr[-2000:]}"
    assert _complete_steps(work)[-1] in (2, 4), _complete_steps(work)  # 4 if its save finished
    r = _run(work, 6, cache)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = _final_state(base, 6), _final_state(work, 6)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _kill_hooks_from_env():
    """Loop hooks: SIGKILL after dispatching step LEFFA_TEST_KILL_AT_STEP, or right after the
    save of step LEFFA_TEST_KILL_IN_SAVE_AT_STEP started."""
    at_step = int(os.environ.get("LEFFA_TEST_KILL_AT_STEP", "0"))
    in_save = int(os.environ.get("LEFFA_TEST_KILL_IN_SAVE_AT_STEP", "0"))

    def kill(event, step):
        if (event, step) in (("step", at_step), ("save", in_save)):
            os.kill(os.getpid(), signal.SIGKILL)

    return [kill]


if __name__ == "__main__":
    from leffa_jax import train

    train.run_cli(hooks=_kill_hooks_from_env())


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
def test_lr_schedule_closed_form(decay):
    """Warm-up 0 -> lr over 10 steps, then the decay to 0 at `steps` = 110 (closed forms)."""
    import math

    from leffa_jax.training.config import ConfigError, validate
    from leffa_jax.training.state import lr_schedule

    c = tiny_config(**{"train.lr": 2e-3, "train.steps": 110, "train.warmup_steps": 10,
                       "train.decay": decay})
    schedule = lr_schedule(c.train)
    after = {"constant": lambda s: 1.0, "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * s / 100)),
             "linear": lambda s: 1 - s / 100}[decay]
    for step in (0, 5, 10, 35, 60, 109, 110):
        want = 2e-3 * (step / 10 if step < 10 else after(step - 10))
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=2e-9), step  # float32
    c.train.decay = "exponential"
    with pytest.raises(ConfigError, match="train.decay must be one of"):
        validate(c)


def test_epsilon_loss_weights_closed_form():
    """uniform 1; truncated_snr max(1, 1/SNR) (bounded); min_snr min(SNR, gamma)/SNR; the
    weighted MSE is the weighted mean of per-sample means (numpy on the same arrays)."""
    from leffa_jax.objectives import MAX_LOSS_WEIGHT, epsilon_loss_weights, epsilon_mse

    a = np.array([0.999, 0.9, 0.5, 0.1, 1e-5, 0.0], np.float32)
    t = np.arange(6)
    snr = a.astype(np.float64) / (1 - a)
    want = {"uniform": np.ones(6),
            "truncated_snr": np.minimum(np.maximum(1, 1 / np.maximum(snr, 1e-3)),
                                        MAX_LOSS_WEIGHT),
            "min_snr": np.minimum(snr, 5.0) / np.maximum(snr, 1e-12)}
    for kind, w in want.items():
        np.testing.assert_allclose(epsilon_loss_weights(a, t, kind, 5.0), w, rtol=1e-5, err_msg=kind)
    assert float(epsilon_loss_weights(a, t, "min_snr")[-1]) == 0.0
    with pytest.raises(ValueError, match="loss weighting must be one of"):
        epsilon_loss_weights(a, t, "snr")
    rng = np.random.default_rng(0)
    pred, noise = rng.normal(size=(2, 6, 3, 2, 4)).astype(np.float32)
    w = want["truncated_snr"].astype(np.float32)
    per_sample = ((pred - noise) ** 2).reshape(6, -1).mean(1)
    np.testing.assert_allclose(epsilon_mse(pred, noise, w), (w * per_sample).mean(), rtol=1e-5)
    np.testing.assert_allclose(epsilon_mse(pred, noise), ((pred - noise) ** 2).mean(), rtol=1e-6)


def test_loss_weighting_errors_name_the_key_and_the_fix():
    """A wrong weighting or gamma is a ConfigError naming the key; a weighting the task's loss
    does not read is refused before anything is built (here: the autoencoder task)."""
    from leffa_jax.systems import make_task
    from leffa_jax.training.config import ConfigError, validate

    for key, value, message in (("train.loss_weighting", "snr", "train.loss_weighting must be"),
                                ("train.snr_gamma", 0.0, "train.snr_gamma must be")):
        with pytest.raises(ConfigError, match=message):
            validate(tiny_config(**{key: value}))
    c = tiny_config(**{"train.loss_weighting": "truncated_snr"})
    c.task = "autoencoder"
    with pytest.raises(ConfigError, match="autoencoder task's loss takes only"):
        loop.validate(make_task(c), c)
