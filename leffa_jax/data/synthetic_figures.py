"""Synthetic people, garments and warps: the drawing half of `leffa_jax.data.synthetic`
(see its docstring for the design frame and the warp model). Pure numpy + PIL, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from leffa_jax.data import masks

DW, DH = 384.0, 512.0  # design frame
LAYOUTS = ("viton_hd", "dresscode", "deepfashion")
GARMENT_LABEL = {"upper_body": masks.UPPER, "lower_body": masks.PANTS, "dresses": masks.DRESS}

# DensePose-like part indices (I) for the drawn body parts.
DP_TORSO, DP_RHAND, DP_LHAND, DP_LFOOT, DP_RFOOT = 2, 3, 4, 5, 6
DP_RUPLEG, DP_LUPLEG, DP_RLOLEG, DP_LLOLEG = 7, 8, 11, 12
DP_LUPARM, DP_RUPARM, DP_LLOARM, DP_RLOARM, DP_HEAD = 15, 16, 19, 20, 23


# ----------------------------------------------------------------------------- geometry
@dataclass
class Warp:
    """Smooth target -> reference map in the design frame (see module docstring)."""

    A: np.ndarray  # (2, 2)
    b: np.ndarray  # (2,)
    amp: np.ndarray  # (2,)
    period: np.ndarray  # (2,) = (period_x, period_y)
    phase: np.ndarray  # (2,)

    def __call__(self, X, Y):
        U = self.A[0, 0] * X + self.A[0, 1] * Y + self.b[0]
        U = U + self.amp[0] * np.sin(2 * np.pi * Y / self.period[1] + self.phase[0])
        V = self.A[1, 0] * X + self.A[1, 1] * Y + self.b[1]
        V = V + self.amp[1] * np.sin(2 * np.pi * X / self.period[0] + self.phase[1])
        return U, V

    def inverse(self, U, V, iters: int = 50):
        """Fixed-point inverse (the sinusoid is a small perturbation of the affine part)."""
        Ainv = np.linalg.inv(self.A)
        X, Y = np.asarray(U, np.float64), np.asarray(V, np.float64)
        for _ in range(iters):
            su = self.amp[0] * np.sin(2 * np.pi * Y / self.period[1] + self.phase[0])
            sv = self.amp[1] * np.sin(2 * np.pi * X / self.period[0] + self.phase[1])
            r0, r1 = U - self.b[0] - su, V - self.b[1] - sv
            X = Ainv[0, 0] * r0 + Ainv[0, 1] * r1
            Y = Ainv[1, 0] * r0 + Ainv[1, 1] * r1
        return X, Y

    def to_json(self) -> dict:
        return {
            "A": self.A.tolist(),
            "b": self.b.tolist(),
            "amp": self.amp.tolist(),
            "period": self.period.tolist(),
            "phase": self.phase.tolist(),
            "frame": [DW, DH],
            "formula": "see leffa_jax/data/synthetic.py module docstring",
        }

    @staticmethod
    def from_json(d: dict) -> Warp:
        return Warp(*(np.asarray(d[k], np.float64) for k in ("A", "b", "amp", "period", "phase")))


def flow_from_warp(warp: Warp, height: int, width: int) -> np.ndarray:
    """(H, W, 2) float32 normalised (x, y) reference coordinates of each target pixel centre."""
    X, Y = design_grid(height, width)
    U, V = warp(X, Y)
    return np.stack([2 * U / DW - 1, 2 * V / DH - 1], -1).astype(np.float32)


def design_grid(height: int, width: int):
    j = (np.arange(width) + 0.5) * DW / width
    i = (np.arange(height) + 0.5) * DH / height
    return np.meshgrid(j, i)


def _fit_warp(rng, src_a, src_b, dst_a, dst_b, width_src, width_dst, amp) -> Warp:
    """Affine taking the segment src_a->src_b (target) onto dst_a->dst_b (reference) with the given
    horizontal widths, plus a small random shear and sinusoid."""
    sy = (dst_b[1] - dst_a[1]) / (src_b[1] - src_a[1])
    sx = width_dst / width_src
    shear = rng.uniform(-0.06, 0.06)
    A = np.array([[sx, shear * sx], [rng.uniform(-0.04, 0.04) * sy, sy]])
    b = np.asarray(dst_a, np.float64) - A @ np.asarray(src_a, np.float64)
    return Warp(
        A=A,
        b=b,
        amp=rng.uniform(0.5, 1.0, 2) * amp,
        period=rng.uniform(160, 320, 2),
        phase=rng.uniform(0, 2 * np.pi, 2),
    )


# ----------------------------------------------------------------------------- figures
def random_skeleton(rng) -> np.ndarray:
    """(18, 2) OpenPose-18 keypoints (x, y) in the design frame for a standing, facing figure."""
    cx, cy = 192 + rng.uniform(-15, 15), 280 + rng.uniform(-8, 8)
    s = rng.uniform(0.93, 1.03)
    kp = np.zeros((18, 2))

    def at(dx, dy):
        return np.array([cx + s * dx, cy + s * dy])

    kp[0] = at(0, -200)
    kp[1] = at(0, -160)
    half = 50 * rng.uniform(0.9, 1.1)
    kp[2], kp[5] = at(-half, -150), at(half, -150)
    for sh, el, wr, sign in ((2, 3, 4, -1), (5, 6, 7, 1)):
        a1 = math.radians(rng.uniform(6, 32))
        a2 = a1 + math.radians(rng.uniform(-8, 20))
        kp[el] = kp[sh] + s * 78 * np.array([sign * math.sin(a1), math.cos(a1)])
        kp[wr] = kp[el] + s * 75 * np.array([sign * math.sin(a2), math.cos(a2)])
    kp[8], kp[11] = at(-24, -10), at(24, -10)
    for hip, knee, ankle, sign in ((8, 9, 10, -1), (11, 12, 13, 1)):
        kp[knee] = kp[hip] + s * np.array([sign * rng.uniform(0, 10), 108])
        kp[ankle] = kp[knee] + s * np.array([sign * rng.uniform(-4, 6), 98])
    kp[14], kp[15] = kp[0] + s * np.array([-10, -8]), kp[0] + s * np.array([10, -8])
    kp[16], kp[17] = kp[0] + s * np.array([-22, -4]), kp[0] + s * np.array([22, -4])
    return kp


def _canvas(h, w, fill=0):
    img = Image.new("L", (w, h), fill)
    return img, ImageDraw.Draw(img)


class _Drawer:
    """Draws design-frame shapes onto an (H, W) label canvas."""

    def __init__(self, h, w):
        self.h, self.w = h, w
        self.sx, self.sy = w / DW, h / DH
        self.img, self.d = _canvas(h, w)

    def p(self, pt):
        return (float(pt[0]) * self.sx, float(pt[1]) * self.sy)

    def line(self, pts, width, label):
        pts = [self.p(q) for q in pts]
        wpx = max(1, int(round(width * self.sx)))
        self.d.line(pts, fill=label, width=wpx, joint="curve")
        r = wpx / 2
        for x, y in (pts[0], pts[-1]):
            self.d.ellipse([x - r, y - r, x + r, y + r], fill=label)

    def ellipse(self, c, rx, ry, label):
        x, y = self.p(c)
        self.d.ellipse(
            [x - rx * self.sx, y - ry * self.sy, x + rx * self.sx, y + ry * self.sy], fill=label
        )

    def poly(self, pts, label):
        self.d.polygon([self.p(q) for q in pts], fill=label)

    def array(self):
        return np.asarray(self.img).copy()


def draw_body(kp, h, w, *, bottoms: str | None, top: bool):
    """Body label map (ATR + neck) and DensePose-like part map (I) before the try-on garment.

    Returns (labels_back, labels_front, parts): back layers are under the garment (legs, shoes,
    torso, other clothes), front layers above it (arms, neck, head, hair); 255 = not drawn.
    """
    back, parts = _Drawer(h, w), _Drawer(h, w)
    for hip, knee, ankle, lab, up, lo in (
        (8, 9, 10, masks.RIGHT_LEG, DP_RUPLEG, DP_RLOLEG),
        (11, 12, 13, masks.LEFT_LEG, DP_LUPLEG, DP_LLOLEG),
    ):
        back.line([kp[hip], kp[knee], kp[ankle]], 34, lab)
        parts.line([kp[hip], kp[knee]], 34, up)
        parts.line([kp[knee], kp[ankle]], 34, lo)
    for ankle, lab, dp in ((10, masks.RIGHT_SHOE, DP_RFOOT), (13, masks.LEFT_SHOE, DP_LFOOT)):
        c = kp[ankle] + np.array([0, 12])
        back.ellipse(c, 18, 10, lab)
        parts.ellipse(c, 18, 10, dp)
    torso = [kp[2] + (-8, -4), kp[5] + (8, -4), kp[11] + (12, 4), kp[8] + (-12, 4)]
    back.poly(torso, masks.NECK)
    parts.poly(torso, DP_TORSO)
    if bottoms == "pants":
        back.poly(
            [kp[8] + (-14, -8), kp[11] + (14, -8), kp[11] + (14, 20), kp[8] + (-14, 20)],
            masks.PANTS,
        )
        for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
            back.line([kp[hip], kp[knee], kp[ankle] + (0, -16)], 40, masks.PANTS)
    elif bottoms == "skirt":
        y0 = (kp[8][1] + kp[11][1]) / 2 - 12
        yk = (kp[9][1] + kp[12][1]) / 2 - 10
        back.poly(
            [(kp[8][0] - 14, y0), (kp[11][0] + 14, y0), (kp[12][0] + 40, yk), (kp[9][0] - 40, yk)],
            masks.SKIRT,
        )
    if top:
        back.poly(
            [kp[2] + (-12, -6), kp[5] + (12, -6), kp[11] + (14, 14), kp[8] + (-14, 14)], masks.UPPER
        )
        for sh, el in ((2, 3), (5, 6)):
            back.line([kp[sh], kp[sh] + 0.45 * (kp[el] - kp[sh])], 34, masks.UPPER)
    front, fparts = _Drawer(h, w), _Drawer(h, w)
    front.d.rectangle([0, 0, w, h], fill=255)
    fparts.d.rectangle([0, 0, w, h], fill=255)
    for sh, el, wr, lab, up, lo, hand in (
        (2, 3, 4, masks.RIGHT_ARM, DP_RUPARM, DP_RLOARM, DP_RHAND),
        (5, 6, 7, masks.LEFT_ARM, DP_LUPARM, DP_LLOARM, DP_LHAND),
    ):
        front.line([kp[sh] + 0.35 * (kp[el] - kp[sh]), kp[el], kp[wr]], 24, lab)
        front.ellipse(kp[wr] + 0.12 * (kp[wr] - kp[el]), 11, 12, lab)
        fparts.line([kp[sh], kp[el]], 24, up)
        fparts.line([kp[el], kp[wr]], 24, lo)
        fparts.ellipse(kp[wr] + 0.12 * (kp[wr] - kp[el]), 11, 12, hand)
    neck = [kp[1] + (-14, -34), kp[1] + (14, -34), kp[1] + (15, 6), kp[1] + (-15, 6)]
    front.poly(neck, masks.NECK)
    fparts.poly(neck, DP_TORSO)
    head_c = kp[0] + np.array([0, -4])
    front.ellipse(head_c + (0, -10), 33, 36, masks.HAIR)
    front.ellipse(head_c + (0, 4), 27, 33, masks.HEAD)
    fparts.ellipse(head_c + (0, -3), 33, 40, DP_HEAD)
    parts_arr = np.where(fparts.array() != 255, fparts.array(), parts.array())
    return back.array(), front.array(), parts_arr


# ----------------------------------------------------------------------------- garments
def garment_shape(category: str, h: int, w: int, rng) -> tuple[np.ndarray, dict]:
    """Flat garment mask (H, W) uint8 and its anchor points (design frame)."""
    d = _Drawer(h, w)
    if category == "upper_body":
        d.poly([(112, 150), (272, 150), (272, 420), (112, 420)], 1)
        d.poly([(112, 150), (58, 232), (88, 256), (112, 205)], 1)
        d.poly([(272, 150), (326, 232), (296, 256), (272, 205)], 1)
        d.ellipse((192, 146), 30, 18, 0)
        anchors = {"top": (192, 150), "bottom": (192, 420), "width": 160}
    elif category == "lower_body":
        d.poly([(122, 90), (262, 90), (262, 150), (122, 150)], 1)
        d.poly([(122, 150), (196, 150), (186, 470), (130, 470)], 1)
        d.poly([(188, 150), (262, 150), (254, 470), (198, 470)], 1)
        anchors = {"top": (192, 90), "bottom": (192, 470), "width": 140}
    else:
        d.poly([(130, 80), (254, 80), (254, 200), (130, 200)], 1)
        d.poly([(130, 200), (254, 200), (300, 460), (84, 460)], 1)
        d.ellipse((192, 76), 28, 16, 0)
        anchors = {"top": (192, 80), "bottom": (192, 460), "width": 124}
    return d.array(), anchors


class Texture:
    """Garment pattern in the design frame: one saturated colour of its own (so a try-on of
    another garment shows at a glance), shaded by a strong smooth two-dimensional ramp (brighter
    and greener with V, redder along U), with a broad band and a round badge of two more
    colours. The ramp gives every garment point a distinct colour neighbourhood even at 32x24
    (what makes the true correspondence recoverable from appearance, and the Leffa loss
    informative, at demo sizes); the band and badge are details a try-on must carry to the
    right place."""

    def __init__(self, rng):
        hue = rng.uniform(0, 1)
        self.c1 = _hsv(hue, rng.uniform(0.55, 0.85), rng.uniform(0.55, 0.8))
        self.c2 = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.8), rng.uniform(0.35, 0.85))
        self.c3 = _hsv(rng.uniform(0, 1), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))
        self.band = np.array([rng.uniform(260, 400), rng.uniform(18, 30)])  # centre V, half width
        self.badge = np.array([rng.uniform(150, 234), rng.uniform(170, 240)])

    def __call__(self, U, V) -> np.ndarray:
        t = 1.0 / (1.0 + np.exp((np.abs(V - self.band[0]) - self.band[1]) / 4.0))
        rgb = self.c1 * (1 - t[..., None]) + self.c2 * t[..., None]
        ramp_u = np.clip((U - 192) / 130, -1, 1)
        ramp_v = np.clip((V - 270) / 200, -1, 1)
        rgb = rgb * (0.9 + 0.25 * ramp_v[..., None])
        rgb = rgb + 55 * np.stack([ramp_u, ramp_v, -0.5 * (ramp_u + ramp_v)], -1)
        r2 = ((U - self.badge[0]) ** 2 + (V - self.badge[1]) ** 2) / 26.0**2
        wgt = np.exp(-r2)[..., None]
        rgb = rgb * (1 - wgt) + self.c3 * wgt
        return np.clip(rgb, 0, 255)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """RGB (3,) in [0, 255] of a hue (wrapped to [0, 1)), saturation and value in [0, 1]."""
    import colorsys

    return 255.0 * np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


# ----------------------------------------------------------------------------- rendering
def _colorize(labels, colors, h, w, rng):
    img = np.full((h, w, 3), 244.0)
    X, Y = design_grid(h, w)
    shade = 1.0 + 0.06 * np.sin(X / 23.0 + rng.uniform(0, 6)) * np.cos(Y / 31.0)
    for lab, col in colors.items():
        m = labels == lab
        img[m] = np.asarray(col)[None] * shade[m][:, None]
    return img


def _person_colors(rng):
    skin = rng.uniform([150, 100, 80], [235, 190, 160])
    return {
        masks.HEAD: skin,
        masks.NECK: skin,
        masks.LEFT_ARM: skin,
        masks.RIGHT_ARM: skin,
        masks.LEFT_LEG: skin,
        masks.RIGHT_LEG: skin,
        masks.HAIR: rng.uniform(10, 110, 3),
        masks.LEFT_SHOE: rng.uniform(10, 70, 3),
        masks.RIGHT_SHOE: rng.uniform(10, 70, 3),
        masks.UPPER: rng.uniform(40, 220, 3),
        masks.PANTS: rng.uniform(20, 120, 3),
        masks.SKIRT: rng.uniform(40, 200, 3),
        masks.DRESS: rng.uniform(40, 200, 3),
    }


def _dense_uv(parts):
    """Per-part U, V in 0..255 from the part's bounding box (rows -> U, columns -> V)."""
    h, w = parts.shape
    u = np.zeros((h, w), np.uint8)
    v = np.zeros((h, w), np.uint8)
    ii, jj = np.mgrid[0:h, 0:w]
    for p in np.unique(parts):
        if p == 0:
            continue
        m = parts == p
        ys, xs = ii[m], jj[m]
        u[m] = np.round(255 * (ys - ys.min()) / max(1, ys.max() - ys.min())).astype(np.uint8)
        v[m] = np.round(255 * (xs - xs.min()) / max(1, xs.max() - xs.min())).astype(np.uint8)
    return u, v


