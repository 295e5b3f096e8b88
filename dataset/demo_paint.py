"""The synthetic demo images: object shapes, textures, backgrounds and one sample's drawing.

The images are built so that each later stage has something to improve on:
every class has a distinct silhouette and a class-typical texture, but only one
part of each object (the "key" part: wings, head, wheels...) shows that texture
at full contrast; the rest of the object shows it faintly. A CAM therefore
tends to fire on the key part, and the boundary network / random walk / CRF
have sharp object edges to grow it to the full object. Colours are drawn per
instance from wide, overlapping hue ranges and checked to contrast with the
background around the object, so colour alone does not give the class. The
backgrounds are smooth noise and gradients with distractor strokes and blobs
(label 0).

Everything is drawn from `numpy.random.default_rng([seed, split, index])`,
so the same seed gives byte-identical files.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

IMAGE_SIDE_RANGE = (112, 176)  # inclusive, drawn per side

# Shape kinds, in a fixed order, and the class name each layout gives them.
KINDS = ("plane", "bird", "car", "cat", "person")
CLASS_NAMES = {
    "voc": {"plane": "aeroplane", "bird": "bird", "car": "car", "cat": "cat", "person": "person"},
    "coco": {"plane": "airplane", "bird": "bird", "car": "car", "cat": "cat", "person": "person"},
}
SPLIT_CODES = {"train": 0, "val": 1}


# --------------------------------------------------------------------------- shapes
# Parts are polygons in object-local units: the object spans about [-1, 1] on
# its long axis, x to the right, y down. Roles decide how a part is painted:
# "key" = class texture at full contrast, "body" = faint texture,
# "dark" = dark rubber-like part, "glass" = pale gradient panel.

@dataclass(frozen=True)
class _Part:
    polygon: np.ndarray  # (N, 2) float, local units
    role: str


def _ellipse(cx: float, cy: float, a: float, b: float, n: int = 28) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], axis=1)


def _limb(x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
    """A stick of the given width from (x0, y0) to (x1, y1) with rounded ends."""
    angle = math.atan2(y1 - y0, x1 - x0)
    half = width / 2.0
    t0 = np.linspace(angle + np.pi / 2, angle + 3 * np.pi / 2, 7)
    t1 = np.linspace(angle - np.pi / 2, angle + np.pi / 2, 7)
    cap0 = np.stack([x0 + half * np.cos(t0), y0 + half * np.sin(t0)], axis=1)
    cap1 = np.stack([x1 + half * np.cos(t1), y1 + half * np.sin(t1)], axis=1)
    return np.concatenate([cap0, cap1])


def _mirror_y(polygon: np.ndarray) -> np.ndarray:
    return polygon * np.array([1.0, -1.0])


def _plane_parts(rng: np.random.Generator) -> list[_Part]:
    """Top view: thin fuselage, swept wings (key), small tail fins (key)."""
    sweep = rng.uniform(0.1, 0.35)
    span = rng.uniform(0.85, 1.0)
    chord = rng.uniform(0.25, 0.35)
    wing = np.array([[0.3, -0.05], [0.3 - sweep - 0.2, -span], [0.3 - sweep - 0.2 - chord, -span], [0.3 - chord - 0.1, -0.05]])
    tail = np.array([[-0.68, -0.05], [-0.9, -0.42], [-1.02, -0.42], [-0.95, -0.05]])
    body = _ellipse(0.0, 0.0, 1.0, rng.uniform(0.15, 0.2))
    return [_Part(body, "body"), _Part(wing, "key"), _Part(_mirror_y(wing), "key"),
            _Part(tail, "key"), _Part(_mirror_y(tail), "key")]


def _bird_parts(rng: np.random.Generator) -> list[_Part]:
    """Side view: oval body, fan tail, raised wing (key), round head (key), beak."""
    head_y = rng.uniform(-0.45, -0.3)
    wing_tip = np.array([rng.uniform(-0.55, -0.2), rng.uniform(-0.95, -0.75)])
    return [
        _Part(_ellipse(0.0, 0.15, 0.62, 0.36), "body"),
        _Part(np.array([[-0.5, 0.05], [-1.0, -0.2], [-1.0, 0.35], [-0.5, 0.32]]), "body"),
        _Part(np.array([[-0.35, 0.05], [0.25, 0.0], wing_tip + [0.35, 0.0], wing_tip]), "key"),
        _Part(_ellipse(0.6, head_y, 0.27, 0.27), "key"),
        _Part(np.array([[0.8, head_y - 0.1], [1.08, head_y + 0.04], [0.8, head_y + 0.12]]), "key"),
    ]


def _car_parts(rng: np.random.Generator) -> list[_Part]:
    """Side view: long body, cabin with a window (glass), two wheels (dark)."""
    roof = rng.uniform(-0.62, -0.5)
    front = rng.uniform(0.45, 0.65)
    body = np.array([[-1.0, -0.05], [-0.95, -0.12], [0.95, -0.12], [1.0, 0.0], [1.0, 0.4], [0.95, 0.45], [-0.95, 0.45], [-1.0, 0.4]])
    cabin = np.array([[-0.6, -0.1], [-0.4, roof], [0.3, roof], [front, -0.1]])
    window = np.array([[-0.47, -0.16], [-0.33, roof + 0.08], [0.25, roof + 0.08], [front - 0.13, -0.16]])
    radius = rng.uniform(0.22, 0.27)
    return [
        _Part(body, "body"), _Part(cabin, "key"), _Part(window, "glass"),
        _Part(_ellipse(-0.58, 0.45, radius, radius), "dark"),
        _Part(_ellipse(0.58, 0.45, radius, radius), "dark"),
    ]


def _cat_parts(rng: np.random.Generator) -> list[_Part]:
    """Side view: long body, four legs, curled-up tail, round head (key) with two ears (key)."""
    tail_tip = (rng.uniform(-1.0, -0.85), rng.uniform(-0.6, -0.2))
    parts = [_Part(_ellipse(-0.1, 0.15, 0.68, 0.33), "body")]
    for x in (-0.6, -0.4, 0.2, 0.38):
        parts.append(_Part(_limb(x, 0.25, x + rng.uniform(-0.06, 0.06), 0.88, 0.17), "body"))
    parts.append(_Part(_limb(-0.7, 0.05, *tail_tip, 0.13), "body"))
    parts += [
        _Part(_ellipse(0.62, -0.3, 0.3, 0.27), "key"),
        _Part(np.array([[0.38, -0.45], [0.45, -0.85], [0.62, -0.52]]), "key"),
        _Part(np.array([[0.66, -0.53], [0.83, -0.85], [0.88, -0.42]]), "key"),
    ]
    return parts


def _person_parts(rng: np.random.Generator) -> list[_Part]:
    """Front view, upright: head and torso (key), arms and legs in a random pose (body)."""
    parts = []
    for side in (-1.0, 1.0):
        hand = (side * rng.uniform(0.45, 0.65), rng.uniform(-0.75, 0.15))
        parts.append(_Part(_limb(side * 0.26, -0.45, *hand, 0.2), "body"))
        foot = (side * rng.uniform(0.12, 0.35), rng.uniform(0.9, 1.0))
        parts.append(_Part(_limb(side * 0.14, 0.15, *foot, 0.23), "body"))
    parts += [
        _Part(_ellipse(0.0, -0.12, 0.32, 0.42), "key"),
        _Part(_ellipse(0.0, -0.78, 0.19, 0.21), "key"),
    ]
    return parts


# --------------------------------------------------------------------------- textures
# Patterns are functions of object-local pixel coordinates (u, v), so the scale
# of a class's texture is the same whatever the object size. Values in [-1, 1].

def _stripes(u: np.ndarray, v: np.ndarray, period: float, angle_deg: float, phase: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.tanh(3.0 * np.sin(2 * np.pi * (u * math.cos(a) + v * math.sin(a)) / period + phase))


def _dots(u: np.ndarray, v: np.ndarray, period: float, radius: float, phase: float) -> np.ndarray:
    du = np.mod(u + phase * period, period) - period / 2
    dv = np.mod(v + 0.5 * (np.floor((u + phase * period) / period) % 2) * period, period) - period / 2
    return np.tanh(2.0 * (radius - np.sqrt(du * du + dv * dv)))


def _checker(u: np.ndarray, v: np.ndarray, period: float, phase: float) -> np.ndarray:
    return np.tanh(3.0 * np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period + phase))


def _blotches(u: np.ndarray, v: np.ndarray, scale: float, phase: float) -> np.ndarray:
    field = (np.sin(u / scale + phase) + np.sin(v / (0.8 * scale) + 2 * phase)
             + np.sin((u + v) / (1.3 * scale) + 3 * phase) + np.sin((u - 0.6 * v) / (0.6 * scale)))
    return np.tanh(2.0 * field)


_Pattern = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class _Kind:
    parts: Callable[[np.random.Generator], list[_Part]]
    pattern: _Pattern
    hue_centre: float  # degrees; instances draw hue_centre +- _HUE_SPREAD: a cue, not an answer
    max_rotation: float  # degrees


_KIND_SPECS = {
    "plane": _Kind(_plane_parts, lambda u, v, p: _stripes(u, v, 4.0, 90.0, p), 220.0, 40.0),
    "bird": _Kind(_bird_parts, lambda u, v, p: _dots(u, v, 7.0, 1.9, p), 120.0, 25.0),
    "car": _Kind(_car_parts, lambda u, v, p: _checker(u, v, 9.0, p), 0.0, 8.0),
    "cat": _Kind(_cat_parts, lambda u, v, p: _stripes(u, v, 10.0, 65.0, p), 45.0, 15.0),
    "person": _Kind(_person_parts, lambda u, v, p: _blotches(u, v, 2.2, p), 290.0, 10.0),
}

_ROLE_ORDER = ("body", "key", "dark", "glass")  # later roles paint over earlier ones
# Hue ranges of neighbouring classes overlap a little, and the background draws from the
# whole wheel, so colour narrows the class down without giving it (tiny random-init
# networks on a CPU budget need some easy signal to learn from at all).
_HUE_SPREAD = 35.0
_ROLE_CONTRAST = {"body": 0.45, "key": 1.0, "dark": 0.8, "glass": 0.15}


# --------------------------------------------------------------------------- drawing

def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))) * 255.0


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    grid = rng.normal(size=(cells, cells, channels)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)


def _linear_ramp(height: int, width: int, angle: float) -> np.ndarray:
    """A ramp from -1 to 1 across the image in direction `angle` (radians)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs - width / 2) * math.cos(angle) + (ys - height / 2) * math.sin(angle)
    return ramp / (np.abs(ramp).max() + 1e-6)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    c0 = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.7), rng.uniform(0.3, 0.9))
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.7), rng.uniform(0.3, 0.9))
    t = (_linear_ramp(height, width, rng.uniform(0, 2 * np.pi))[..., None] + 1) / 2
    image = c0 * (1 - t) + c1 * t
    # low-frequency colour noise plus finer brightness noise
    image += 25.0 * _smooth_noise(rng, height, width, int(rng.integers(3, 6)), 3)
    image += 9.0 * _smooth_noise(rng, height, width, int(rng.integers(10, 18)), 1)
    _draw_distractors(rng, image)
    return image


