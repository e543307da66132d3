"""Pictures for debugging attention: flow fields (colour wheel), warped references, attention of
chosen query points over the reference image, and PNG grids.

    python -m leffa_jax.viz --checkpoint CKPT [--base-config DIR] --person P.png --garment G.png \\
        --mask M.png --densepose D.png --out DIR [--t 300] [--points "0.5,0.35;0.5,0.6"]

Writes, per selected layer l: `flow_l{l:02d}.png` (colour-coded displacement from the identity:
hue = direction, brightness = magnitude), `warped_l{l:02d}.png` (the reference image warped by the
flow, what the Leffa loss compares inside the mask) and `attention_l{l:02d}.png` (for each query
point, its attention over the reference image as a heat map), plus `overview.png`.
Images are NHWC float in [-1, 1]; flows hold (x, y) in [-1, 1].
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np

from leffa_jax import checks, cli, imageio
from leffa_jax import flow as flow_lib
from leffa_jax.imageio import grid, resize_nearest, save_png, to_uint8

__all__ = ["flow_to_rgb", "heatmap", "attention_overlay", "grid", "attention_pictures",
           "load_input", "save_png", "to_uint8", "main"]


def flow_to_rgb(flow: np.ndarray, max_disp: float | None = None) -> np.ndarray:
    """(h, w, 2) absolute sampling coordinates in [-1, 1] -> (h, w, 3) uint8 colour wheel of the
    displacement from the identity grid (hue = angle, value = magnitude / max_disp)."""
    flow = np.asarray(flow, np.float32)
    h, w = flow.shape[:2]
    ident = np.asarray(flow_lib.coordinate_map(h, w)).reshape(h, w, 2)
    d = flow - ident
    mag = np.hypot(d[..., 0], d[..., 1])
    max_disp = max_disp or max(float(mag.max()), 1e-6)
    hue = (np.arctan2(d[..., 1], d[..., 0]) / (2 * np.pi)) % 1.0
    val = np.clip(mag / max_disp, 0, 1)
    return hsv_to_rgb(hue, np.ones_like(hue), val)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros(h.shape + (3,), np.float32)
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        rgb[sel] = np.stack([r[sel], g[sel], b[sel]], -1)
    return np.round(rgb * 255).astype(np.uint8)


def heatmap(values: np.ndarray) -> np.ndarray:
    """(h, w) non-negative -> (h, w, 3) uint8, black -> red -> yellow -> white."""
    v = np.asarray(values, np.float32)
    v = v / max(float(v.max()), 1e-12)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return np.round(rgb * 255).astype(np.uint8)


def attention_overlay(ref_uint8: np.ndarray, attn_row: np.ndarray, hw: tuple[int, int],
                      alpha: float = 0.6) -> np.ndarray:
    """Blend the attention of one query (M,) over the reference tokens (h*w) onto the image."""
    hm = resize_nearest(heatmap(np.asarray(attn_row).reshape(hw)), *ref_uint8.shape[:2])
    return np.round((1 - alpha) * ref_uint8 + alpha * hm).astype(np.uint8)


def mark(img: np.ndarray, xy: tuple[float, float], colour=(0, 255, 0), r: int = 2) -> np.ndarray:
    """Draw a small square at normalised (x, y) in [0, 1]."""
    out = img.copy()
    y, x = int(xy[1] * (img.shape[0] - 1)), int(xy[0] * (img.shape[1] - 1))
    out[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1] = colour
    return out


def attention_pictures(model, person, garment, mask, densepose, *, t: int = 300,
                       layers=None, points=((0.5, 0.35), (0.5, 0.6)), seed: int = 0,
                       tau: float = 2.0) -> dict[str, np.ndarray]:
    """Run the model once on one pair (arrays (1,H,W,C) in [-1,1], mask {0,1}) at timestep t and
    return named uint8 pictures. The noisy latent is the person's latent noised to t."""
    from leffa_jax.evaluate import probe_inputs
    from leffa_jax.objectives import attention_map_probe, flow_probe

    person, garment, mask, densepose = (jnp.asarray(x, jnp.float32)[None] if x.ndim == 3
                                        else jnp.asarray(x, jnp.float32)
                                        for x in (person, garment, mask, densepose))
    gen, feats, t_batch = probe_inputs(model, person, garment, mask, densepose, t=t, seed=seed)
    nl = model.unet.num_transformer_layers
    layers = tuple(range(nl)) if layers is None else tuple(layers)
    _, flows = model.predict_noise(gen, t_batch, feats, return_probes=True,
                                   probe=flow_probe(layers, tau, fused=False))
    maps = None
    if points:
        _, maps = model.predict_noise(gen, t_batch, feats, return_probes=True,
                                      probe=attention_map_probe(layers, 1.0))
    hh, ww = person.shape[1:3]
    res = model.unet.layer_resolutions(gen.shape[1:3])
    ref_u8 = to_uint8(np.asarray(garment[0]))
    per_u8 = to_uint8(np.asarray(person[0]))
    out = {}
    for i in layers:
        grid_ = flow_lib.flow_to_image_size(flows[i], hh, ww)
        out[f"flow_l{i:02d}"] = flow_to_rgb(np.asarray(grid_[0]))
        out[f"warped_l{i:02d}"] = to_uint8(np.asarray(flow_lib.warp(garment, grid_)[0]))
        if not points:
            continue
        h, w = res[i]
        tiles = []
        for (px, py) in points:
            qi = min(int(py * h), h - 1) * w + min(int(px * w), w - 1)
            tiles.append(mark(per_u8, (px, py)))
            tiles.append(attention_overlay(ref_u8, np.asarray(maps[i][0, qi]), (h, w)))
        out[f"attention_l{i:02d}"] = grid([tiles])
    mask_u8 = np.repeat(np.round(np.asarray(mask[0]) * 255).astype(np.uint8), 3, -1)
    rows = [[per_u8, ref_u8, mask_u8]]
    rows += [[out[f"flow_l{i:02d}"], out[f"warped_l{i:02d}"]] for i in layers]
    out["overview"] = grid(rows)
    return out


