"""StoryMaker speed: the SDXL UNet with decoupled image-prompt attention + LoRA, leffa_jax vs
PyTorch (diffusers' UNet2DConditionModel with processors computing exactly the official
`LoRAIPAttnProcessor2_0` / `LoRAAttnProcessor2_0`: q/k/v/out + lora_scale * LoRA, the context
split at the literal 77, out = A_txt + ip_scale * A_ip), the same random weights on both sides
(torch init, converted with leffa_jax.weights.storymaker).

Rows:
- UNet forward: one call on the CFG batch (2B rows: [uncond, cond]), LoRA unmerged and merged
  (`nn.lora.merge_lora`; torch: the LoRA folded into the projection weights).
- sampling loop: K guided UniPC steps (leffa_jax `sampling.loop.denoise` +
  `systems.storymaker.storymaker_eps_fn`, jitted; torch: diffusers UniPCMultistepScheduler
  loop under inference_mode), LoRA merged on both sides. Text encoders, CLIP and the VAE are
  not part of the timed call (the same on both sides, and benchmarked in text2image.py).
The first JAX call compiles and is not timed. MFU (JAX): FLOPs of the UNet call from XLA's cost
analysis over the time and the device peak.

    python benchmarks/storymaker.py --dry-run              # seconds: tiny UNet, 1 step
    python benchmarks/storymaker.py                        # CPU: the fixture's tiny SDXL UNet
    python benchmarks/storymaker.py --model sdxl --json out.json   # GPU: SDXL 1024x1024, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import counted_flops, device_peak_flops, has_gpu, time_fn  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
TINY = os.path.join(SHARED, "fixtures", "storymaker", "config", "unet")
SDXL = os.path.join(SHARED, "configs", "stable-diffusion-xl-1.0-inpainting-0.1", "unet")
TEXT = 77


def _torch_processors(torch):
    nn, F = torch.nn, torch.nn.functional

    class LoRALinear(nn.Module):
        def __init__(self, fan_in, fan_out, rank):
            super().__init__()
            self.down = nn.Linear(fan_in, rank, bias=False)
            self.up = nn.Linear(rank, fan_out, bias=False)
            nn.init.normal_(self.down.weight, std=1 / rank)
            nn.init.normal_(self.up.weight, std=0.02)  # non-zero: the LoRA path does work

        def forward(self, x):
            return self.up(self.down(x))

    class Processor(nn.Module):
        """LoRA(IP)AttnProcessor2_0 of the official code (attention_processor_faceid.py)."""

        def __init__(self, hidden, cross_dim, rank):
            super().__init__()
            kv_in = cross_dim or hidden
            self.to_q_lora = LoRALinear(hidden, hidden, rank)
            self.to_k_lora = LoRALinear(kv_in, hidden, rank)
            self.to_v_lora = LoRALinear(kv_in, hidden, rank)
            self.to_out_lora = LoRALinear(hidden, hidden, rank)
            if cross_dim:
                self.to_k_ip = nn.Linear(cross_dim, hidden, bias=False)
                self.to_v_ip = nn.Linear(cross_dim, hidden, bias=False)
            self.scale, self.lora_scale, self.merged = 0.8, 0.8, False

        def merge(self, attn):
            with torch.no_grad():
                for name, lora in (("to_q", self.to_q_lora), ("to_k", self.to_k_lora),
                                   ("to_v", self.to_v_lora)):
                    getattr(attn, name).weight += self.lora_scale * lora.up.weight @ lora.down.weight
                attn.to_out[0].weight += (self.lora_scale * self.to_out_lora.up.weight
                                          @ self.to_out_lora.down.weight)
            self.merged = True

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     temb=None, *args, **kwargs):
            ls = 0.0 if self.merged else self.lora_scale
            h = hidden_states
            b = h.shape[0]
            q = attn.to_q(h) + (ls * self.to_q_lora(h) if ls else 0)
            ctx, ip = (h, None) if encoder_hidden_states is None else (
                encoder_hidden_states[:, :TEXT], encoder_hidden_states[:, TEXT:])
            k = attn.to_k(ctx) + (ls * self.to_k_lora(ctx) if ls else 0)
            v = attn.to_v(ctx) + (ls * self.to_v_lora(ctx) if ls else 0)
            heads = attn.heads
            split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
            qh = split(q)
            out = F.scaled_dot_product_attention(qh, split(k), split(v))
            if ip is not None:
                out = out + self.scale * F.scaled_dot_product_attention(
                    qh, split(self.to_k_ip(ip)), split(self.to_v_ip(ip)))
            out = out.transpose(1, 2).reshape(b, -1, q.shape[-1])
            return attn.to_out[0](out) + (ls * self.to_out_lora(out) if ls else 0)

    return Processor


def build_models(config_dir: str, rank: int, dtype: str):
    """(torch UNet with StoryMaker processors, leffa_jax StoryMaker UNet), same weights."""
    import diffusers
    import torch
    from flax import nnx

    from leffa_jax.nn.config import UNetConfig
    from leffa_jax.nn.resampler import ResamplerConfig
    from leffa_jax.nn.unet import UNet
    from leffa_jax.systems import storymaker as sm
    from leffa_jax.weights import storymaker as smw
    from leffa_jax.weights.leaf_rules import torch_to_flax_leaf
    from leffa_jax.weights.modules import flat_to_nested

    with open(os.path.join(config_dir, "config.json")) as f:
        config = {**json.load(f), "in_channels": 4}
    torch.manual_seed(0)
    tunet = diffusers.UNet2DConditionModel.from_config(config).eval()
    processor = _torch_processors(torch)
    d = tunet.config.cross_attention_dim
    procs = {}
    for name in tunet.attn_processors:
        attn = tunet.get_submodule(name.removesuffix(".processor"))
        procs[name] = processor(attn.to_q.weight.shape[0], d if name.endswith("attn2.processor")
                                else None, rank)
    tunet.set_attn_processor(procs)
    base = {k: torch_to_flax_leaf(k, v.float().numpy()) for k, v in tunet.state_dict().items()
            if "processor" not in k}
    flat = dict(base.values())
    ip = {k: v.float().numpy() for k, v in
          torch.nn.ModuleList(tunet.attn_processors.values()).state_dict().items()}
    jconfig = UNetConfig.from_dict({**config, "_source": config_dir})
    graphdef, state = nnx.split(UNet(jconfig, rngs=nnx.Rngs(0)))  # concrete: eval_shape is slow
    nnx.replace_by_pure_dict(state, flat_to_nested(flat))
    jbase = nnx.merge(graphdef, state)
    adapter = sm.AdapterConfig(d, 1280, ResamplerConfig(d, 4, 64, d // 64, 1280, d),
                               ResamplerConfig(1280, 4, 64, 20, 1280, d), lora_rank=rank)
    paths = [p for p, _ in sm.processor_layout(jconfig)]
    junet = sm.attach_adapter(jbase, adapter, smw.processor_params_to_unet(ip, paths),
                              lora_scale=0.8)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tunet.to(device, tdtype), junet, device, tdtype


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import UniPCMultistepScheduler
    from flax import nnx

    from leffa_jax.nn.lora import merge_lora
    from leffa_jax.sampling.loop import denoise
    from leffa_jax.sampling.steppers import make_stepper
    from leffa_jax.schedulers import make_schedule
    from leffa_jax.systems import storymaker as sm

    config_dir = TINY if args.model == "tiny" else SDXL
    tunet, junet, device, tdtype = build_models(config_dir, args.rank, args.dtype)
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    cfg = junet.config
    b, h, w = args.batch, args.height // 8, args.width // 8
    tokens = 20 * (args.characters + 1)
    rng = np.random.default_rng(0)
    ctx = rng.standard_normal((2 * b, TEXT + tokens, cfg.cross_attention_dim), np.float32)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    pooled = rng.standard_normal((2 * b, pooled_dim), np.float32)
    time_ids = np.tile(np.array([[args.height, args.width, 0, 0, args.height, args.width]],
                                np.float32), (2 * b, 1))
    x = rng.standard_normal((2 * b, h, w, 4), np.float32)
    rows = []

    def jax_unet():
        graphdef, state = nnx.split(junet)

        def forward(state, x, ctx, pooled, time_ids):
            unet = nnx.merge(graphdef, state)
            return sm.unet_forward(unet, x, 500, ctx, text_embeds=pooled, time_ids=time_ids,
                                   ip_scale=0.8, attention_kernel=args.attention_kernel).sample

        call = jax.jit(forward)
        state = jax.tree.map(lambda a: a.astype(jdtype) if a.dtype == jnp.float32 else a, state)
        inputs = [jnp.asarray(a, jdtype) for a in (x, ctx, pooled)] + [jnp.asarray(time_ids)]
        seconds = time_fn(lambda: call(state, *inputs), iters=args.iters)
        return seconds, counted_flops(forward, state, *inputs)

    def torch_unet():
        tx = torch.tensor(x.transpose(0, 3, 1, 2), device=device, dtype=tdtype)
        tc = torch.tensor(ctx, device=device, dtype=tdtype)
        added = {"text_embeds": torch.tensor(pooled, device=device, dtype=tdtype),
                 "time_ids": torch.tensor(time_ids, device=device, dtype=tdtype)}
        sync = (lambda r: torch.cuda.synchronize()) if device == "cuda" else (lambda r: r)
        with torch.inference_mode():
            return time_fn(lambda: tunet(tx, 500, tc, added_cond_kwargs=added).sample,
                           iters=args.iters, sync=sync)

    peak = device_peak_flops() or None
    for merged in (False,) if args.dry_run else (False, True):
        if merged:
            merge_lora(junet)
            for name, proc in tunet.attn_processors.items():
                proc.merge(tunet.get_submodule(name.removesuffix(".processor")))
        tj, flops = jax_unet()
        tt = torch_unet()
        mfu = f"{100 * flops / tj / peak:.1f} %" if flops and peak else ""
        rows.append([f"StoryMaker UNet forward ({args.model}, {2 * b}x{args.height}x{args.width}"
                     f", {args.characters} char, {args.dtype})",
                     "LoRA merged" if merged else "LoRA unmerged", f"{tj * 1e3:.1f} ms",
                     f"{tt * 1e3:.1f} ms", f"{tt / tj:.2f}x", mfu])
        print(rows[-1], flush=True)

    if args.dry_run:
        return {"args": vars(args), "rows": rows}
    # sampling loop, LoRA merged on both sides
    schedule_cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "num_train_timesteps": 1000, "timestep_spacing": "leading",
                    "steps_offset": 1, "prediction_type": "epsilon"}
    schedule = make_schedule(schedule_cfg)
    stepper = make_stepper("unipc", schedule, args.steps)
    graphdef, state = nnx.split(junet)
    state = jax.tree.map(lambda a: a.astype(jdtype) if a.dtype == jnp.float32 else a, state)

    @jax.jit
    def sample(state, noise, conditions):
        model = type("M", (), {"unet": nnx.merge(graphdef, state)})
        eps_fn = sm.storymaker_eps_fn(model, 7.5, 0.8, compute_dtype=jdtype,
                                      attention_kernel=args.attention_kernel)
        return denoise(stepper, eps_fn, noise, conditions)[0]

    conditions = (jnp.asarray(ctx, jdtype), jnp.asarray(pooled, jdtype), jnp.asarray(time_ids))
    noise = jnp.asarray(x[:b])
    tj = time_fn(lambda: sample(state, noise, conditions), iters=max(1, args.iters // 2))
    scheduler = UniPCMultistepScheduler(**schedule_cfg)
    tc = torch.tensor(ctx, device=device, dtype=tdtype)
    added = {"text_embeds": torch.tensor(pooled, device=device, dtype=tdtype),
             "time_ids": torch.tensor(time_ids, device=device, dtype=tdtype)}
    tnoise = torch.tensor(x[:b].transpose(0, 3, 1, 2), device=device)

    def torch_sample():
        scheduler.set_timesteps(args.steps)
        lat = tnoise.clone()
        with torch.inference_mode():
            for t in scheduler.timesteps:
                eps = tunet(torch.cat([lat] * 2).to(tdtype), t, tc,
                            added_cond_kwargs=added).sample.float()
                u, c = eps.chunk(2)
                lat = scheduler.step(u + 7.5 * (c - u), t, lat).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()
        return lat

    tt = time_fn(torch_sample, iters=max(1, args.iters // 2), sync=lambda r: r)
    rows.append([f"StoryMaker sampling loop ({args.model}, B={b}, {args.steps} UniPC steps, "
                 f"{args.height}x{args.width}, {args.dtype})", "LoRA merged",
                 f"{tj:.3f} s", f"{tt:.3f} s", f"{tt / tj:.2f}x", ""])
    print(rows[-1], flush=True)
    return {"args": vars(args), "rows": rows}


def main(argv=None) -> int:
    gpu = has_gpu()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "sdxl"), default="sdxl" if gpu else "tiny",
                    help="UNet config: the StoryMaker fixture's tiny SDXL, or SDXL 1.0")
    ap.add_argument("--height", type=int, default=1024 if gpu else 128)
    ap.add_argument("--width", type=int, default=1024 if gpu else 192)
    ap.add_argument("--batch", type=int, default=1, help="images (the UNet sees 2x for CFG)")
    ap.add_argument("--characters", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25 if gpu else 4)
    ap.add_argument("--rank", type=int, default=None,
                    help="LoRA rank (default: 128 as released; the tiny model: 4 as the fixture)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    default="bfloat16" if gpu else "float32")
    ap.add_argument("--attention-kernel", default="xla")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny UNet, 64x64, the unmerged forward row only, 1 timing iteration "
                         "(checks the script runs)")
    ap.add_argument("--json", help="write {args, rows} here (GPU suite)")
    args = ap.parse_args(argv)
    if args.rank is None:
        args.rank = 128 if args.model == "sdxl" else 4
    if args.dry_run:
        args.model, args.height, args.width, args.steps, args.iters = "tiny", 64, 64, 1, 1
        args.rank, args.dtype = 4, "float32"
    t0 = time.time()
    result = run(args)
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
