"""A toy two-condition system built from the public parts only (no Leffa code): its own tiny UNet
config (4 latent channels, cross-attention over context tokens), a frozen condition encoder, and
a Task whose loss is epsilon MSE with the context = [tokens of condition a | tokens of condition
b], each condition dropped (zeroed) with probability `config.toy.drop_prob` per sample (what
joint guidance over the two conditions needs). It is trained with the generic loop, selected by
`config.task`, interrupted, resumed, and must end bit-identical to an uninterrupted run.

`toy_config`, `ToyModel`, `toy_context`, `ToyTask` and `toy_schedule` are meant for reuse (e.g. the sampling
half of this system: joint guidance over the two conditions).
"""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from leffa_jax import schedulers, systems
from leffa_jax.nn.config import UNetConfig
from leffa_jax.nn.unet import UNet
from leffa_jax.objectives import epsilon_mse
from leffa_jax.training import loop
from leffa_jax.training.config import base_config
from leffa_jax.training.task import Task

TOY_UNET = {  # a diffusers UNet2DConditionModel config.json: one level, cross-attention
    "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
    "block_out_channels": [16], "layers_per_block": 1, "attention_head_dim": 2,
    "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"],
    "cross_attention_dim": 8, "norm_num_groups": 8,
}
LATENT_HW = (8, 8)
CONDITION_TOKENS = {"cond_a": 2, "cond_b": 3}  # tokens per condition
CONDITION_DIM = 6                                # raw condition feature size


def toy_schedule() -> schedulers.Schedule:
    """SD's scaled-linear DDPM schedule (1000 steps), epsilon prediction."""
    return schedulers.make_schedule({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                     "beta_end": 0.012, "num_train_timesteps": 1000})


def toy_config(steps: int = 4) -> ml_collections.ConfigDict:
    c = base_config()
    c.task = "toy"
    c.train.steps = steps
    c.train.batch_size = 8
    c.train.lr = 1e-3
    c.train.dtype = "float32"
    c.train.remat = False
    c.train.ema_decay = 0.9
    c.toy = ml_collections.ConfigDict({"drop_prob": 0.25})
    c.checkpoint.every, c.checkpoint.keep = 2, 5
    c.log.progress_bar = False
    c.log.image_every = 0
    c.sharding_min_size = 0
    return c


class ToyModel(nnx.Module):
    """`encoder`: raw condition features (B, L, 6) -> context tokens (B, L, 8), frozen;
    `unet`: the denoiser over (B, 8, 8, 4) latents with cross-attention to the tokens."""

    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.encoder = nnx.Linear(CONDITION_DIM, TOY_UNET["cross_attention_dim"], rngs=rngs)
        self.unet = UNet(UNetConfig.from_dict(dict(TOY_UNET)), rngs=rngs)


def toy_context(encoder, cond_a, cond_b, keep) -> jax.Array:
    """[encoder(a) * keep[:, 0] | encoder(b) * keep[:, 1]] (B, 5, 8): the UNet's context with
    each condition kept (1) or dropped (0) per sample; keep (B, 2)."""
    keep = keep.astype(cond_a.dtype)
    return jnp.concatenate([encoder(cond_a) * keep[:, 0, None, None],
                            encoder(cond_b) * keep[:, 1, None, None]], axis=1)


class ToyIterator:
    """Batch i is a pure function of (seed, i): the state is just i."""

    def __init__(self, batch_size: int, seed: int = 0):
        self.batch_size, self.seed, self.index = batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.index])
        b = self.batch_size
        batch = {k: rng.standard_normal((b, n, CONDITION_DIM)).astype(np.float32)
                 for k, n in CONDITION_TOKENS.items()}
        # the clean latent depends on both conditions (something for the context to explain)
        mix = batch["cond_a"].mean(1)[:, :4] + batch["cond_b"].mean(1)[:, :4]
        pattern = rng.standard_normal((b, *LATENT_HW, 4)).astype(np.float32)
        batch["latent"] = np.tanh(mix[:, None, None, :] + 0.3 * pattern)
        batch["index"] = np.arange(self.index * b, (self.index + 1) * b)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


class ToyDataset:
    def __init__(self, batch_size: int, seed: int = 0):
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self):
        return ToyIterator(self.batch_size, self.seed)