def densepose_rgb(parts):
    """DensePose segmentation rendered as colours (VITON-HD ``image-densepose`` look)."""
    idx = np.arange(25, dtype=np.float64) / 24.0
    pal = np.stack(
        [68 + 185 * idx, 1 + 230 * np.sin(np.pi * idx) ** 0.8, 84 + 120 * np.cos(np.pi * idx)], -1
    )
    pal = np.clip(pal, 0, 255).astype(np.uint8)
    pal[0] = 0
    return pal[parts]


def render_tryon(rng, h, w, category):
    """One try-on example. Returns a dict of arrays (person, garment, parse (ATR), keypoints
    (design frame), parts, garment_mask_flat, flow (H, W, 3)) and the warp."""
    kp = random_skeleton(rng)
    bottoms = None if category in ("lower_body", "dresses") else rng.choice(["pants", "skirt"])
    back, front, parts = draw_body(kp, h, w, bottoms=bottoms, top=category == "lower_body")
    shape, anc = garment_shape(category, h, w, rng)
    tex = Texture(rng)
    colors = _person_colors(rng)

    sh_mid = (kp[2] + kp[5]) / 2
    hip_mid = (kp[8] + kp[11]) / 2
    if category == "upper_body":
        src_a, src_b = sh_mid + (0, -2), hip_mid + (0, 34)
        width_src = np.linalg.norm(kp[5] - kp[2]) + 12
    elif category == "lower_body":
        src_a = hip_mid + (0, -16)
        src_b = (kp[10] + kp[13]) / 2 + (0, -12)
        width_src = abs(kp[11][0] - kp[8][0]) + 60
    else:
        src_a, src_b = sh_mid + (0, -2), (kp[9] + kp[12]) / 2 + (0, 30)
        width_src = np.linalg.norm(kp[5] - kp[2]) + 8
    warp = _fit_warp(rng, src_a, src_b, anc["top"], anc["bottom"], width_src, anc["width"], amp=7.0)

    X, Y = design_grid(h, w)
    U, V = warp(X, Y)
    ui = np.clip(np.floor(U * w / DW).astype(int), -1, w)
    vi = np.clip(np.floor(V * h / DH).astype(int), -1, h)
    inside = (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    on_garment = np.zeros((h, w), bool)
    on_garment[inside] = shape[vi[inside], ui[inside]] > 0

    glabel = GARMENT_LABEL[category]
    labels = back.copy()
    labels[on_garment] = glabel
    labels = np.where(front != 255, front, labels).astype(np.uint8)
    valid = labels == glabel

    person = _colorize(labels, colors, h, w, rng)
    undressed = person.copy()
    person[valid] = tex(U[valid], V[valid])
    gU, gV = design_grid(h, w)
    garment = np.full((h, w, 3), 255.0)
    gm = shape > 0
    garment[gm] = tex(gU[gm], gV[gm])

    flow = np.zeros((h, w, 3), np.float32)
    flow[..., 0] = 2 * U / DW - 1
    flow[..., 1] = 2 * V / DH - 1
    flow[..., :2] *= valid[..., None]
    flow[..., 2] = valid
    return {
        "person": person.round().astype(np.uint8),
        "garment": garment.round().astype(np.uint8),
        "parse": labels,
        "keypoints": kp.astype(np.float32),
        "parts": parts.astype(np.uint8),
        "garment_mask_flat": gm.astype(np.uint8),
        "flow": flow,
        "texture": tex,
        "undressed": undressed,
        "garment_uv": (U, V),
        "garment_region": valid,
    }, warp


def wear(example: dict, texture: Texture) -> np.ndarray:
    """The person of a `render_tryon` example wearing another garment of the same category
    (its `texture`): the same figure, warp and garment region, the other garment's colours. For
    a category whose flat shape is fixed (all of them) this is the exact ground truth of the
    unpaired try-on (person, other garment)."""
    img = example["undressed"].copy()
    valid = example["garment_region"]
    U, V = example["garment_uv"]
    img[valid] = texture(U[valid], V[valid])
    return img.round().astype(np.uint8)


def render_pose_pair(rng, h, w):
    """Source person with a textured outfit and the target = source seen through a smooth warp."""
    kp = random_skeleton(rng)
    back, front, parts = draw_body(kp, h, w, bottoms="pants", top=True)
    labels = np.where(front != 255, front, back).astype(np.uint8)
    colors = _person_colors(rng)
    src = _colorize(labels, colors, h, w, rng)
    tex = Texture(rng)
    X, Y = design_grid(h, w)
    cloth = np.isin(labels, (masks.UPPER, masks.PANTS))
    src[cloth] = tex(X[cloth], Y[cloth])
    src = src.round().astype(np.uint8)
    du, dv = _dense_uv(parts)
    src_iuv = np.stack([dv, du, parts], -1).astype(np.uint8)

    ang = math.radians(rng.uniform(-6, 6))
    sc = rng.uniform(0.94, 1.06)
    A = sc * np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    shift = rng.uniform(-14, 14, 2)
    c = np.array([192.0, 280.0])
    warp = Warp(
        A=A,
        b=c + shift - A @ c,
        amp=rng.uniform(3, 7, 2),
        period=rng.uniform(160, 320, 2),
        phase=rng.uniform(0, 2 * np.pi, 2),
    )
    U, V = warp(X, Y)
    ui = np.floor(U * w / DW).astype(int)
    vi = np.floor(V * h / DH).astype(int)
    inside = (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    uic, vic = np.clip(ui, 0, w - 1), np.clip(vi, 0, h - 1)
    tgt_labels = np.where(inside, labels[vic, uic], 0).astype(np.uint8)
    tgt_iuv = np.where(inside[..., None], src_iuv[vic, uic], 0).astype(np.uint8)
    # bilinear sample of the source image at the warped pixel positions (white outside)
    px, py = U * w / DW - 0.5, V * h / DH - 0.5
    tgt = _bilinear(src.astype(np.float64), px, py, fill=244.0)
    valid = tgt_labels > 0
    flow = np.zeros((h, w, 3), np.float32)
    flow[..., 0] = (2 * U / DW - 1) * valid
    flow[..., 1] = (2 * V / DH - 1) * valid
    flow[..., 2] = valid
    kx, ky = warp.inverse(kp[:, 0], kp[:, 1])
    return {
        "source": src,
        "target": tgt.round().astype(np.uint8),
        "source_iuv": src_iuv,
        "target_iuv": tgt_iuv,
        "source_keypoints": kp.astype(np.float32),
        "target_keypoints": np.stack([kx, ky], -1).astype(np.float32),
        "flow": flow,
    }, warp


def _bilinear(img, px, py, fill):
    h, w = img.shape[:2]
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = (px - x0)[..., None], (py - y0)[..., None]
    out = 0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xx, yy = x0 + dx, y0 + dy
            ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            val = np.where(ok[..., None], img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], fill)
            out = out + wx * wy * val
    return out
