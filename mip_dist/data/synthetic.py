"""Synthetic visible-infrared pedestrians written in the SYSU-MM01 (or RegDB) layout.

Why: the demo and the tests must run the same readers, shards and stream as the real (licensed)
datasets, on data where cross-modality matching is learnable but colour does not transfer.

Each identity has a body (height, build), hair, upper and lower garments (colour, pattern, sleeve or
leg length, MATERIAL), optional hat and bag, and a body heat. Visible cameras paint colours under a
per-camera illumination and background; infrared cameras paint a single-channel thermal image whose
brightness is body heat times the garment material's emission: the same material looks the same in
infrared whatever its colour, while its weave (denim diagonals, quilting, wool fuzz, leather sheen),
the geometry of printed patterns (an ink layer that emits a little less, whatever its colour) and
the silhouette are visible in both modalities. Rendering is vectorised numpy on coordinate grids;
identities are rendered in parallel; everything is seeded by (seed, pid, camera, image index).
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

GENERATOR_VERSION = 4
MARKER = ".synthetic.json"
LAYOUTS = ("sysu", "regdb")

# Garment materials: infrared emission factor (x body heat) and a weave seen in both modalities.
MATERIALS: dict[str, float] = {
    "linen": 0.95, "cotton": 0.80, "denim": 0.66, "wool": 0.54, "nylon": 0.40, "leather": 0.26,
}
MATERIAL_NAMES = tuple(MATERIALS)
INK_EMISSION = 0.8  # printed patterns (stripes, checks, logo): an ink layer emitting less than the cloth
BLUR_REFERENCE_HEIGHT = 256  # camera blur radii are in pixels of a 256-high image; scaled with the image size
PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder")
PALETTE = np.array([
    (20, 20, 22), (235, 235, 230), (128, 128, 130), (25, 35, 90), (40, 90, 200), (120, 170, 230),
    (200, 30, 35), (110, 20, 30), (40, 130, 60), (100, 110, 40), (235, 200, 40), (240, 130, 30),
    (235, 140, 180), (110, 50, 140), (110, 70, 40), (215, 195, 150),
], dtype=np.float32) / 255.0
SKIN = np.array([(250, 215, 190), (225, 180, 140), (190, 140, 100), (140, 95, 65), (95, 65, 45)],
                dtype=np.float32) / 255.0
HAIR = np.array([(25, 20, 18), (70, 45, 30), (150, 110, 60), (210, 180, 120), (120, 120, 120)],
                dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Identity:
    """Everything that makes one synthetic person recognisable (fixed across cameras)."""

    height: float  # fraction of the image height at scale 1
    build: float  # width factor
    torso: float  # torso length (fraction of person height)
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    long_hair: bool
    upper_color: tuple[float, float, float]
    upper_pattern: str
    pattern_color: tuple[float, float, float]
    pattern_period: float  # in person-height units
    long_sleeves: bool
    upper_material: str
    lower_color: tuple[float, float, float]
    lower_type: str
    lower_material: str
    shoe_color: tuple[float, float, float]
    hat: bool
    hat_color: tuple[float, float, float]
    hat_material: str
    bag: str
    bag_color: tuple[float, float, float]
    bag_material: str
    heat: float  # body heat: brightness of skin in infrared


@dataclass(frozen=True)
class CameraStyle:
    """Fixed look of one camera: modality, indoor/outdoor, illumination, background."""

    infrared: bool
    indoor: bool
    gain: tuple[float, float, float]  # visible: per-channel illumination; infrared: (gain, offset, blur)
    wall: tuple[float, float, float]  # visible: wall/sky colour; infrared: (level, gradient, 0)
    floor: tuple[float, float, float]


SYSU_STYLES: dict[int, CameraStyle] = {
    1: CameraStyle(False, True, (1.05, 0.97, 0.82), (0.80, 0.74, 0.62), (0.45, 0.35, 0.28)),
    2: CameraStyle(False, True, (0.92, 0.95, 1.02), (0.62, 0.66, 0.70), (0.30, 0.30, 0.34)),
    3: CameraStyle(True, True, (0.85, 0.08, 1.0), (0.42, 0.10, 0.0), (0.0, 0.0, 0.0)),
    4: CameraStyle(False, False, (1.10, 1.08, 1.00), (0.55, 0.70, 0.88), (0.42, 0.45, 0.36)),
    5: CameraStyle(False, False, (1.00, 1.05, 1.12), (0.40, 0.55, 0.35), (0.55, 0.52, 0.48)),
    6: CameraStyle(True, False, (0.95, 0.02, 1.3), (0.18, 0.12, 0.0), (0.0, 0.0, 0.0)),
}
REGDB_STYLES: dict[int, CameraStyle] = {1: SYSU_STYLES[4], 2: SYSU_STYLES[6]}


# ----------------------------------------------------------------------------------- identities


def _color(rng: np.random.Generator, table: np.ndarray, jitter: float = 0.06) -> tuple[float, float, float]:
    """A table colour with a little per-identity jitter."""
    c = table[rng.integers(len(table))] + rng.uniform(-jitter, jitter, 3)
    return tuple(float(x) for x in np.clip(c, 0.0, 1.0))


def sample_identity(seed: int, pid: int) -> Identity:
    """The attributes of identity `pid`, a pure function of (seed, pid)."""
    rng = np.random.default_rng([seed, pid, 7919])
    upper_pattern = PATTERNS[rng.integers(len(PATTERNS))]
    return Identity(
        height=float(rng.uniform(0.80, 0.95)),
        build=float(rng.uniform(0.80, 1.30)),
        torso=float(rng.uniform(0.34, 0.42)),
        skin=_color(rng, SKIN, 0.03),
        hair=_color(rng, HAIR, 0.03),
        long_hair=bool(rng.random() < 0.4),
        upper_color=_color(rng, PALETTE),
        upper_pattern=upper_pattern,
        pattern_color=_color(rng, PALETTE),
        pattern_period=float(rng.uniform(0.035, 0.07)),
        long_sleeves=bool(rng.random() < 0.5),
        upper_material=MATERIAL_NAMES[rng.integers(len(MATERIAL_NAMES))],
        lower_color=_color(rng, PALETTE),
        lower_type=LOWER_TYPES[rng.choice(3, p=[0.55, 0.25, 0.20])],
        lower_material=MATERIAL_NAMES[rng.integers(len(MATERIAL_NAMES))],
        shoe_color=_color(rng, PALETTE[[0, 1, 2, 14, 15]]),
        hat=bool(rng.random() < 0.3),
        hat_color=_color(rng, PALETTE),
        hat_material=MATERIAL_NAMES[rng.integers(len(MATERIAL_NAMES))],
        bag=BAGS[rng.choice(3, p=[0.45, 0.30, 0.25])],
        bag_color=_color(rng, PALETTE),
        bag_material=MATERIAL_NAMES[rng.integers(len(MATERIAL_NAMES))],
        heat=float(rng.uniform(0.80, 1.0)),
    )


# ----------------------------------------------------------------------------------- drawing


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), cached per image size."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return yy, xx


def _capsule(u: np.ndarray, v: np.ndarray, a: tuple[float, float], b: tuple[float, float],
             r: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask of points within r of segment a-b, and each point's position t in [0, 1] along it."""
    du, dv = b[0] - a[0], b[1] - a[1]
    pu, pv = u - a[0], v - a[1]
    t = np.clip((pu * du + pv * dv) / (du * du + dv * dv + 1e-9), 0.0, 1.0)
    return (pu - t * du) ** 2 + (pv - t * dv) ** 2 < r * r, t


