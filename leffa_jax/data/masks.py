"""Garment-agnostic masks and garment regions from a human-parsing map and OpenPose keypoints.

Reproduces the official Leffa preprocessing (``leffa_utils/utils.py`` at commit 7848bed, logic from
IDM-VTON / OOTDiffusion): ``agnostic_mask_hd`` is ``get_agnostic_mask_hd`` (VITON-HD model) and
``agnostic_mask_dc`` is ``get_agnostic_mask_dc`` (DressCode model). Both work at 384x512 (W x H)
and return a (512, 384) uint8 mask in {0, 1}, 1 = region to generate. They use OpenCV's
morphology, flood fill and contour filling exactly as the official code does, so the outputs are
bit-identical (checked against ``shared/fixtures/masks/agnostic_masks.npz``).

Label schema ("ATR" + neck, as produced by the Leffa/OOTDiffusion human parser and used by
DressCode's ``label_maps``): 0 background, 1 hat, 2 hair, 3 sunglasses, 4 upper clothes, 5 skirt,
6 pants, 7 dress, 8 belt, 9 left shoe, 10 right shoe, 11 head, 12 left leg, 13 right leg,
14 left arm, 15 right arm, 16 bag, 17 scarf, 18 neck / torso skin.
VITON-HD's ``image-parse-v3`` uses the 20-label LIP schema; convert it with ``lip_to_atr``.

Keypoints: (18, 2) float (x, y) in OpenPose-18 (COCO) order, in pixels of the 384x512 frame;
a point with x <= 1 and y <= 1 counts as missing (OpenPose writes (0, 0)).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("upper_body", "lower_body", "dresses")
MASK_SIZE = (384, 512)  # (W, H) of the official mask computation

# ATR labels.
BACKGROUND, HAT, HAIR, SUNGLASSES, UPPER, SKIRT, PANTS, DRESS, BELT = range(9)
LEFT_SHOE, RIGHT_SHOE, HEAD, LEFT_LEG, RIGHT_LEG, LEFT_ARM, RIGHT_ARM, BAG, SCARF, NECK = range(
    9, 19
)

# LIP (VITON-HD image-parse-v3) -> ATR. LIP: 0 background, 1 hat, 2 hair, 3 glove, 4 sunglasses,
# 5 upper clothes, 6 dress, 7 coat, 8 socks, 9 pants, 10 torso skin, 11 scarf, 12 skirt, 13 face,
# 14 left arm, 15 right arm, 16 left leg, 17 right leg, 18 left shoe, 19 right shoe.
# Gloves count as arm (hands are part of the arm labels in ATR), socks as leg, coat as upper.
LIP_TO_ATR = np.array(
    [0, 1, 2, 14, 3, 4, 7, 4, 12, 6, 18, 17, 5, 11, 14, 15, 12, 13, 9, 10], dtype=np.uint8
)
# ATR -> LIP for the labels a writer of VITON-HD-layout parse maps needs.
ATR_TO_LIP = np.array(
    [0, 1, 2, 4, 5, 12, 9, 6, 0, 18, 19, 13, 16, 17, 14, 15, 0, 11, 10], dtype=np.uint8
)

# Garment region on the target per category (what the Leffa loss masks with).
GARMENT_LABELS = {
    "hd": {
        "upper_body": (UPPER, DRESS),
        "lower_body": (SKIRT, PANTS),
        "dresses": (UPPER, SKIRT, PANTS, DRESS),
    },
    "dc": {"upper_body": (UPPER,), "lower_body": (SKIRT, PANTS), "dresses": (DRESS,)},
}


def lip_to_atr(parse: np.ndarray) -> np.ndarray:
    """Map a LIP-schema parse map (VITON-HD ``image-parse-v3``) to the ATR+neck schema."""
    parse = np.asarray(parse)
    if parse.size and int(parse.max()) >= len(LIP_TO_ATR):
        raise ValueError(f"LIP parse label {int(parse.max())} out of range 0..19")
    return LIP_TO_ATR[parse]


def atr_to_lip(parse: np.ndarray) -> np.ndarray:
    """Inverse of ``lip_to_atr`` for the labels both schemas share (belt and bag become 0)."""
    return ATR_TO_LIP[np.asarray(parse)]


def garment_region(parse: np.ndarray, category: str, variant: str = "hd") -> np.ndarray:
    """(H, W) uint8 {0,1}: pixels of ``parse`` (ATR schema) that belong to the garment category."""
    _check_category(category)
    return np.isin(parse, GARMENT_LABELS[variant][category]).astype(np.uint8)


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"garment category must be one of {CATEGORIES}, got {category!r}")


def _as_parse(parse, size: tuple[int, int], resize: bool) -> np.ndarray:
    arr = np.asarray(parse)
    if arr.ndim != 2:
        raise ValueError(f"parse map must be (H, W) labels, got shape {arr.shape}")
    if resize and (arr.shape[1], arr.shape[0]) != size:
        arr = np.asarray(Image.fromarray(arr.astype(np.uint8)).resize(size, Image.NEAREST))
    return arr.astype(np.uint8)


def _as_keypoints(keypoints) -> np.ndarray:
    if isinstance(keypoints, dict):
        keypoints = keypoints["pose_keypoints_2d"]
    kp = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    if kp.shape[0] < 8:
        raise ValueError(f"need at least 8 OpenPose keypoints (0..7), got {kp.shape[0]}")
    return kp


def _hole_fill(img: np.ndarray) -> np.ndarray:
    """Zero the 1-pixel frame, flood the outside from (0, 0), OR the unreached holes back in."""
    img = np.pad(img[1:-1, 1:-1], 1, mode="constant", constant_values=0)
    original = img.copy()
    flood_mask = np.zeros((img.shape[0] + 2, img.shape[1] + 2), np.uint8)
    cv2.floodFill(img, flood_mask, (0, 0), 255)
    return cv2.bitwise_or(original, cv2.bitwise_not(img))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Fill the contour of largest area (OpenCV RETR_CCOMP / TC89_L1), as the official code."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_TC89_L1)
    out = np.zeros_like(mask, dtype=np.uint8)
    if contours:
        areas = [abs(cv2.contourArea(c, True)) for c in contours]
        cv2.drawContours(out, contours, areas.index(max(areas)), color=255, thickness=-1)
    return out


def _missing(p: np.ndarray) -> bool:
    return p[0] <= 1.0 and p[1] <= 1.0


def agnostic_mask_hd(
    parse,
    keypoints,
    category: str,
    size: tuple[int, int] = MASK_SIZE,
    *,
    arm_width: int = 60,
    protect_fixed: bool = False,
) -> np.ndarray:
    """VITON-HD-model agnostic mask, (size[1], size[0]) uint8 in {0, 1}.

    parse: (H, W) ATR labels (resized to ``size`` with nearest, as the official code);
    keypoints: (18, 2) OpenPose-18 (x, y) in the 384x512 frame, or ``{"pose_keypoints_2d": ...}``.
    protect_fixed=True is a corrected variant (not the official behaviour): the fixed regions
    (shoes, hat, sunglasses, bag, lower garment for upper_body, ...) are removed from the final
    mask, undoing the official erode + hole-fill side effect that can swallow them.
    """
    _check_category(category)
    width, height = size
    p = _as_parse(parse, size, resize=True)
    kp = _as_keypoints(keypoints)

    def lab(*labels):
        return np.isin(p, labels).astype(np.float32)

    head = lab(HAT, SUNGLASSES, HEAD)
    fixed = lab(LEFT_SHOE, RIGHT_SHOE, HAT, SUNGLASSES, BAG)
    changeable = lab(BACKGROUND)
    arm_l, arm_r = lab(LEFT_ARM), lab(RIGHT_ARM)

    if category == "dresses":
        target = lab(DRESS, UPPER, SKIRT, PANTS)
    elif category == "upper_body":
        target = lab(UPPER, DRESS)
        fixed += lab(SKIRT, PANTS)
    else:
        target = lab(PANTS, LEFT_LEG, RIGHT_LEG, SKIRT)
        fixed += lab(UPPER, LEFT_ARM, RIGHT_ARM)
    changeable += np.logical_and(p, np.logical_not(fixed))

    draw_l = Image.new("L", (width, height))
    draw_r = Image.new("L", (width, height))
    arms_l_img, arms_r_img = draw_l, draw_r
    if category in ("dresses", "upper_body"):
        s = height / 512.0
        sh_r, sh_l = kp[2] * s, kp[5] * s
        el_r, el_l = kp[3] * s, kp[6] * s
        wr_r, wr_l = kp[4] * s, kp[7] * s
        lw = int(arm_width / 512 * height)
        box_l = [sh_l[0] - lw // 2, sh_l[1] - lw // 2, sh_l[0] + lw // 2, sh_l[1] + lw // 2]
        box_r = [sh_r[0] - lw // 2, sh_r[1] - lw // 2, sh_r[0] + lw // 2, sh_r[1] + lw // 2]
        if _missing(wr_r):
            arms_r_img = arm_r
        else:
            wr_r = el_r + 1.2 * (wr_r - el_r)
            pts = np.concatenate((sh_r, el_r, wr_r)).astype(np.uint16).tolist()
            ImageDraw.Draw(draw_r).line(pts, "white", lw, "curve")
            ImageDraw.Draw(draw_r).arc(box_r, 0, 360, "white", lw // 2)
        if _missing(wr_l):
            arms_l_img = arm_l
        else:
            wr_l = el_l + 1.2 * (wr_l - el_l)
            pts = np.concatenate((wr_l, el_l, sh_l)).astype(np.uint16).tolist()
            ImageDraw.Draw(draw_l).line(pts, "white", lw, "curve")
            ImageDraw.Draw(draw_l).arc(box_l, 0, 360, "white", lw // 2)
        arms_l_arr = np.asarray(arms_l_img)
        arms_r_arr = np.asarray(arms_r_img)
        hands_l = np.logical_and(np.logical_not(arms_l_arr), arm_l)
        hands_r = np.logical_and(np.logical_not(arms_r_arr), arm_r)
        fixed += hands_l + hands_r

    fixed_before_erosion = fixed > 0
    fixed = cv2.erode(fixed, np.ones((5, 5), np.uint16), iterations=1)
    fixed = np.logical_or(fixed, head)
    target = cv2.dilate(target, np.ones((10, 10), np.uint16), iterations=5)
    if category in ("dresses", "upper_body"):
        neck = cv2.dilate(lab(NECK), np.ones((5, 5), np.uint16), iterations=1)
        neck = np.logical_and(neck, np.logical_not(head))
        target = np.logical_or(target, neck)
        arm_mask = cv2.dilate(
            np.logical_or(arms_l_arr, arms_r_arr).astype(np.float32),
            np.ones((5, 5), np.uint16),
            iterations=4,
        )
        target = np.logical_or(target, np.logical_or(target, arm_mask))

    keep = np.logical_or(np.logical_and(changeable, np.logical_not(target)), fixed)
    img = np.where(1 - keep, 255, 0).astype(np.uint8)
    out = (_largest_component(_hole_fill(img)) // 255).astype(np.uint8)
    if protect_fixed:
        out &= ~(fixed_before_erosion | (head > 0))
    return out


def agnostic_mask_dc(
    parse,
    keypoints,
    category: str,
    size: tuple[int, int] = MASK_SIZE,
    *,
    protect_fixed: bool = False,
) -> np.ndarray:
    """DressCode-model agnostic mask, (H, W) of ``parse`` uint8 in {0, 1}.

    As the official function, ``parse`` is used at its own size (pass a 384x512 map; the dataset
    readers resize with nearest first) and ``size`` only scales the drawn arms and dilations.
    """
    _check_category(category)
    p = _as_parse(parse, size, resize=False)
    kp = _as_keypoints(keypoints)
    width, height = size

    def lab(*labels):
        return np.isin(p, labels).astype(np.float32)

    head = lab(HAT, HAIR, SUNGLASSES, HEAD, NECK)
    fixed = lab(HAIR, LEFT_SHOE, RIGHT_SHOE, HAT, SUNGLASSES, SCARF, BAG)
    changeable = lab(BACKGROUND)
    arms = lab(LEFT_ARM, RIGHT_ARM)
    if category == "dresses":
        target = lab(DRESS, LEFT_LEG, RIGHT_LEG)
    elif category == "upper_body":
        target = lab(UPPER)
        fixed += lab(SKIRT, PANTS)
    else:
        target = lab(PANTS, LEFT_LEG, RIGHT_LEG)
        fixed += lab(UPPER, LEFT_ARM, RIGHT_ARM)
    changeable += np.logical_and(p, np.logical_not(fixed))

    if category in ("dresses", "upper_body"):
        s = height / 512.0
        sh_r, sh_l = tuple(kp[2] * s), tuple(kp[5] * s)
        el_r, el_l = tuple(kp[3] * s), tuple(kp[6] * s)
        wr_r, wr_l = tuple(kp[4] * s), tuple(kp[7] * s)
        if _missing(wr_r):
            if _missing(el_r):
                chain = [wr_l, el_l, sh_l, sh_r]
            else:
                chain = [wr_l, el_l, sh_l, sh_r, el_r]
        elif _missing(wr_l):
            if _missing(el_l):
                chain = [sh_l, sh_r, el_r, wr_r]
            else:
                chain = [el_l, sh_l, sh_r, el_r, wr_r]
        else:
            chain = [wr_l, el_l, sh_l, sh_r, el_r, wr_r]
        im_arms = Image.new("L", (width, height))
        ImageDraw.Draw(im_arms).line(chain, "white", 30, "curve")
        arms_drawn = np.asarray(im_arms).astype(np.float32)
        if height > 512:
            arms_drawn = cv2.dilate(arms_drawn, np.ones((10, 10), np.uint16), iterations=5)
        elif height > 256:
            arms_drawn = cv2.dilate(arms_drawn, np.ones((5, 5), np.uint16), iterations=5)
        hands = np.logical_and(np.logical_not(arms_drawn), arms)
        target += arms_drawn
        fixed += hands

    head_kept = head.copy()
    if category in ("dresses", "upper_body"):
        s = height / 512.0
        xs = [kp[2, 0] * s, kp[5, 0] * s]
        ys = [kp[2, 1] * s, kp[5, 1] * s]
        a = np.vstack([xs, np.ones(2)]).T
        m, c = np.linalg.lstsq(a, ys, rcond=None)[0]
        for i in range(p.shape[1]):
            y = i * m + c
            head_kept[int(y - 20 * s) :, i] = 0

    fixed_before = fixed > 0
    fixed = np.logical_or(fixed, head_kept.astype(np.uint16))
    target += np.logical_or(target, np.logical_and(head, np.logical_not(head_kept)))
    k = 20 if height > 512 else 10 if height > 256 else 5
    target = cv2.dilate(target, np.ones((k, k), np.uint16), iterations=5)
    keep = np.logical_or(np.logical_and(changeable, np.logical_not(target)), fixed)
    img = np.where(1 - keep, 255, 0).astype(np.uint8)
    out = (_hole_fill(img) // 255).astype(np.uint8)
    if protect_fixed:
        out &= ~(fixed_before | (head_kept > 0))
    return out


def agnostic_mask(parse, keypoints, category: str, variant: str = "hd", **kwargs) -> np.ndarray:
    """Dispatch to ``agnostic_mask_hd`` (variant "hd") or ``agnostic_mask_dc`` ("dc")."""
    if variant == "hd":
        return agnostic_mask_hd(parse, keypoints, category, **kwargs)
    if variant == "dc":
        return agnostic_mask_dc(parse, keypoints, category, **kwargs)
    raise ValueError(f"mask variant must be 'hd' or 'dc', got {variant!r}")
