"""Training-step speed: the generic training step on Leffa's Task vs a PyTorch step doing the same
work (`leffa_jax.training.step.make_train_step` + `leffa_jax.systems.leffa.LeffaTask.loss`).

One optimizer step of the full Leffa model (SD1.5-inpainting topology: reference UNet with 4
input channels, generative UNet with 12, frozen VAE; random weights), batch B:
    three VAE encodes without gradient (person, masked person, garment; posterior sample x
    scaling factor), t ~ U{0..999}, noise, reference latent dropped with p 0.1, reference UNet
    features, generative UNet with the reference concatenation (keys/values = [own; reference]
    tokens, queries of own tokens, cross-attention replaced by identity: h = h + norm2(h)),
    eps MSE [+ Leffa loss on the layers >= 1/32 of the image], backward through both UNets,
    global-norm clip 1.0, AdamW, EMA (and the non-finite guard).

Variants (each in its own subprocess):
    jax              the real training step (`make_train_step` over `LeffaTask.loss`), jitted via
                     `compile_step`, no Leffa loss
    jax_leffa        + Leffa loss, fused flow (`flow_from_qk`, never materialises N x N)
    jax_leffa_mat    + Leffa loss, materialised attention map then @ coordinates
    torch            diffusers UNet2DConditionModel x2 + AutoencoderKL, attention processors
                     doing the reference concatenation (F.scaled_dot_product_attention), eager,
                     loss.backward(), clip_grad_norm_, torch.optim.AdamW, foreach EMA lerp
    torch_leffa      + the same Leffa loss in torch (materialised mean_heads softmax(QK^T /
                     (tau sqrt d)) @ C, F.interpolate bilinear, clamp, F.grid_sample, masked L2,
                     gate t < 500 and reference not dropped, lambda 1e-3)
Parameters the step cannot reach (the UNets' unused cross-attention weights, the reference
UNet's conv_out) get zero gradients on the torch side too, so AdamW/EMA touch the same tensors
on both sides.

Measures: s/step (median of the timed steps, after warm-up; the JAX compile is not timed),
images/s, TFLOP/step from XLA's cost analysis of the JAX step traced with the GPU/TPU
convolution lowering (`benchlib.counted_flops`; the torch rows use the matching JAX count: same
computation), MFU = FLOPs / time / peak (datasheet dense bf16 on a known
GPU, else `--peak-tflops`, else on CPU a measured float32 2048^3 matmul), peak memory:
    xla  = compiled.memory_analysis(): arguments + outputs - aliased (donated) + temporaries;
    rss  = CPU: the subprocess's RSS high-water mark (reset with /proc/self/clear_refs after the
           JAX compile / before the torch models are built), so it covers the state, the
           step's working set and the runtime (imports, compiled code);
           GPU: JAX `memory_stats()['peak_bytes_in_use']`, torch `max_memory_allocated()`.

JAX variants compile concurrently (`--jobs`; XLA:CPU takes 4 to 30 min of one core per variant
for this graph, see BENCHMARKS.md; `--cache-dir` keeps the executables for the next run), then
every variant is timed alone, one after the other.

    python benchmarks/train_step.py        # CPU: 128x96, channels x0.5, batch 1, 2 timed steps
    python benchmarks/train_step.py --sizes 512x384 1024x768      # the GPU defaults anyway
    python benchmarks/train_step.py --compile-only --channel-mult 1 --sizes 512x384  # FLOPs/plan

The base config folder comes from `--config`, else $LEFFA_SD15_CONFIG, else
/work/shared/configs/stable-diffusion-inpainting. On CPU the default `--channel-mult 0.5` halves
every block width of both UNets and the VAE (same depth, layers, heads, resolutions): the full
model's step state (1.72 B trainable parameters x (param + 2 AdamW moments + EMA) x 4 B =
27.5 GB, plus 6.9 GB of gradients) does not fit a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import counted_flops, has_gpu, measured_matmul_tflops  # noqa: E402

DEFAULT_CONFIG = "/work/shared/configs/stable-diffusion-inpainting"
VARIANTS = ("jax", "jax_leffa", "jax_leffa_mat", "torch", "torch_leffa")
PEAK_TFLOPS = {  # dense datasheet values
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}
BATCH_CHANNELS = (("person", 3), ("garment", 3), ("mask", 1), ("densepose", 3),
                  ("garment_mask", 1))


# ----------------------------------------------------------------------------- shared helpers


def base_config_dir(arg: str | None) -> str:
    path = arg or os.environ.get("LEFFA_SD15_CONFIG") or DEFAULT_CONFIG
    if not os.path.isdir(os.path.join(path, "unet")):
        raise SystemExit(f"no SD1.5-inpainting config folder (unet/ vae/ scheduler/) at {path}: "
                         "pass --config or set LEFFA_SD15_CONFIG")
    return os.path.abspath(path)


def scaled_config_dir(src: str, mult: float, dst: str) -> str:
    """Copy of the config folder with every block width of the UNet and the VAE times `mult`."""
    if mult == 1.0:
        return src
    for comp, name in (("unet", "config.json"), ("vae", "config.json"),
                       ("scheduler", "scheduler_config.json")):
        os.makedirs(os.path.join(dst, comp), exist_ok=True)
        with open(os.path.join(src, comp, name)) as f:
            cfg = json.load(f)
        if comp != "scheduler":
            groups = cfg.get("norm_num_groups", 32)
            new = [int(round(c * mult)) for c in cfg["block_out_channels"]]
            if any(c % groups for c in new):
                raise SystemExit(f"--channel-mult {mult}: {comp} widths {new} are not multiples "
                                 f"of {groups} groups")
            cfg["block_out_channels"] = new
        with open(os.path.join(dst, comp, name), "w") as f:
            json.dump(cfg, f)
    return dst


def rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def random_batch(b: int, h: int, w: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for k, c in BATCH_CHANNELS:
        if k in ("mask", "garment_mask"):
            out[k] = (rng.uniform(size=(b, h, w, c)) > 0.5).astype(np.float32)
        else:
            out[k] = rng.uniform(-1, 1, (b, h, w, c)).astype(np.float32)
    return out


def layer_hw(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = latent_hw
    while h * w > n_tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens is no downsampling of the latent {latent_hw}")
    return h, w


# ----------------------------------------------------------------------------- JAX side


def jax_child(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from leffa_jax import sharding
    from leffa_jax.configs.common import base_config
    from leffa_jax.model import LeffaModel
    from leffa_jax.systems.leffa import LeffaTask
    from leffa_jax.training.state import init_state, make_optimizer
    from leffa_jax.training.step import compile_step, make_train_step

    if args.cache_dir:  # persistent compilation cache: a re-run loads instead of compiling
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    h, w = args.height, args.width
    b = args.batch
    c = base_config()
    c.model.base = args.config
    c.model.attention_kernel = args.attention_kernel
    c.train.dtype = args.dtype
    c.train.remat = bool(args.remat)
    c.train.batch_size = b
    c.data.height, c.data.width = h, w
    c.leffa.enabled = args.variant != "jax"
    c.leffa.fused = args.variant == "jax_leffa"
    out = {"variant": args.variant, "device": jax.devices()[0].device_kind,
           "backend": jax.default_backend(), "dtype": args.dtype, "remat": bool(args.remat),
           "attention_kernel": args.attention_kernel}

    t0 = time.perf_counter()
    task = LeffaTask(c)  # noise schedule: schedulers.schedule_for_model (zero-SNR rule inside)
    abstract = nnx.eval_shape(lambda: LeffaModel(args.config, rngs=nnx.Rngs(0)))
    params_abs, frozen_abs = task.prepare(abstract)
    tx, lr_fn = make_optimizer(c.train)
    step = make_train_step(task.loss, tx, lr_fn, grad_accum=c.train.grad_accum,
                           ema_decay=c.train.ema_decay, ema_warmup=c.train.ema_warmup)
    state_abs = jax.eval_shape(lambda p: init_state(p, tx, 0), params_abs)
    batch_abs = {k: jax.ShapeDtypeStruct((b, *shape), jnp.float32)
                 for k, shape in task.batch_shapes().items()}
    mesh = sharding.make_mesh([1, -1])
    fn, (st_sh, frozen_sh, b_sh) = compile_step(step, state_abs, frozen_abs, batch_abs, mesh)
    lowered = fn.lower(state_abs, frozen_abs, batch_abs)
    out["lower_s"] = time.perf_counter() - t0
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - t0
    del lowered
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    out["flops_compiled"] = float(cost.get("flops", 0.0)) if cost else None
    # for MFU: the same step traced with the GPU/TPU convolution lowering (benchmarks/benchlib.py)
    out["flops"] = counted_flops(step, state_abs, frozen_abs, batch_abs) or out["flops_compiled"]
    try:
        ma = compiled.memory_analysis()
        out["xla_bytes"] = {"argument": ma.argument_size_in_bytes,
                            "output": ma.output_size_in_bytes,
                            "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes}
        out["xla_peak_bytes"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                 - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
    except Exception as e:  # best effort on some backends
        out["xla_peak_bytes"] = None
        out["xla_error"] = repr(e)
    out["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(params_abs)))
    print("COMPILED " + json.dumps(out), flush=True)
    if args.compile_only:
        return
    if sys.stdin.readline().strip() != "go":
        return

    # ---- timed phase (alone on the machine)
    rss_ok = rss_reset()
    model = LeffaModel(args.config, rngs=nnx.Rngs(0))
    params, frozen = task.prepare(model)
    del model
    state = jax.device_put(init_state(params, tx, 0), st_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    del params
    batch = jax.device_put(random_batch(b, h, w), b_sh)
    jax.block_until_ready((state, frozen, batch))
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, m = compiled(state, frozen, batch)
        jax.block_until_ready((state, m))
        dt = time.perf_counter() - t
        losses.append({k: float(m[k]) for k in ("loss", "mse", "leffa", "grad_norm")})
        if i >= args.warmup:
            times.append(dt)
    out["times_s"] = times
    out["losses"] = losses
    if jax.default_backend() == "cpu":
        out["rss_peak_bytes"] = rss_peak_bytes() if rss_ok else None
    else:
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- PyTorch side


def torch_child(args) -> None:
    import torch
    import torch.nn.functional as F

    rss_ok = rss_reset()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.torch_dtype]
    leffa = args.variant == "torch_leffa"
    h_img, w_img, b = args.height, args.width, args.batch
    lam, tau, t_threshold, p_drop = 1e-3, 2.0, 500, 0.1
    torch.manual_seed(0)

    ctx_state = {"flows": []}

    def wanted(hw) -> bool:
        return hw[0] >= h_img / 32 - 1e-9 and hw[1] >= w_img / 32 - 1e-9

    coords_cache: dict = {}

    def coords(hh, ww):
        key = (hh, ww)
        if key not in coords_cache:
            xs = torch.linspace(-1, 1, ww, device=dev)
            ys = torch.linspace(-1, 1, hh, device=dev)
            coords_cache[key] = torch.stack(
                [xs[None, :].expand(hh, ww), ys[:, None].expand(hh, ww)], -1).reshape(-1, 2)
        return coords_cache[key]

    def heads(attn, x):
        bb, n, cc = x.shape
        return x.view(bb, n, attn.heads, cc // attn.heads).transpose(1, 2)

    class Record:  # reference UNet: keep norm1 output, plain self-attention
        def __init__(self, store):
            self.store = store

        def __call__(self, attn, hidden_states, *a, **kw):
            self.store.append(hidden_states)
            x = hidden_states
            q, k, v = heads(attn, attn.to_q(x)), heads(attn, attn.to_k(x)), heads(attn, attn.to_v(x))
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
            return attn.to_out[0](o)

    class Concat:  # generative UNet: keys/values over [own; reference], (+ Leffa flow)
        def __init__(self, store):
            self.store = store

        def __call__(self, attn, hidden_states, *a, **kw):
            x = hidden_states
            bb, n, cc = x.shape
            ref = self.store.pop(0)
            kv = torch.cat([x, ref], dim=1)
            q, k, v = heads(attn, attn.to_q(x)), heads(attn, attn.to_k(kv)), heads(attn, attn.to_v(kv))
            if leffa:
                hw = layer_hw(n, latent_hw)
                if wanted(hw):
                    d = q.shape[-1]
                    s = q.float() @ k[:, :, n:].float().transpose(-1, -2) / (tau * math.sqrt(d))
                    a_map = torch.softmax(s, dim=-1).mean(1)  # (B, N, N)
                    ctx_state["flows"].append((a_map @ coords(*hw)).view(bb, hw[0], hw[1], 2))
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
            return attn.to_out[0](o)

    class Identity:  # cross-attention removed: h = h + norm2(h)
        def __call__(self, attn, hidden_states, *a, **kw):
            return hidden_states

    def set_procs(unet, attn1):
        unet.set_attn_processor({k: (attn1 if k.endswith("attn1.processor") else Identity())
                                 for k in unet.attn_processors})

    ucfg = UNet2DConditionModel.load_config(os.path.join(args.config, "unet"))
    ref_unet = UNet2DConditionModel.from_config({**ucfg, "in_channels": 4}).to(dev)
    gen_unet = UNet2DConditionModel.from_config({**ucfg, "in_channels": 12}).to(dev)
    vae = AutoencoderKL.from_config(
        AutoencoderKL.load_config(os.path.join(args.config, "vae"))).to(dev).eval()
    vae.requires_grad_(False)
    store: list = []
    set_procs(ref_unet, Record(store))
    set_procs(gen_unet, Concat(store))
    ref_unet.train()
    gen_unet.train()
    with open(os.path.join(args.config, "scheduler", "scheduler_config.json")) as f:
        sched = DDPMScheduler.from_config(json.load(f))
    sched.alphas_cumprod = sched.alphas_cumprod.to(dev)
    sf = vae.config.scaling_factor
    f = 2 ** (len(vae.config.block_out_channels) - 1)  # VAE downsampling (8 for SD)
    latent_hw = (h_img // f, w_img // f)
    ctx = torch.zeros(b, 1, ucfg["cross_attention_dim"], device=dev)
    params = [p for m in (ref_unet, gen_unet) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    ema_decay = 0.9999

    def autocast():
        if amp_dtype is None:
            return torch.autocast(dev, enabled=False)
        return torch.autocast(dev, dtype=amp_dtype)

    def leffa_loss(flows, ref, target, m, t):
        losses = []
        for fl in flows:
            g = F.interpolate(fl.permute(0, 3, 1, 2), size=(h_img, w_img), mode="bilinear",
                              align_corners=False).clamp(-1, 1).permute(0, 2, 3, 1)
            warped = F.grid_sample(ref, g, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)
            diff = warped * m - target * m
            losses.append((diff * diff).mean(dim=(1, 2, 3)))
        per = torch.stack(losses).mean(0)
        return lam * (per * (t < t_threshold).float()).mean()

    def step(batch):
        person, garment, mask, dp, gmask = (batch[k] for k, _ in BATCH_CHANNELS)
        with torch.no_grad(), autocast():
            z = vae.encode(person).latent_dist.sample() * sf
            zm = vae.encode(person * (mask < 0.5)).latent_dist.sample() * sf
            zr = vae.encode(garment).latent_dist.sample() * sf
        z, zm, zr = z.float(), zm.float(), zr.float()
        drop = torch.rand(b, device=dev) < p_drop
        zr = torch.where(drop[:, None, None, None], torch.zeros_like(zr), zr)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=dev)
        noise = torch.randn_like(z)
        zt = sched.add_noise(z, noise, t)
        gen_in = torch.cat([zt, mask[:, :, ::f, ::f], zm, dp[:, :, ::f, ::f]], dim=1)
        store.clear()
        ctx_state["flows"] = []
        with autocast():
            ref_unet(zr, t, encoder_hidden_states=ctx)
            eps = gen_unet(gen_in, t, encoder_hidden_states=ctx).sample
        mse = F.mse_loss(eps.float(), noise)
        loss = mse
        lf = torch.zeros((), device=dev)
        if leffa:
            t_gate = torch.where(drop, torch.full_like(t, sched.config.num_train_timesteps), t)
            lf = leffa_loss(ctx_state["flows"], garment, person, gmask, t_gate)
            loss = loss + lf
        opt.zero_grad(set_to_none=False)  # keeps zero grads for unreachable params
        loss.backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        finite = bool(torch.isfinite(loss) & torch.isfinite(gnorm))
        if finite:
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - ema_decay)
        return {"loss": float(loss.detach()), "mse": float(mse.detach()),
                "leffa": float(lf.detach()), "grad_norm": float(gnorm)}

    g = torch.Generator().manual_seed(0)
    batch = {}
    for k, ch in BATCH_CHANNELS:
        if k in ("mask", "garment_mask"):
            x = (torch.rand(b, ch, h_img, w_img, generator=g) > 0.5).float()
        else:
            x = torch.rand(b, ch, h_img, w_img, generator=g) * 2 - 1
        batch[k] = x.to(dev)
    out = {"variant": args.variant, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "dtype": args.torch_dtype, "threads": torch.get_num_threads(),
           "trainable_params": int(sum(p.numel() for p in params))}
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step(batch))  # the float() calls synchronise
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    out["times_s"] = times
    out["losses"] = losses
    if cuda:
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["rss_peak_bytes"] = rss_peak_bytes() if rss_ok else None
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver


def _child_cmd(args, variant: str, h: int, w: int) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--config",
           args.config, "--height", str(h), "--width", str(w), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype,
           "--torch-dtype", args.torch_dtype, "--attention-kernel", args.attention_kernel]
    if args.remat:
        cmd.append("--remat")
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    if args.compile_only:
        cmd.append("--compile-only")
    return cmd


class Child:
    def __init__(self, args, variant, h, w, log_dir):
        self.variant = variant
        self.log = os.path.join(log_dir, f"{variant}_{h}x{w}.log")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   XLA_PYTHON_CLIENT_PREALLOCATE="false")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(_child_cmd(args, variant, h, w), cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "w"), text=True)

    def expect(self, tag: str) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                with open(self.log) as f:
                    tail = f.read()[-4000:]
                raise SystemExit(f"{self.variant}: child exited ({self.proc.returncode}) "
                                 f"before {tag}; its stderr ends:\n{tail}")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])

    def go(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        res = self.expect("RESULT")
        self.proc.wait()
        return res


def run_size(args, h: int, w: int, log_dir: str) -> dict:
    jax_vs = [v for v in args.variants if v.startswith("jax")]
    torch_vs = [] if args.compile_only else [v for v in args.variants if v.startswith("torch")]
    res: dict = {}
    # 1. compile the JAX variants, `--jobs` at a time; each then waits for its turn
    pending, ready = list(jax_vs), []
    running: list[Child] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            running.append(Child(args, pending.pop(0), h, w, log_dir))
        ch = running.pop(0)
        info = ch.expect("COMPILED")
        print(f"  {h}x{w} {ch.variant}: compiled in {info['compile_s']:.0f} s "
              f"({info['flops'] / 1e12 if info['flops'] else float('nan'):.3f} TFLOP/step)",
              file=sys.stderr, flush=True)
        res[ch.variant] = info
        ready.append(ch)
    if args.compile_only:
        for ch in ready:
            ch.proc.stdin.close()
            ch.proc.wait()
        return res
    # 2. time every variant alone
    for ch in ready:
        res[ch.variant] = ch.go()
        print(f"  {h}x{w} {ch.variant}: {statistics.median(res[ch.variant]['times_s']):.2f} "
              "s/step", file=sys.stderr, flush=True)
    for v in torch_vs:
        ch = Child(args, v, h, w, log_dir)
        res[v] = ch.expect("RESULT")
        ch.proc.wait()
        print(f"  {h}x{w} {v}: {statistics.median(res[v]['times_s']):.2f} s/step",
              file=sys.stderr, flush=True)
    return res


def _fmt_bytes(x) -> str:
    return "" if x is None else f"{x / 2 ** 30:.2f}"


def table(results: dict) -> str:
    a = results["args"]
    peak = results["peak_tflops"]
    lines = [
        f"batch {a['batch']}, channels x{a['channel_mult']}, JAX {a['dtype']} "
        f"(remat={a['remat']}, attention {a['attention_kernel']}), PyTorch {a['torch_dtype']}; "
        f"MFU peak {peak:.3f} TFLOP/s ({results['peak_note']})", "",
        "| size | variant | s/step | images/s | TFLOP/step (XLA) | MFU | peak mem GiB xla / "
        "measured | speed-up vs PyTorch | Leffa overhead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, res in results["sizes"].items():
        def med(v, res=res):
            r = res.get(v)
            return statistics.median(r["times_s"]) if r and r.get("times_s") else None

        for v in VARIANTS:
            if v not in res:
                continue
            r = res[v]
            t = med(v)
            jax_twin = "jax" if v == "torch" else ("jax_leffa" if v == "torch_leffa" else v)
            flops = res.get(jax_twin, {}).get("flops")
            mem_meas = r.get("rss_peak_bytes", r.get("device_peak_bytes"))
            cols = [size, v + ("" if v.startswith("jax") or flops is None else " (JAX count)"),
                    "" if t is None else f"{t:.3f}",
                    "" if t is None else f"{a['batch'] / t:.3f}",
                    "" if flops is None else f"{flops / 1e12:.3f}",
                    "" if t is None or flops is None else f"{100 * flops / t / (peak * 1e12):.1f} %",
                    f"{_fmt_bytes(r.get('xla_peak_bytes')) or '-'} / {_fmt_bytes(mem_meas) or '-'}"]
            twin = {"jax": "torch", "jax_leffa": "torch_leffa", "jax_leffa_mat": "torch_leffa"}
            tt = med(twin.get(v, ""))
            cols.append(f"{tt / t:.2f}x" if t and tt else "")
            base = med("jax" if v.startswith("jax") else "torch")
            cols.append(f"{100 * (t / base - 1):+.1f} %" if t and base and "leffa" in v else "")
            lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "speed-up vs PyTorch = PyTorch s/step / JAX s/step (JAX Leffa rows vs "
              "torch_leffa); Leffa overhead = s/step vs the same framework's no-Leffa row."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None,
                    help=f"base config folder (default $LEFFA_SD15_CONFIG or {DEFAULT_CONFIG})")
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="HxW image sizes (default 512x384 1024x768 on GPU, 128x96 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 on GPU, 1 on CPU")
    ap.add_argument("--channel-mult", type=float, default=None,
                    help="block-width multiplier of both UNets and the VAE (default 1 on GPU, "
                         "0.5 on CPU, where the full model's step state exceeds 24 GiB)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 2 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 GPU, 1 CPU")
    ap.add_argument("--dtype", default=None, help="JAX compute dtype (bfloat16 GPU, float32 CPU)")
    ap.add_argument("--torch-dtype", default=None,
                    help="PyTorch autocast dtype (bfloat16 GPU; float32 = no autocast, CPU)")
    ap.add_argument("--attention-kernel", default=None,
                    help="JAX attention kernel (default cudnn on GPU with bf16, else xla)")
    ap.add_argument("--remat", action="store_true",
                    help="config.train.remat (gradient checkpointing; XLA's FLOP count then "
                         "includes the recomputation)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--skip", nargs="+", default=[], choices=VARIANTS)
    ap.add_argument("--jobs", type=int, default=None,
                    help="JAX variants compiled at once (default 3 GPU host, 2 CPU)")
    ap.add_argument("--compile-only", action="store_true",
                    help="JAX FLOPs and XLA memory plan only (no state allocated, no timing)")
    ap.add_argument("--cache-dir", default=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                    help="JAX persistent compilation cache (default $JAX_COMPILATION_CACHE_DIR; "
                         "none): a second run skips the compiles")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--height", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.variant = args.child
        (jax_child if args.child.startswith("jax") else torch_child)(args)
        return 0

    gpu = has_gpu()
    args.sizes = args.sizes or (["512x384", "1024x768"] if gpu else ["128x96"])
    args.batch = args.batch or (4 if gpu else 1)
    args.channel_mult = args.channel_mult or (1.0 if gpu else 0.5)
    args.steps = args.steps or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.torch_dtype = args.torch_dtype or ("bfloat16" if gpu else "float32")
    args.attention_kernel = args.attention_kernel or (
        "cudnn" if gpu and args.dtype != "float32" else "xla")
    args.jobs = args.jobs or (3 if gpu else 2)
    args.variants = [v for v in args.variants if v not in args.skip]
    base = base_config_dir(args.config)
    tmp = tempfile.mkdtemp(prefix="train_step_bench_")
    args.config = scaled_config_dir(base, args.channel_mult, os.path.join(tmp, "config"))

    results: dict = {"args": {k: v for k, v in vars(args).items()
                              if k not in ("child", "height", "width", "variant")},
                     "base_config": base, "sizes": {}}
    if args.peak_tflops:
        results["peak_tflops"], results["peak_note"] = args.peak_tflops, "--peak-tflops"
    elif gpu:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout
        peak = next((v[args.dtype] for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak is None:
            raise SystemExit(f"unknown GPU {name.strip()!r}: pass --peak-tflops")
        results["peak_tflops"], results["peak_note"] = peak, f"{name.strip()} datasheet dense"
    else:
        results["peak_tflops"] = measured_matmul_tflops()
        results["peak_note"] = "measured float32 2048^3 matmul, this CPU"
    t0 = time.perf_counter()
    try:
        for size in args.sizes:
            h, w = (int(x) for x in size.lower().split("x"))
            if h % 8 or w % 8:
                raise SystemExit(f"--sizes {size}: height and width must be multiples of 8")
            results["sizes"][size] = run_size(args, h, w, tmp)
    finally:
        results["wall_s"] = time.perf_counter() - t0
        if not args.json:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.compile_only:
        for size, res in results["sizes"].items():
            for v, r in res.items():
                print(f"{size} {v}: {r['flops'] / 1e12:.3f} TFLOP/step, XLA plan "
                      f"{_fmt_bytes(r.get('xla_peak_bytes'))} GiB {r.get('xla_bytes')}, "
                      f"{r['trainable_params'] / 1e6:.0f} M trainable, compile "
                      f"{r['compile_s']:.0f} s")
    else:
        print(table(results))
    print(f"total wall {results['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