def _weave(material: str, u: np.ndarray, v: np.ndarray, fuzz: np.ndarray) -> np.ndarray:
    """Multiplicative texture of a material at points (u, v), in person coordinates so it scales
    with the body.

    Periods are a few percent of the body height: still visible after resizing to 128x64."""
    if material == "denim":  # diagonal twill
        return 1.0 + 0.14 * np.sign(np.sin((u + v) * (2 * math.pi / 0.06)))
    if material == "wool":  # blotchy fuzz
        return 1.0 + 0.22 * fuzz
    if material == "nylon":  # quilted jacket: dark seams every few centimetres
        return np.where(np.mod(v, 0.07) < 0.018, 0.55, 1.0).astype(np.float32)
    if material == "leather":  # sheen: a bright vertical highlight band
        return 1.0 + 0.35 * np.exp(-((np.mod(u, 0.12) - 0.06) / 0.015) ** 2)
    if material == "linen":  # fine vertical ribs
        return 1.0 + 0.10 * np.sign(np.sin(u * (2 * math.pi / 0.045)))
    return np.ones_like(u)  # cotton: plain


def _pattern(idn: Identity, u: np.ndarray, v: np.ndarray, front: bool) -> np.ndarray:
    """Where the upper garment shows its print: pattern colour in visible light, a slightly cooler
    ink layer (INK_EMISSION, the same for every ink colour) in infrared."""
    p = idn.pattern_period
    if idn.upper_pattern == "hstripes":
        return np.mod(v, p) < p / 2
    if idn.upper_pattern == "vstripes":
        return np.mod(u, p) < p / 2
    if idn.upper_pattern == "checks":
        return (np.mod(u, p) < p / 2) ^ (np.mod(v, p) < p / 2)
    if idn.upper_pattern == "logo" and front:
        return (np.abs(u - 0.03) < 0.035) & (np.abs(v - 0.27) < 0.035)
    return np.zeros(u.shape, dtype=bool)


