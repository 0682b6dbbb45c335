"""Drawing one synthetic visible-infrared pedestrian image (the demo's generator writes many).

Each identity has a body (height, build), hair, upper and lower garments (colour, pattern, sleeve or
leg length, MATERIAL), optional hat and bag, and a body heat. Visible cameras paint colours under a
per-camera illumination and background; infrared cameras paint a single-channel thermal image whose
brightness is body heat times the garment material's emission: the same material looks the same in
infrared whatever its colour, while its weave (denim diagonals, quilting, wool fuzz, leather sheen),
the geometry of printed patterns (an ink layer that emits a little less, whatever its colour) and
the silhouette are visible in both modalities. Rendering is vectorised numpy on coordinate grids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image, ImageFilter

from .people import MATERIALS, CameraStyle, Identity, View

INK_EMISSION = 0.8  # printed patterns (stripes, checks, logo): an ink layer emitting less than the cloth
BLUR_REFERENCE_HEIGHT = 256  # camera blur radii are in pixels of a 256-high image; scaled with the image size


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


@dataclass
class _Canvas:
    """One image being painted: person coordinates (u, v), the weave's noise and the modality's pixels."""

    u: np.ndarray
    v: np.ndarray
    fuzz: np.ndarray
    infrared: bool
    pixels: np.ndarray  # float32 [H, W, 3] visible colours or [H, W] infrared emission
    pattern_color: tuple[float, float, float]

    def paint(self, mask: np.ndarray, color: tuple[float, float, float], infrared_level: float,
              material: Optional[str] = None, pattern: Optional[np.ndarray] = None) -> None:
        """Paint one part in place: colour (visible) or emission (infrared), times the material weave
        (evaluated on the part's pixels only)."""
        t = 1.0 if material is None else _weave(material, self.u[mask], self.v[mask], self.fuzz[mask])
        if self.infrared:  # colour carries no heat signature; the print's ink layer does, whatever its colour
            vals = infrared_level * np.broadcast_to(t, (int(mask.sum()),)).astype(np.float32)
            if pattern is not None:
                vals[pattern[mask]] *= INK_EMISSION
            self.pixels[mask] = vals
            return
        scale = t[:, None] if material is not None else 1.0
        vals = np.broadcast_to(np.asarray(color, np.float32)[None, :] * scale, (int(mask.sum()), 3)).copy()
        if pattern is not None:
            pm = pattern[mask]
            pcol = np.asarray(self.pattern_color, np.float32)[None, :]
            vals[pm] = pcol * (t[pm][:, None] if material is not None else 1.0)
        self.pixels[mask] = vals


@dataclass(frozen=True)
class _Body:
    """Body measures (person units) and infrared levels derived from an identity."""

    waist: float
    shoulder: float  # half-width
    hip_waist: float  # half-width at the waist
    skin_infrared: float
    upper_infrared: float
    lower_infrared: float

    @classmethod
    def of(cls, idn: Identity) -> "_Body":
        """The measures of identity `idn`."""
        return cls(waist=0.15 + idn.torso, shoulder=0.105 * idn.build, hip_waist=0.085 * idn.build,
                   skin_infrared=idn.heat, upper_infrared=idn.heat * MATERIALS[idn.upper_material],
                   lower_infrared=idn.heat * MATERIALS[idn.lower_material])


def _new_canvas(idn: Identity, style: CameraStyle, view: View, rng: np.random.Generator,
                size: tuple[int, int]) -> _Canvas:
    """Person coordinates for this view, the weave noise, and the camera's background."""
    h, w = size
    yy, xx = _grid(h, w)
    hp = idn.height * view.scale * h  # person height in pixels
    u = (xx - view.cx * w) / hp
    v = (yy - view.top * h) / hp
    if view.mirror:
        u = -u
    fuzz = _low_freq_noise(rng, h, w, (max(2, h // 8), max(2, w // 8)))
    pixels = _background_infrared(style, rng, yy, h, w) if style.infrared else _background_visible(style, rng, h, w)
    return _Canvas(u, v, fuzz, style.infrared, pixels, idn.pattern_color)


def _paint_legs(c: _Canvas, idn: Identity, view: View, body: _Body) -> None:
    """Legs, the lower garment over them (trousers, shorts or a skirt) and shoes."""
    u, v, bw, waist = c.u, c.v, idn.build, body.waist
    hip, leg_r, foot_v = 0.045 * bw, 0.034 * bw, 0.97
    for side in (-1.0, 1.0):
        a = (side * hip, waist - 0.02)
        b = (side * hip + side * 0.01 + view.stride * side, foot_v)
        leg, t = _capsule(u, v, a, b, leg_r)
        c.paint(leg, idn.skin, body.skin_infrared)
        cover = {"trousers": 0.93, "shorts": 0.35, "skirt": 0.0}[idn.lower_type]
        if cover > 0:
            c.paint(leg & (t < cover), idn.lower_color, body.lower_infrared, idn.lower_material)
        shoe, _ = _capsule(u, v, (b[0], foot_v - 0.005), (b[0] + 0.03 * (1 if view.front else -1), foot_v), 0.018)
        c.paint(shoe, idn.shoe_color, idn.heat * 0.35)
    if idn.lower_type == "skirt":
        tt = np.clip((v - waist + 0.02) / 0.24, 0.0, 1.0)
        skirt = (v > waist - 0.02) & (v < waist + 0.22) & (np.abs(u) < body.hip_waist + 0.06 * tt)
        c.paint(skirt, idn.lower_color, body.lower_infrared, idn.lower_material)
    else:  # trousers and shorts: the waistband
        c.paint((v > waist - 0.03) & (v < waist + 0.05) & (np.abs(u) < body.hip_waist + 0.005), idn.lower_color,
                body.lower_infrared, idn.lower_material)


def _paint_arms(c: _Canvas, idn: Identity, view: View, body: _Body) -> None:
    """Arms (behind or along the torso) in the upper garment's sleeves."""
    for side in (-1.0, 1.0):
        a = (side * (body.shoulder - 0.01), 0.175)
        length = idn.torso + 0.02
        ang = view.swing * side
        b = (a[0] + side * 0.02 + length * math.sin(ang) * 0.5, 0.175 + length * math.cos(ang))
        arm, t = _capsule(c.u, c.v, a, b, 0.026 * idn.build)
        c.paint(arm, idn.skin, body.skin_infrared)
        sleeve = arm & (t < (0.92 if idn.long_sleeves else 0.38))
        c.paint(sleeve, idn.upper_color, body.upper_infrared, idn.upper_material)


def _paint_torso(c: _Canvas, idn: Identity, view: View, body: _Body) -> None:
    """The upper garment: a trapezoid from the shoulders to the waist, with its print."""
    u, v, ws = c.u, c.v, body.shoulder
    tt = np.clip((v - 0.15) / idn.torso, 0.0, 1.0)
    torso = (v > 0.15) & (v < body.waist + 0.01) & (np.abs(u) < ws + (body.hip_waist - ws) * tt)
    torso |= _capsule(u, v, (-ws + 0.025, 0.17), (ws - 0.025, 0.17), 0.03)[0] & (v > 0.145)
    c.paint(torso, idn.upper_color, body.upper_infrared, idn.upper_material, _pattern(idn, u, v, view.front) & torso)


def _paint_bag(c: _Canvas, idn: Identity, view: View, body: _Body) -> None:
    """A backpack (straps from the front, the pack from behind) or a shoulder bag, if any."""
    u, v, bw, ws = c.u, c.v, idn.build, body.shoulder
    bag_infrared = idn.heat * MATERIALS[idn.bag_material] * 0.55  # carried, so cooler than worn cloth
    parts = []
    if idn.bag == "backpack" and view.front:
        parts = [(np.abs(u - side * 0.06 * bw) < 0.012) & (v > 0.15) & (v < 0.36) for side in (-1.0, 1.0)]
    elif idn.bag == "backpack":
        parts = [(np.abs(u) < 0.075 * bw) & (v > 0.19) & (v < 0.43)]
    elif idn.bag == "shoulder":
        parts = [_capsule(u, v, (-ws + 0.02, 0.16), (ws + 0.02, body.waist), 0.01)[0],
                 (np.abs(u - (ws + 0.035)) < 0.045) & (v > body.waist - 0.06) & (v < body.waist + 0.07)]
    for part in parts:
        c.paint(part, idn.bag_color, bag_infrared, idn.bag_material)


def _paint_head(c: _Canvas, idn: Identity, view: View, body: _Body) -> None:
    """Neck, head, hair (long hair behind the face, or over the back) and hat."""
    u, v = c.u, c.v
    c.paint((np.abs(u) < 0.022) & (v > 0.11) & (v < 0.17), idn.skin, body.skin_infrared)
    hair_infrared = idn.heat * 0.55
    long_hair = (np.abs(u) < 0.05) & (v > 0.05) & (v < (0.16 if view.front else 0.22))
    if idn.long_hair and view.front:  # behind the face
        c.paint(long_hair, idn.hair, hair_infrared)
    head = ((u / 0.047) ** 2 + ((v - 0.075) / 0.066) ** 2) < 1.0
    c.paint(head, idn.skin, body.skin_infrared)
    c.paint(head & (v < (0.035 if view.front else 0.11)), idn.hair, hair_infrared)
    if idn.long_hair and not view.front:
        c.paint(long_hair, idn.hair, hair_infrared)
    if idn.hat:
        cap = (((u / 0.055) ** 2 + ((v - 0.03) / 0.04) ** 2) < 1.0) & (v < 0.035)
        brim = (np.abs(v - 0.033) < 0.007) & (u > -0.05) & (u < (0.09 if view.front else 0.05))
        c.paint(cap | brim, idn.hat_color, idn.heat * MATERIALS[idn.hat_material] * 0.8, idn.hat_material)


def render(idn: Identity, style: CameraStyle, view: View, rng: np.random.Generator,
           size: tuple[int, int]) -> np.ndarray:
    """One image: uint8 [H, W, 3] for a visible camera, uint8 [H, W] for an infrared one.

    Parts are painted back to front (legs, arms, torso, bag, head), then the camera responds."""
    canvas = _new_canvas(idn, style, view, rng, size)
    body = _Body.of(idn)
    for step in (_paint_legs, _paint_arms, _paint_torso, _paint_bag, _paint_head):
        step(canvas, idn, view, body)
    if style.infrared:
        return _camera_response_infrared(canvas.pixels, style, view, rng)
    return _camera_response_visible(canvas.pixels, style, view, rng)


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