def load_input(path: str, hw: tuple[int, int] | None, *, mask: bool = False) -> np.ndarray:
    """An image file -> (H, W, 3) float32 in [-1, 1], or a mask (H, W, 1) in {0, 1} (threshold
    at half range), resized to hw (bicubic; masks nearest) when given."""
    from PIL import Image

    img = imageio.load_image(path, "L" if mask else "RGB")
    if hw is not None and img.shape[:2] != tuple(hw):
        resample = Image.NEAREST if mask else Image.BICUBIC
        img = np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), resample))
    return (img[..., None] >= 128).astype(np.float32) if mask else imageio.to_model(img)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m leffa_jax.viz", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    arg = ap.add_argument
    arg("--checkpoint", required=True,
        help="official .pth/.safetensors (with --base-config) or a leffa_jax checkpoint folder")
    arg("--base-config", default=None,
        help="base config folder or bundled name (sd15-inpainting, sdxl-inpainting) for "
             "official checkpoints")
    arg("--person", required=True, help="person image (the generated/target side)")
    arg("--garment", required=True, help="reference image (garment, or source person)")
    arg("--mask", required=True, help="black/white mask in the person's frame (white = "
                                      "region to generate)")
    arg("--densepose", required=True, help="densepose image in the person's frame")
    arg("--out", required=True, help="output folder for the PNGs (checked writable first)")
    arg("--height", type=int, default=None,
        help="model input height, a multiple of the VAE factor; unset: the person's")
    arg("--width", type=int, default=None,
        help="model input width, a multiple of the VAE factor; unset: the person's")
    arg("--t", type=int, default=300, help="diffusion timestep the person latent is noised to, "
                                           "0 .. num_train_timesteps - 1")
    arg("--tau", type=float, default=2.0, help="softmax temperature of the flow (> 0)")
    arg("--layers", default=None,
        help="comma list of transformer layer indices, e.g. 0,3; unset: all layers")
    arg("--points", default="0.5,0.35;0.5,0.6",
        help="query points on the person as x,y in [0, 1] (0,0 = top left), separated by ';'")
    return ap