def _low_freq_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int] = (8, 4)) -> np.ndarray:
    """Smooth noise in [-1, 1] (bilinear upsampling of a coarse random grid)."""
    coarse = rng.uniform(-1.0, 1.0, (cells[0] + 1, cells[1] + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))


@dataclass(frozen=True)
class View:
    """Per-image variation: placement, scale, pose and viewpoint."""

    scale: float
    cx: float  # person centre, fraction of width
    top: float  # head top, fraction of height
    stride: float  # leg spread (person units), signed by walking phase
    swing: float  # arm swing angle (radians)
    front: bool
    mirror: bool
    light: float  # global illumination jitter


def sample_view(rng: np.random.Generator) -> View:
    """Random placement, pose and viewpoint of one image."""
    return View(scale=float(rng.uniform(0.86, 1.05)), cx=float(rng.uniform(0.42, 0.58)),
                top=float(rng.uniform(-0.01, 0.08)), stride=float(rng.uniform(-0.06, 0.06)),
                swing=float(rng.uniform(-0.3, 0.3)), front=bool(rng.random() < 0.5),
                mirror=bool(rng.random() < 0.5), light=float(rng.uniform(0.85, 1.15)))


def render(idn: Identity, style: CameraStyle, view: View, rng: np.random.Generator,
           size: tuple[int, int]) -> np.ndarray:
    """One image: uint8 [H, W, 3] for a visible camera, uint8 [H, W] for an infrared one."""
    h, w = size
    yy, xx = _grid(h, w)
    hp = idn.height * view.scale * h  # person height in pixels
    u = (xx - view.cx * w) / hp
    v = (yy - view.top * h) / hp
    if view.mirror:
        u = -u
    fuzz = _low_freq_noise(rng, h, w, (max(2, h // 8), max(2, w // 8)))
    ir = style.infrared
    bw = idn.build

    canvas_vis = None if ir else _background_visible(style, rng, h, w)
    canvas_ir = _background_infrared(style, rng, yy, h, w) if ir else None

    def paint(mask: np.ndarray, color: tuple[float, float, float], ir_level: float,
              material: Optional[str] = None, pattern: Optional[np.ndarray] = None) -> None:
        """Paint one part in place: colour (visible) or emission (infrared), times the material
        weave (evaluated on the part's pixels only)."""
        t = 1.0 if material is None else _weave(material, u[mask], v[mask], fuzz[mask])
        if ir:  # colour carries no heat signature; the print's ink layer does, whatever its colour
            vals = ir_level * np.broadcast_to(t, (int(mask.sum()),)).astype(np.float32)
            if pattern is not None:
                vals[pattern[mask]] *= INK_EMISSION
            canvas_ir[mask] = vals
            return
        scale = t[:, None] if material is not None else 1.0
        vals = np.broadcast_to(np.asarray(color, np.float32)[None, :] * scale, (int(mask.sum()), 3)).copy()
        if pattern is not None:
            pm = pattern[mask]
            pcol = np.asarray(idn.pattern_color, np.float32)[None, :]
            vals[pm] = pcol * (t[pm][:, None] if material is not None else 1.0)
        canvas_vis[mask] = vals

    heat = idn.heat
    skin_ir = heat
    waist = 0.15 + idn.torso
    ws, ww = 0.105 * bw, 0.085 * bw  # shoulder / waist half-widths
    upper_tex, lower_tex = idn.upper_material, idn.lower_material
    upper_ir = heat * MATERIALS[idn.upper_material]
    lower_ir = heat * MATERIALS[idn.lower_material]

    # legs and lower garment
    hip = 0.045 * bw
    leg_r = 0.034 * bw
    foot_v = 0.97
    for side in (-1.0, 1.0):
        a = (side * hip, waist - 0.02)
        b = (side * hip + side * 0.01 + view.stride * side, foot_v)
        leg, t = _capsule(u, v, a, b, leg_r)
        paint(leg, idn.skin, skin_ir)
        cover = {"trousers": 0.93, "shorts": 0.35, "skirt": 0.0}[idn.lower_type]
        if cover > 0:
            paint(leg & (t < cover), idn.lower_color, lower_ir, lower_tex)
        shoe, _ = _capsule(u, v, (b[0], foot_v - 0.005), (b[0] + 0.03 * (1 if view.front else -1), foot_v), 0.018)
        paint(shoe, idn.shoe_color, heat * 0.35)
    if idn.lower_type == "skirt":
        tt = np.clip((v - waist + 0.02) / 0.24, 0.0, 1.0)
        skirt = (v > waist - 0.02) & (v < waist + 0.22) & (np.abs(u) < ww + 0.06 * tt)
        paint(skirt, idn.lower_color, lower_ir, lower_tex)
    elif idn.lower_type in ("trousers", "shorts"):
        paint((v > waist - 0.03) & (v < waist + 0.05) & (np.abs(u) < ww + 0.005), idn.lower_color,
              lower_ir, lower_tex)

    # arms (behind/along the torso), sleeves of the upper garment
    for side in (-1.0, 1.0):
        a = (side * (ws - 0.01), 0.175)
        length = idn.torso + 0.02
        ang = view.swing * side
        b = (a[0] + side * 0.02 + length * math.sin(ang) * 0.5, 0.175 + length * math.cos(ang))
        arm, t = _capsule(u, v, a, b, 0.026 * bw)
        paint(arm, idn.skin, skin_ir)
        paint(arm & (t < (0.92 if idn.long_sleeves else 0.38)), idn.upper_color, upper_ir, upper_tex)

    # torso: a trapezoid from the shoulders to the waist
    tt = np.clip((v - 0.15) / idn.torso, 0.0, 1.0)
    torso = (v > 0.15) & (v < waist + 0.01) & (np.abs(u) < ws + (ww - ws) * tt)
    torso |= _capsule(u, v, (-ws + 0.025, 0.17), (ws - 0.025, 0.17), 0.03)[0] & (v > 0.145)
    paint(torso, idn.upper_color, upper_ir, upper_tex, _pattern(idn, u, v, view.front) & torso)

    bag_ir = heat * MATERIALS[idn.bag_material] * 0.55  # carried, so cooler than worn cloth
    bag_tex = idn.bag_material
    if idn.bag == "backpack":
        if view.front:
            for side in (-1.0, 1.0):
                strap = (np.abs(u - side * 0.06 * bw) < 0.012) & (v > 0.15) & (v < 0.36)
                paint(strap, idn.bag_color, bag_ir, bag_tex)
        else:
            pack = (np.abs(u) < 0.075 * bw) & (v > 0.19) & (v < 0.43)
            paint(pack, idn.bag_color, bag_ir, bag_tex)
    elif idn.bag == "shoulder":
        strap, _ = _capsule(u, v, (-ws + 0.02, 0.16), (ws + 0.02, waist), 0.01)
        paint(strap, idn.bag_color, bag_ir, bag_tex)
        pouch = (np.abs(u - (ws + 0.035)) < 0.045) & (v > waist - 0.06) & (v < waist + 0.07)
        paint(pouch, idn.bag_color, bag_ir, bag_tex)

    # neck, head, hair, hat
    paint((np.abs(u) < 0.022) & (v > 0.11) & (v < 0.17), idn.skin, skin_ir)
    hair_ir = heat * 0.55
    long_hair = (np.abs(u) < 0.05) & (v > 0.05) & (v < (0.16 if view.front else 0.22))
    if idn.long_hair and view.front:  # behind the face
        paint(long_hair, idn.hair, hair_ir)
    head = ((u / 0.047) ** 2 + ((v - 0.075) / 0.066) ** 2) < 1.0
    paint(head, idn.skin, skin_ir)
    paint(head & (v < (0.035 if view.front else 0.11)), idn.hair, hair_ir)
    if idn.long_hair and not view.front:
        paint(long_hair, idn.hair, hair_ir)
    if idn.hat:
        cap = (((u / 0.055) ** 2 + ((v - 0.03) / 0.04) ** 2) < 1.0) & (v < 0.035)
        brim = (np.abs(v - 0.033) < 0.007) & (u > -0.05) & (u < (0.09 if view.front else 0.05))
        paint(cap | brim, idn.hat_color, heat * MATERIALS[idn.hat_material] * 0.8,
              idn.hat_material)
    return _camera_response_infrared(canvas_ir, style, view, rng) if ir else \
        _camera_response_visible(canvas_vis, style, view, rng)


def _background_visible(style: CameraStyle, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Wall/sky above a floor/ground line, a few objects, smooth shading."""
    horizon = int(rng.uniform(0.55, 0.8) * h)
    wall = np.asarray(style.wall, np.float32) + rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    floor = np.asarray(style.floor, np.float32) + rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    bg = np.empty((h, w, 3), np.float32)
    bg[:horizon] = wall
    bg[horizon:] = floor
    for _ in range(int(rng.integers(1, 4))):  # doors, windows, trees, pillars
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0 = rng.uniform(0, horizon * 0.6)
        col = np.clip(wall * rng.uniform(0.4, 1.4) + rng.uniform(-0.1, 0.1, 3), 0, 1).astype(np.float32)
        bg[int(y0):horizon, int(x0):int(x1)] = col
    bg *= (1.0 + 0.12 * _low_freq_noise(rng, h, w))[..., None]
    return bg


def _background_infrared(style: CameraStyle, rng: np.random.Generator, yy: np.ndarray, h: int,
                         w: int) -> np.ndarray:
    """Cool scene with a vertical gradient and, sometimes, a warm object (radiator, car)."""
    level, grad = style.wall[0], style.wall[1]
    bg = (level + grad * (yy / h - 0.5) + 0.05 * _low_freq_noise(rng, h, w)).astype(np.float32)
    if rng.random() < 0.4:
        x0, y0 = int(rng.uniform(0, w * 0.8)), int(rng.uniform(h * 0.3, h * 0.8))
        bw, bh = int(rng.uniform(8, 30)), int(rng.uniform(8, 40))
        bg[y0:y0 + bh, x0:x0 + bw] = rng.uniform(0.5, 0.75)
    return bg


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with rounding, in place on x."""
    np.clip(x, 0.0, 1.0, out=x)
    x *= 255.0
    x += 0.5
    return x.astype(np.uint8)


def _camera_response_visible(img: np.ndarray, style: CameraStyle, view: View,
                             rng: np.random.Generator) -> np.ndarray:
    """Illumination colour and level, sensor noise, 8-bit, slight optical blur."""
    img *= np.asarray(style.gain, np.float32) * view.light
    img += 0.015 * rng.standard_normal(img.shape, dtype=np.float32)
    blur = 0.6 * img.shape[0] / BLUR_REFERENCE_HEIGHT
    return np.asarray(Image.fromarray(_to_uint8(img)).filter(ImageFilter.GaussianBlur(blur)))


def _camera_response_infrared(img: np.ndarray, style: CameraStyle, view: View,
                              rng: np.random.Generator) -> np.ndarray:
    """Thermal sensor: gain/offset, blur, pixel noise, single channel."""
    gain, offset, blur = style.gain
    img *= gain * (0.92 + 0.08 * view.light)
    img += offset + 0.02 * rng.standard_normal(img.shape, dtype=np.float32)
    blur *= img.shape[0] / BLUR_REFERENCE_HEIGHT
    return np.asarray(Image.fromarray(_to_uint8(img), mode="L").filter(ImageFilter.GaussianBlur(blur)))


# ----------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Task:
    """All images of one identity (picklable unit of parallel work)."""

    root: str
    pid: int
    seed: int
    layout: str
    images_per_camera: int
    size: tuple[int, int]


def _write_identity(task: _Task) -> int:
    """Render and save every image of one identity; returns the number of files written."""
    idn = sample_identity(task.seed, task.pid)
    styles = SYSU_STYLES if task.layout == "sysu" else REGDB_STYLES
    written = 0
    for cam, style in styles.items():
        if task.layout == "sysu":
            folder = Path(task.root) / f"cam{cam}" / f"{task.pid:04d}"
        else:
            folder = Path(task.root) / ("Thermal" if style.infrared else "Visible") / str(task.pid)
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(task.images_per_camera):
            rng = np.random.default_rng([task.seed, task.pid, cam, n])
            img = render(idn, style, sample_view(rng), rng, task.size)
            if task.layout == "sysu":
                Image.fromarray(img).save(folder / f"{n + 1:04d}.jpg", quality=92)
            else:
                kind = "t" if style.infrared else "v"
                Image.fromarray(img).save(folder / f"{kind}_{task.pid:04d}_{n + 1:02d}.bmp")
            written += 1
    return written


def _split_ids(num_train_ids: int, num_test_ids: int, seed: int) -> tuple[list[int], list[int]]:
    """Identity ids 1..N, shuffled (seeded) into train and test sets, each sorted."""
    pids = np.arange(1, num_train_ids + num_test_ids + 1)
    np.random.default_rng([seed, 1]).shuffle(pids)
    return sorted(int(p) for p in pids[:num_train_ids]), sorted(int(p) for p in pids[num_train_ids:])


def _write_lists(root: Path, layout: str, train: list[int], test: list[int], seed: int,
                 images_per_camera: int) -> None:
    """SYSU exp/*.txt (train split 3:1 into train/val as in the real set) or RegDB idx files."""
    if layout == "sysu":
        exp = root / "exp"
        exp.mkdir(parents=True, exist_ok=True)
        n_val = max(1, len(train) // 4) if len(train) > 1 else 0
        val = set(train[:: max(1, len(train) // max(n_val, 1))][:n_val]) if n_val else set()
        (exp / "train_id.txt").write_text(",".join(str(p) for p in train if p not in val) + "\n")
        (exp / "val_id.txt").write_text(",".join(str(p) for p in sorted(val)) + "\n")
        (exp / "test_id.txt").write_text(",".join(str(p) for p in test) + "\n")
        return
    idx = root / "idx"
    idx.mkdir(parents=True, exist_ok=True)
    everyone = sorted(train + test)
    for t in range(1, 11):  # ten random train/test partitions of the same people, as in RegDB
        perm = list(everyone)
        np.random.default_rng([seed, 2, t]).shuffle(perm)
        parts = {"train": sorted(perm[: len(train)]), "test": sorted(perm[len(train):])}
        for part, ids in parts.items():
            for folder, mod, kind in (("Visible", "visible", "v"), ("Thermal", "thermal", "t")):
                lines = [f"{folder}/{p}/{kind}_{p:04d}_{n + 1:02d}.bmp {p}"
                         for p in ids for n in range(images_per_camera)]
                (idx / f"{part}_{mod}_{t}.txt").write_text("\n".join(lines) + "\n")


def generate_synthetic(root: str, num_train_ids: int = 120, num_test_ids: int = 40,
                       images_per_camera: int = 4, seed: int = 0, layout: str = "sysu",
                       img_size: tuple[int, int] = (256, 128), workers: Optional[int] = None) -> Path:
    """Write (or reuse, if the marker matches) a synthetic dataset at `root`; returns its path.

    layout "sysu": cam1..cam6/{pid:04d}/{n:04d}.jpg (cam3, cam6 single-channel infrared) and
    exp/{train,val,test}_id.txt. layout "regdb": Visible/, Thermal/ (.bmp) and idx/ for splits 1..10,
    `images_per_camera` images per modality. Generation happens in a temporary sibling folder that
    is renamed into place, so an interrupted run never leaves a half-written dataset behind.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if num_train_ids < 2 or num_test_ids < 1 or images_per_camera < 1:
        raise ValueError(f"need num_train_ids >= 2, num_test_ids >= 1, images_per_camera >= 1; got "
                         f"{num_train_ids}, {num_test_ids}, {images_per_camera}")
    params = _params(num_train_ids, num_test_ids, images_per_camera, seed, layout, img_size)
    target = Path(root)
    if _marker_matches(target, params):
        log.info("synthetic dataset at %s is up to date", target)
        return target
    if target.exists() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise FileExistsError(f"{target} exists, is not empty and was not written by the synthetic "
                              f"generator (no {MARKER}); refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        train, test = _split_ids(num_train_ids, num_test_ids, seed)
        tasks = [_Task(str(tmp), pid, seed, layout, images_per_camera, (int(img_size[0]), int(img_size[1])))
                 for pid in sorted(train + test)]
        workers = workers or min(len(os.sched_getaffinity(0)), 8)
        if workers > 1 and len(tasks) > 1:
            with mp.get_context("fork").Pool(workers) as pool:
                total = sum(pool.imap_unordered(_write_identity, tasks, chunksize=4))
        else:
            total = sum(map(_write_identity, tasks))
        _write_lists(tmp, layout, train, test, seed, images_per_camera)
        (tmp / MARKER).write_text(json.dumps({**params, "images": total}, indent=1))
        _install(tmp, target, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("synthetic %s dataset: %d identities, %d images at %s", layout,
             num_train_ids + num_test_ids, total, target)
    return target


def _params(num_train_ids: int, num_test_ids: int, images_per_camera: int, seed: int, layout: str,
            img_size: tuple[int, int]) -> dict:
    """What a synthetic tree was written with (the marker's content, less the image count)."""
    return {"version": GENERATOR_VERSION, "num_train_ids": num_train_ids, "num_test_ids": num_test_ids,
            "images_per_camera": images_per_camera, "seed": seed, "layout": layout,
            "img_size": [int(img_size[0]), int(img_size[1])]}


def is_up_to_date(root: str, **generator_args: Any) -> bool:
    """True when `root` holds what this generator version writes for these `generate_synthetic` arguments."""
    return _marker_matches(Path(root), _params(**generator_args))


def _marker_matches(target: Path, params: dict) -> bool:
    """True when `target` holds a complete synthetic dataset written with exactly `params`."""
    marker = target / MARKER
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return {k: saved.get(k) for k in params} == params


def _install(tmp: Path, target: Path, params: dict) -> None:
    """Move the finished tree into place (replacing an outdated synthetic tree, never foreign data)."""
    if target.exists():
        if _marker_matches(target, params):  # another process finished the same work first
            return
        if (target / MARKER).is_file():
            shutil.rmtree(target)
        else:
            target.rmdir()  # an empty folder; anything else was refused up front
    try:
        tmp.rename(target)
    except OSError:
        if not _marker_matches(target, params):
            raise


def describe_identity(seed: int, pid: int) -> dict:
    """The attributes of one identity as a plain dict (for debugging and documentation)."""
    return asdict(sample_identity(seed, pid))

