"""Who the synthetic pedestrians are and how each camera and image sees them: identities, camera styles, views.

Everything is a pure function of its seed, so every image of the demo's set can be rendered again.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Garment materials: infrared emission factor (x body heat) and a weave seen in both modalities.
MATERIALS: dict[str, float] = {
    "linen": 0.95, "cotton": 0.80, "denim": 0.66, "wool": 0.54, "nylon": 0.40, "leather": 0.26,
}
MATERIAL_NAMES = tuple(MATERIALS)
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
