"""Pictures for debugging attention: flow fields (colour wheel), warped references, attention of
chosen query points over the reference image, and PNG grids.

    python -m leffa_jax.viz --checkpoint CKPT [--base-config DIR] --person P.png --garment G.png \
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

import jax
import jax.numpy as jnp
import numpy as np

from leffa_jax import flow as flow_lib


def to_uint8(img: np.ndarray) -> np.ndarray:
    """(..., 3) in [-1, 1] -> uint8 (the pipeline's (x/2+0.5).clip(0,1)*255, rounded)."""
    return np.round(np.clip(np.asarray(img, np.float32) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


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


def resize_nearest(img: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = (np.arange(h) * img.shape[0]) // h
    xs = (np.arange(w) * img.shape[1]) // w
    return img[ys][:, xs]


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


def grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile uint8 images (all resized to the first image's size) into rows, white padding."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = img if img.ndim == 3 else np.repeat(img[..., None], 3, -1)
            if img.shape[:2] != (h, w):
                img = resize_nearest(img, h, w)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = img[..., :3]
    return out


def save_png(path: str, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(img, np.uint8)).save(path)


def attention_pictures(model, person, garment, mask, densepose, *, t: int = 300,
                       layers=None, points=((0.5, 0.35), (0.5, 0.6)), seed: int = 0,
                       tau: float = 2.0) -> dict[str, np.ndarray]:
    """Run the model once on one pair (arrays (1,H,W,C) in [-1,1], mask {0,1}) at timestep t and
    return named uint8 pictures. The noisy latent is the person's latent noised to t."""
    from leffa_jax import schedulers
    from leffa_jax.objectives import attention_map_probe, flow_probe

    person, garment, mask, densepose = (jnp.asarray(x, jnp.float32)[None] if x.ndim == 3
                                        else jnp.asarray(x, jnp.float32)
                                        for x in (person, garment, mask, densepose))
    sf = model.scaling_factor
    f = model.vae.downsample_factor
    k1 = jax.random.PRNGKey(seed)
    latent = model.encode(person).mean * sf
    masked = model.encode(person * (mask < 0.5)).mean * sf
    ref = model.encode(garment).mean * sf
    sched = schedulers.make_schedule(model.scheduler_config())
    noisy = schedulers.add_noise(sched, latent, jax.random.normal(k1, latent.shape),
                                 jnp.array([t]))
    gen = jnp.concatenate([noisy, mask[:, ::f, ::f], masked, densepose[:, ::f, ::f]], -1)
    nl = model.unet.num_transformer_layers
    layers = tuple(range(nl)) if layers is None else tuple(layers)
    feats = model.reference_features(ref, jnp.array([t]))
    _, flows = model.predict_noise(gen, jnp.array([t]), feats, return_probes=True,
                                   probe=flow_probe(layers, tau, fused=False))
    maps = None
    if points:
        _, maps = model.predict_noise(gen, jnp.array([t]), feats, return_probes=True,
                                      probe=attention_map_probe(layers, 1.0))
    hh, ww = person.shape[1:3]
    res = model.unet.layer_resolutions(latent.shape[1:3])
    ref_u8 = to_uint8(garment[0])
    per_u8 = to_uint8(person[0])
    out = {}
    for i in layers:
        grid_ = flow_lib.flow_to_image_size(flows[i], hh, ww)
        out[f"flow_l{i:02d}"] = flow_to_rgb(np.asarray(grid_[0]))
        out[f"warped_l{i:02d}"] = to_uint8(flow_lib.warp(garment, grid_)[0])
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


def load_image(path: str, hw: tuple[int, int] | None, *, mask: bool = False) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        img = Image.open(path)
        img = img.convert("L" if mask else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e})") from None
    if hw is not None and img.size != (hw[1], hw[0]):
        img = img.resize((hw[1], hw[0]), Image.NEAREST if mask else Image.BICUBIC)
    a = np.asarray(img, np.float32) / 255.0
    return (a[..., None] >= 0.5).astype(np.float32) if mask else a * 2 - 1


def main(argv=None) -> int:
    from leffa_jax.model import LeffaModel

    ap = argparse.ArgumentParser(prog="python -m leffa_jax.viz", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--base-config", default=None)
    for name in ("person", "garment", "mask", "densepose"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--t", type=int, default=300)
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--layers", default=None, help="comma list of layer indices (default all)")
    ap.add_argument("--points", default="0.5,0.35;0.5,0.6",
                    help="query points as x,y in [0,1], separated by ';'")
    args = ap.parse_args(argv)
    model = LeffaModel.from_pretrained(args.checkpoint, args.base_config)
    person = load_image(args.person, None)
    hw = (args.height or person.shape[0], args.width or person.shape[1])
    person = load_image(args.person, hw)
    pics = attention_pictures(
        model, person, load_image(args.garment, hw), load_image(args.mask, hw, mask=True),
        load_image(args.densepose, hw), t=args.t, tau=args.tau,
        layers=None if args.layers is None else [int(x) for x in args.layers.split(",")],
        points=[tuple(map(float, p.split(","))) for p in args.points.split(";")])
    os.makedirs(args.out, exist_ok=True)
    for name, img in pics.items():
        save_png(os.path.join(args.out, f"{name}.png"), img)
    print(f"wrote {len(pics)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