class ToyTask(Task):
    name = "toy"
    components = ("encoder", "unet")
    trainable = ("unet",)

    def init_model(self) -> ToyModel:
        return ToyModel(self.config.train.seed)

    def prepare(self, model):
        self.schedule = toy_schedule()
        return super().prepare(model)

    def batch_shapes(self):
        shapes = {k: (n, CONDITION_DIM) for k, n in CONDITION_TOKENS.items()}
        return {**shapes, "latent": (*LATENT_HW, 4)}

    def dataset(self, split="train"):
        return ToyDataset(self.config.train.batch_size, self.config.train.seed)

    def loss(self, params, frozen, batch, rng):
        modules = self.modules({**frozen, **params}, jnp.dtype(self.config.train.dtype))
        latent = batch["latent"]
        b = latent.shape[0]
        k_t, k_noise, k_drop = jax.random.split(rng, 3)
        keep = jax.random.uniform(k_drop, (b, 2)) >= self.config.toy.drop_prob
        context = toy_context(modules["encoder"], batch["cond_a"], batch["cond_b"], keep)
        t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, latent.shape, jnp.float32)
        noisy = schedulers.add_noise(self.schedule, latent, noise, t)
        mse = epsilon_mse(modules["unet"](noisy, t, context).sample, noise)
        return mse, {"mse": mse}

    def export(self, model, params, frozen, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        flat = {}
        for name, tree in {**frozen, **params}.items():
            flat.update(flat_arrays(name, jax.device_get(tree)))
        np.savez(os.path.join(out_dir, "params.npz"), **flat)


def flat_arrays(prefix: str, tree) -> dict[str, np.ndarray]:
    """{"prefix[key][0]...": array}: the same key for an nnx.State and its Orbax restore."""
    def key(path):
        return prefix + re.sub(r"['\"]", "", jax.tree_util.keystr(path)).replace(".value", "[value]")

    return {key(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _final_state(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))


class _Crash(RuntimeError):
    pass


def _crash_after(at_step):
    def hook(event, step):
        if event == "step" and step == at_step:
            raise _Crash(f"simulated crash after dispatching step {step}")
    return hook


def test_toy_system_trains_and_resumes_identically(tmp_path, monkeypatch):
    from leffa_jax import train

    monkeypatch.setitem(systems.TASKS, "toy", f"{__name__}:ToyTask")
    config = toy_config(steps=4)
    base = train.train(config, str(tmp_path / "uninterrupted"))  # the task chosen by config.task
    assert base.step == 4 and [m["step"] + 1 for m in base.metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["mse"]) and m["loss"] == m["mse"] for m in base.metrics)

    work = str(tmp_path / "interrupted")
    with pytest.raises(_Crash):  # dies after step 3 was dispatched: only step 2 is saved
        loop.train(ToyTask(config), config, work, hooks=[_crash_after(3)])
    resumed = loop.train(ToyTask(config), config, work)
    assert [m["step"] + 1 for m in resumed.metrics] == [3, 4]
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in base.metrics[2:]]
    want, got = _final_state(base.workdir, 4), _final_state(work, 4)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # the export holds the EMA of the trainable UNet and the untouched frozen encoder
    exported = dict(np.load(os.path.join(work, "export", "params.npz")))
    want_export = {**flat_arrays("unet", want["ema"]["unet"]),
                   **flat_arrays("encoder", nnx.state(ToyModel(config.train.seed).encoder))}
    assert sorted(exported) == sorted(want_export)
    for k, v in want_export.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


# ----------------------------------------------------------------------------- sampling half

SAMPLING_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
                     "clip_sample": False}
BRANCH_KEEP = np.array([[0, 0], [1, 0], [1, 1]], np.float32)  # branches: none | a | a + b


def test_toy_system_joint_guidance_sampling():
    """Joint guidance over the toy system's two conditions through the public sampling parts
    (`make_stepper`, `denoise`, branch helpers, `nested_guidance`), all branches in ONE UNet call
    per step, against an independent reference: a Python loop with one UNet call per branch, the
    closed-form joint guidance e0 + s_b (e_ab - e_a) + s_a (e_a - e0), and diffusers' DDIM."""
    import torch
    from diffusers import DDIMScheduler

    from leffa_jax.sampling import guidance
    from leffa_jax.sampling import loop as sampling_loop
    from leffa_jax.sampling.steppers import make_stepper

    model = ToyModel(seed=3)
    rng = np.random.default_rng(0)
    b, steps, scales = 2, 6, (2.0, 3.5)
    cond_a = rng.standard_normal((b, CONDITION_TOKENS["cond_a"], CONDITION_DIM), np.float32)
    cond_b = rng.standard_normal((b, CONDITION_TOKENS["cond_b"], CONDITION_DIM), np.float32)
    contexts = [np.asarray(toy_context(model.encoder, cond_a, cond_b, np.tile(k, (b, 1))))
                for k in BRANCH_KEEP]
    x_T = rng.standard_normal((b, *LATENT_HW, 4), np.float32)
    stepper = make_stepper("ddim", schedulers.make_schedule(SAMPLING_SCHEDULE), steps)
    graphdef, state = nnx.split(model.unet)

    @jax.jit
    def sample(state, x_T, contexts):
        unet = nnx.merge(graphdef, state)

        def eps_fn(x, t, branch_contexts):
            eps = unet(guidance.repeat_branches(x, 3), t,
                       guidance.interleave_branches(*branch_contexts)).sample
            return guidance.nested_guidance(guidance.split_branches(eps, 3), scales)

        return sampling_loop.denoise(stepper, eps_fn, x_T, contexts, return_latents=True)

    _, latents = sample(state, x_T, contexts)

    unet_fn = jax.jit(lambda x, t, c: model.unet(x, t, c).sample)
    sched = DDIMScheduler(**SAMPLING_SCHEDULE)
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(np.asarray(stepper.timesteps), sched.timesteps.numpy())
    x = torch.from_numpy(x_T)
    for i, t in enumerate(sched.timesteps):
        e0, ea, eab = (np.asarray(unet_fn(x.numpy(), int(t), c)) for c in contexts)
        eps = e0 + scales[1] * (eab - ea) + scales[0] * (ea - e0)
        x = sched.step(torch.from_numpy(eps), t, x).prev_sample
        np.testing.assert_allclose(np.asarray(latents[i]), x.numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=f"step {i}")