def parse_points(text: str) -> list[tuple[float, float]]:
    """"x,y;x,y" -> [(x, y), ...], each coordinate in [0, 1]; "" -> no points."""
    points = []
    for item in (p.strip() for p in text.split(";")):
        if not item:
            continue
        try:
            x, y = (float(v) for v in item.split(","))
        except ValueError:
            raise cli.UsageError(f"--points: {item!r} is not x,y (two numbers, e.g. "
                                 "0.5,0.35; points separated by ';')") from None
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise cli.UsageError(f"--points: {item!r} lies outside [0, 1] x [0, 1] (x, y are "
                                 "fractions of the width and height)")
        points.append((x, y))
    return points


def parse_layers(text: str | None, count: int | None = None) -> list[int] | None:
    """"0,3" -> [0, 3] (None -> all), checked against the model's `count` layers."""
    if text is None:
        return None
    try:
        layers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise cli.UsageError(f"--layers {text!r}: give a comma list of integers, e.g. 0,3") \
            from None
    bad = [i for i in layers if count is not None and not 0 <= i < count]
    if not layers or bad:
        raise cli.UsageError(f"--layers {text!r}: the model has {count} transformer layers, "
                             f"indices 0..{(count or 1) - 1}")
    return layers


def run(args) -> int:
    """Check the request, run the model once, write the pictures; -> how many."""
    from leffa_jax.model import LeffaModel

    points = parse_points(args.points)
    parse_layers(args.layers)
    cli.finite("--tau", args.tau)
    if args.tau <= 0:
        raise cli.UsageError(f"--tau must be > 0, got {args.tau:g}")
    if args.t < 0:
        raise cli.UsageError(f"--t must be >= 0, got {args.t}")
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value <= 0:
            raise cli.UsageError(f"{name} must be positive, got {value}")
    cli.check_output_folder(args.out)
    raw = {name: imageio.load_image(getattr(args, name), "L" if name == "mask" else "RGB")
           for name in ("person", "garment", "mask", "densepose")}  # bad files fail here
    for name in ("mask", "densepose"):
        imageio.check_same_frame(raw["person"].shape[:2], raw[name].shape[:2], args.person,
                                 getattr(args, name), name)
    model = LeffaModel.from_pretrained(args.checkpoint, args.base_config)
    horizon = int(model.scheduler_config().get("num_train_timesteps", 1000))
    if args.t >= horizon:
        raise cli.UsageError(f"--t must be < {horizon} (the model's num_train_timesteps), "
                             f"got {args.t}")
    layers = parse_layers(args.layers, model.unet.num_transformer_layers)
    factor = model.vae.downsample_factor
    hw = (args.height or raw["person"].shape[0], args.width or raw["person"].shape[1])
    if hw[0] <= 0 or hw[1] <= 0 or hw[0] % factor or hw[1] % factor:
        raise cli.UsageError(f"the model input size {hw[0]}x{hw[1]} must be positive multiples "
                             f"of {factor} (the VAE factor): give --height/--width")
    checks.check_memory(model, 1, *hw, fix="give a smaller --height/--width")
    pics = attention_pictures(
        model, load_input(args.person, hw), load_input(args.garment, hw),
        load_input(args.mask, hw, mask=True), load_input(args.densepose, hw), t=args.t,
        tau=args.tau, layers=layers, points=points)
    for name, img in pics.items():
        save_png(os.path.join(args.out, f"{name}.png"), img)
    return len(pics)


def main(argv=None) -> int:
    from leffa_jax.weights.tensor_io import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        count = run(args)
    except (cli.UsageError, FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"leffa_jax.viz: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