def _draw_distractors(rng: np.random.Generator, image: np.ndarray) -> None:
    """Strokes and blobs that belong to no class (they stay label 0)."""
    height, width = image.shape[:2]
    side = (height + width) / 2
    for _ in range(int(rng.integers(2, 6))):  # blobs
        mask = np.zeros((height, width), np.uint8)
        centre = rng.uniform([0, 0], [width, height])
        radius = side * rng.uniform(0.06, 0.18)
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.6, 1.3, n)
        polygon = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
        colour = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.9), rng.uniform(0.2, 0.95))
        shade = 1.0 + 0.2 * _linear_ramp(height, width, rng.uniform(0, 2 * np.pi))[..., None]
        fill = colour * shade
        if rng.random() < 0.2:  # some blobs are textured, so texture alone does not give the class either
            ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
            period = rng.uniform(6.0, 8.0) if rng.random() < 0.5 else rng.uniform(13.0, 16.0)  # not a class's period
            fill = fill * (1.0 + 0.25 * _stripes(xs, ys, period, rng.uniform(0, 180), 0.0)[..., None])
        alpha = (mask.astype(np.float32) / 255.0)[..., None]
        image[:] = image * (1 - alpha) + fill * alpha
    for _ in range(int(rng.integers(3, 8))):  # strokes
        n = int(rng.integers(3, 7))
        steps = rng.normal(scale=side * 0.12, size=(n, 2))
        points = rng.uniform([0, 0], [width, height]) + np.cumsum(steps, axis=0)
        colour = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.9), rng.uniform(0.1, 1.0))
        canvas = np.ascontiguousarray(image)
        cv2.polylines(canvas, [np.round(points).astype(np.int32)], False, colour.tolist(),
                      thickness=int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
        image[:] = canvas


@dataclass
class _Placed:
    """One object drawn into the image: its class kind and per-role masks."""
    kind: str
    role_masks: dict[str, np.ndarray]  # bool (H, W), cropped to the image
    mask: np.ndarray  # union of the role masks
    full_area: int  # pixels of the whole object, including any part outside the image
    centre: np.ndarray
    rotation: np.ndarray  # 2x2, local -> image


def _place_object(rng: np.random.Generator, kind: str, height: int, width: int, size_range: tuple[float, float]) -> _Placed:
    spec = _KIND_SPECS[kind]
    parts = spec.parts(rng)
    side = (height + width) / 2
    half = side * rng.uniform(*size_range) / 2
    angle = math.radians(rng.uniform(-spec.max_rotation, spec.max_rotation))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    stretch = np.array([flip * rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = rng.uniform([0.12 * width, 0.12 * height], [0.88 * width, 0.88 * height])
    pad = int(math.ceil(2 * half)) + 2
    role_masks = {}
    for role in _ROLE_ORDER:
        polygons = [(p.polygon * stretch * half) @ rotation.T + centre + pad for p in parts if p.role == role]
        if not polygons:
            continue
        padded = np.zeros((height + 2 * pad, width + 2 * pad), np.uint8)
        for poly in polygons:  # one call per polygon: a single call would XOR the overlaps
            cv2.fillPoly(padded, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        role_masks[role] = padded
    union = np.zeros_like(next(iter(role_masks.values())))
    for role in role_masks:
        union |= role_masks[role]
    full_area = int(union.sum())
    crop = (slice(pad, pad + height), slice(pad, pad + width))
    role_masks = {role: m[crop].astype(bool) for role, m in role_masks.items()}
    return _Placed(kind, role_masks, union[crop].astype(bool), full_area, centre,
                   rotation @ np.diag(np.sign(stretch)))


def _object_colours(rng: np.random.Generator, kind: str, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two colours for the object's texture, whose mean contrasts with the background around it."""
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~mask
    around = image[ring] if ring.any() else image.reshape(-1, 3)
    best, best_distance = None, -1.0
    for _ in range(16):
        h = _KIND_SPECS[kind].hue_centre + rng.uniform(-_HUE_SPREAD, _HUE_SPREAD)
        s = rng.uniform(0.25, 0.9)
        v = rng.uniform(0.35, 0.95)
        first = _hsv(h, s, v)
        second = _hsv(h + rng.uniform(-40, 40), s * rng.uniform(0.5, 1.1), v + rng.choice([-1, 1]) * rng.uniform(0.25, 0.45))
        distance = float(np.linalg.norm(around - (first + second) / 2, axis=1).mean())
        if distance > best_distance:
            best, best_distance = (first, second), distance
        if distance > 90:
            break
    return best


def _paint_object(rng: np.random.Generator, image: np.ndarray, placed: _Placed) -> None:
    first, second = _object_colours(rng, placed.kind, image, placed.mask)
    ys, xs = np.nonzero(placed.mask)
    # object-local pixel coordinates, so textures keep their scale and follow the object's pose
    offsets = np.stack([xs, ys], axis=1) - placed.centre
    local = offsets @ placed.rotation
    u, v = local[:, 0], local[:, 1]
    pattern = _KIND_SPECS[placed.kind].pattern(u, v, rng.uniform(0, 2 * np.pi))
    light = math.radians(rng.uniform(0, 360))
    extent = np.abs(offsets).max() + 1.0
    shade = 1.0 + 0.18 * (offsets[:, 0] * math.cos(light) + offsets[:, 1] * math.sin(light)) / extent
    dark = _hsv(0, 0, rng.uniform(0.08, 0.2)), _hsv(0, 0, rng.uniform(0.3, 0.45))
    glass = _hsv(rng.uniform(180, 230), rng.uniform(0.05, 0.3), rng.uniform(0.75, 0.95))
    pixels = np.empty((len(ys), 3), np.float32)
    for role in _ROLE_ORDER:
        if role not in placed.role_masks:
            continue
        selected = placed.role_masks[role][ys, xs]
        t = (0.5 + 0.5 * _ROLE_CONTRAST[role] * pattern[selected])[:, None]
        if role == "dark":
            c0, c1 = dark
        elif role == "glass":
            c0, c1 = glass, glass * 0.7
            t = np.clip((v[selected] - v[selected].min()) / (np.ptp(v[selected]) + 1e-6), 0, 1)[:, None]
        else:
            c0, c1 = first, second
        pixels[selected] = c0 * (1 - t) + c1 * t
    pixels *= shade[:, None]
    pixels += rng.normal(scale=4.0, size=pixels.shape)
    image[ys, xs] = pixels


def outline(instances: np.ndarray) -> np.ndarray:
    """Pixels next to a different instance (or background): the thin ignore band real VOC has."""
    kernel = np.ones((3, 3), np.uint8)
    return cv2.dilate(instances, kernel) != cv2.erode(instances, kernel)


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    instances: np.ndarray  # (H, W) uint8: 0 background, k = k-th object, no outline
    kinds: list[str]  # kind of object k + 1


def _choose_kinds(rng: np.random.Generator, primary: str) -> list[str]:
    count = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    kinds = [primary]
    for _ in range(count - 1):
        if rng.random() < 0.6:
            kinds.append(str(rng.choice([k for k in KINDS if k not in kinds])))
        else:
            kinds.append(str(rng.choice(kinds)))
    return kinds


def make_sample(rng: np.random.Generator, primary: str) -> Sample:
    height, width = (int(x) for x in rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1, size=2))
    image = _background(rng, height, width)
    wanted = _choose_kinds(rng, primary)
    size_range = (0.42, 0.6) if len(wanted) == 1 else (0.3, 0.5)
    instances = np.zeros((height, width), np.uint8)
    placed: list[_Placed] = []
    for kind in wanted:
        for attempt in range(30):
            candidate = _place_object(rng, kind, height, width, size_range)
            inside = int(candidate.mask.sum())
            first_and_last_try = not placed and attempt == 29  # every image keeps at least one object
            if inside < 0.6 * candidate.full_area and not first_and_last_try:
                continue
            if (candidate.mask & (instances > 0)).sum() > 0.3 * inside:
                continue
            # earlier objects must stay mostly visible after this one occludes them
            if any(((instances == k + 1) & ~candidate.mask).sum() < 0.6 * (instances == k + 1).sum() for k in range(len(placed))):
                continue
            instances[candidate.mask] = len(placed) + 1
            _paint_object(rng, image, candidate)
            placed.append(candidate)
            break
        # a second or third object that cannot be placed after 30 tries is left out
    image += rng.normal(scale=3.0, size=image.shape)
    return Sample(np.clip(np.round(image), 0, 255).astype(np.uint8), instances, [p.kind for p in placed])


