"""Procedurally drawn face-identity dataset, so training and tests need no download and no GPU.

An identity is a fixed set of many independent, clearly drawn traits (head shape, colours, hair
style, eyes, brows, nose, mouth, ears, marks). Every image of it varies pose, expression, lighting,
background and noise strongly enough that raw-pixel similarity verifies poorly, while a small CNN
can learn the traits and verify held-out identities well.
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from itertools import combinations
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np

GENERATOR_VERSION = "synthetic-faces-1"
MANIFEST_NAME = "manifest.json"
_TRAIN_STREAM, _VERIFICATION_STREAM, _PAIRS_STREAM = 0, 1, 2
_SUBPIXEL_BITS = 4
_BALD, _SHORT, _FRINGE, _SIDE_PART, _LONG, _CURLY, _RECEDING = range(7)
# Colour anchors as RRGGBB; sampled colours lie between neighbouring anchors.
_SKIN = "ffe0c4 f1c2a0 e0ac82 c68660 8d5536 5a3825"
_HAIR = "14100e 3c281c 704a2a a04820 dcb878 a0a09c e6e4dc"
_IRIS = "281c16 5f3a1e 876932 3c7d46 3c73be 7d8796"


def _uniform(low: float, high: float) -> Any:
    """A continuous trait, drawn uniformly from [low, high] by sample_traits."""
    return field(metadata={"range": (low, high)})


@dataclass(frozen=True)
class FaceTraits:
    """Stable appearance of one identity; lengths are in head half-widths unless noted."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    iris: tuple[float, float, float]
    lips: tuple[float, float, float]
    hair_style: int  # one of _BALD .. _RECEDING
    beard_style: int  # 0 none, 1 full, 2 goatee, 3 moustache
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_colour: tuple[float, float, float]
    mole: tuple[float, float, float] | None  # x, y, radius
    freckles: tuple[tuple[float, float], ...]  # x, y of each
    half_width: float = _uniform(0.21, 0.26)  # fraction of the image side
    aspect: float = _uniform(1.15, 1.4)  # head half-height / half-width
    jaw_taper: float = _uniform(0.0, 0.4)  # narrows the jaw towards the chin
    jaw_squareness: float = _uniform(2.0, 3.6)  # 2 is elliptic, larger is boxier
    hairline: float = _uniform(0.0, 1.0)  # low .. high
    hair_volume: float = _uniform(1.04, 1.16)
    part_tilt: float = _uniform(-0.35, 0.35)
    eye_height: float = _uniform(-0.2, -0.02)  # in head half-heights from the centre
    eye_spacing: float = _uniform(0.34, 0.5)
    eye_width: float = _uniform(0.15, 0.24)
    eye_aspect: float = _uniform(0.38, 0.62)
    eye_tilt: float = _uniform(-0.2, 0.2)
    brow_gap: float = _uniform(0.06, 0.2)
    brow_thickness: float = _uniform(0.04, 0.11)
    brow_angle: float = _uniform(-0.12, 0.12)
    brow_arch: float = _uniform(0.0, 0.08)
    nose_length: float = _uniform(0.32, 0.5)  # in head half-heights
    nose_width: float = _uniform(0.13, 0.25)
    mouth_gap: float = _uniform(0.2, 0.3)  # nose to mouth, in head half-heights
    mouth_width: float = _uniform(0.25, 0.42)
    upper_lip: float = _uniform(0.03, 0.09)
    lower_lip: float = _uniform(0.04, 0.12)
    ear_size: float = _uniform(0.2, 0.36)


def _mix(anchors: str, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """A colour between two neighbouring anchors, so colours form a continuum."""
    palette = np.array([list(bytes.fromhex(anchor)) for anchor in anchors.split()], float)
    index = rng.integers(len(palette) - 1)
    colour = palette[index] + rng.uniform() * (palette[index + 1] - palette[index])
    return np.clip(colour + rng.uniform(-jitter, jitter, 3), 0, 255)


def sample_traits(rng: np.random.Generator) -> FaceTraits:
    """Draw the stable traits of one identity."""
    skin = _mix(_SKIN, rng, 10)
    lips = np.clip(skin * (0.85, 0.55, 0.55) + rng.uniform(-20, 20, 3), 0, 255)
    has_mole, has_freckles = rng.uniform(size=2) < (0.3, 0.2)
    freckle_count = rng.integers(10, 25) if has_freckles else 0
    freckles = rng.uniform((-0.6, 0.05), (0.6, 0.5), (freckle_count, 2))
    mole = rng.uniform((-0.65, -0.3, 0.04), (0.65, 1.0, 0.07)) if has_mole else None
    continuous = {
        trait.name: float(rng.uniform(*trait.metadata["range"]))
        for trait in fields(FaceTraits)
        if "range" in trait.metadata
    }
    return FaceTraits(
        skin=tuple(skin.tolist()),
        hair=tuple(_mix(_HAIR, rng, 12).tolist()),
        iris=tuple(_mix(_IRIS, rng, 15).tolist()),
        lips=tuple(lips.tolist()),
        hair_style=int(rng.integers(7)),
        beard_style=int(rng.choice(4, p=[0.7, 0.1, 0.1, 0.1])),
        glasses=int(rng.choice(3, p=[0.8, 0.1, 0.1])),
        glasses_colour=tuple(rng.uniform(0, 120, 3).tolist()),
        mole=None if mole is None else tuple(mole.tolist()),
        freckles=tuple(map(tuple, freckles.tolist())),
        **continuous,
    )


def _colour(rgb) -> tuple[float, float, float]:
    return tuple(min(max(float(c), 0.0), 255.0) for c in rgb)


@lru_cache
def _unit_circle(n: int) -> np.ndarray:
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> np.ndarray:
    return _unit_circle(n) * (rx, ry) + (cx, cy)


def _curve(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.stack([xs, np.broadcast_to(ys, xs.shape)], axis=1)


class _Painter:
    """Draws shapes given in face coordinates through one random head pose onto the canvas.

    Yaw is imitated by moving each point by its depth on a rounded head, so inner features
    shift sideways and the side turning away is squashed; roll, scale and shift follow.
    """

    def __init__(
        self, canvas: np.ndarray, half_width: float, rng: np.random.Generator, variation: float
    ):
        side = canvas.shape[0]
        self.canvas, self.half_width = canvas, half_width
        self.yaw = np.radians(rng.uniform(-25, 25) * variation)
        roll = np.radians(rng.uniform(-12, 12) * variation)
        self.scale = side * (1 + rng.uniform(-0.1, 0.1) * variation)
        cos, sin = np.cos(roll), np.sin(roll)
        self.linear = self.scale * np.array([[cos, -sin], [sin, cos]])
        self.origin = side * (np.array([0.5, 0.53]) + rng.uniform(-0.04, 0.04, 2) * variation)

    def project(self, points: np.ndarray, depth: float = 0.0) -> np.ndarray:
        """Canvas pixel coordinates (float) of face-coordinate ``points``."""
        x, y, a = points[:, 0], points[:, 1], self.half_width
        z = a * (0.5 * np.sqrt(np.maximum(1 - (x / a) ** 2, 0)) + depth)
        x = x * np.cos(self.yaw) + z * np.sin(self.yaw)
        return np.stack([x, y], axis=1) @ self.linear.T + self.origin

    def _polygon(self, points: np.ndarray, depth: float) -> list[np.ndarray]:
        pixels = self.project(points, depth)
        return [np.round(pixels * (1 << _SUBPIXEL_BITS)).astype(np.int32)]

    def fill(self, points: np.ndarray, colour, depth: float = 0.0) -> None:
        polygon = self._polygon(points, depth)
        cv2.fillPoly(self.canvas, polygon, _colour(colour), cv2.LINE_AA, _SUBPIXEL_BITS)

    def line(self, points: np.ndarray, colour, width: float, closed: bool = False) -> None:
        polyline, thickness = self._polygon(points, 0.0), max(1, round(width * self.scale))
        cv2.polylines(
            self.canvas, polyline, closed, _colour(colour), thickness, cv2.LINE_AA, _SUBPIXEL_BITS
        )


def _trapezoid(x: float, top_half: float, bottom_half: float, top: float, bottom: float):
    corners = [(-top_half, top), (top_half, top), (bottom_half, bottom), (-bottom_half, bottom)]
    return np.array(corners) + (x, 0)


def _head_outline(a: float, b: float, t: FaceTraits) -> np.ndarray:
    angle = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    cos, sin = np.cos(angle), np.sin(angle)
    power = np.where(sin > 0, 2 / t.jaw_squareness, 1.0)
    x = a * np.sign(cos) * np.abs(cos) ** power * (1 - t.jaw_taper * np.clip(sin, 0, 1) ** 2)
    return np.stack([x, b * np.sign(sin) * np.abs(sin) ** power], axis=1)


def _hair_cap(a: float, b: float, t: FaceTraits, eye_y: float, brow_y: float) -> np.ndarray:
    """Hair over the skull: outer arc of the hair volume, back along the hairline."""
    outer_a, outer_b = a * t.hair_volume, b * (1 + 0.6 * (t.hair_volume - 1))
    side_y = eye_y - 0.15 * b
    if t.hair_style == _FRINGE:
        top_y, flatness = brow_y - (0.08 + 0.1 * t.hairline) * a, 0.15
    elif t.hair_style == _RECEDING:
        top_y, flatness = -0.9 * b, 1.0
    else:
        top_y, flatness = -b * (0.45 + 0.35 * t.hairline), 0.6
    alpha = np.arcsin(np.clip(side_y / outer_b, -1, 1))
    angle = np.linspace(np.pi - alpha, 2 * np.pi + alpha, 40)
    outer = np.stack([outer_a * np.cos(angle), outer_b * np.sin(angle)], axis=1)
    edge_x = a * np.sqrt(max(1 - (side_y / b) ** 2, 0.05))
    xs = np.linspace(edge_x, -edge_x, 25)
    bulge = 1 - (xs / edge_x) ** 2
    ys = side_y + (top_y - side_y) * bulge**flatness
    if t.hair_style == _SIDE_PART:
        ys = ys + t.part_tilt * xs * bulge
    if t.hair_style == _FRINGE:
        ys[1:-1:2] += 0.05 * a
    return np.concatenate([outer, _curve(xs, ys)])


@dataclass(frozen=True)
class _Layout:
    """Where the features of one image sit, in face coordinates (origin at the head centre)."""

    a: float  # head half-width
    b: float  # head half-height
    eye_y: float
    eye_w: float
    eye_h: float
    brow_y: float
    nose_y: float
    mouth_y: float


def _draw_person(
    paint: _Painter, t: FaceTraits, rng: np.random.Generator, variation: float
) -> np.ndarray:
    """Body, hair and face back to front; expression factors come from rng. Returns the five
    landmarks in canvas pixels (see ``draw_face_with_landmarks``)."""
    smile = rng.uniform(-0.4, 1.0) * variation
    mouth_open = max(0.0, rng.uniform(-0.8, 1.0)) * variation
    eye_open = float(np.clip(1 - rng.uniform(-0.1, 0.5) * variation, 0.25, 1.2))
    brow_raise = rng.uniform(-0.3, 1.0) * variation * 0.08
    gaze = rng.uniform(-0.3, 0.3, 2) * variation
    clothes = np.clip(128 + variation * (rng.uniform(0, 255, 3) - 128), 0, 255)
    a = t.half_width
    b = a * t.aspect
    eye_y, eye_w = t.eye_height * b, t.eye_width * a
    eye_h = eye_w * t.eye_aspect * eye_open
    brow_y = eye_y - eye_w * t.eye_aspect - (t.brow_gap + brow_raise) * a
    nose_y = eye_y + t.nose_length * b
    at = _Layout(a, b, eye_y, eye_w, eye_h, brow_y, nose_y, mouth_y=nose_y + t.mouth_gap * b)
    skin, hair = np.array(t.skin), np.array(t.hair)

    paint.fill(_ellipse(0, b + 0.38, 2.4 * a, 0.3), clothes)
    paint.fill(_trapezoid(0, 0.45 * a, 0.5 * a, 0.3 * b, b + 0.15), skin * 0.8)
    if t.hair_style == _LONG:
        width = a * t.hair_volume * 1.05
        paint.fill(_ellipse(0, 0, width, b * t.hair_volume), hair)
        paint.fill(_trapezoid(0, width, 0.95 * width, 0, b + 0.1), hair)
    if t.hair_style == _CURLY:
        paint.fill(_ellipse(0, -0.15 * b, 1.4 * a, 1.05 * b), hair)
        for x, y in _ellipse(0, -0.15 * b, 1.4 * a, 1.05 * b, n=14):
            paint.fill(_ellipse(x, y, 0.2 * a, 0.2 * a, n=12), hair)
    ear_h = t.ear_size * a
    for side in (-1, 1):
        ear_x, ear_y = side * 0.96 * a, eye_y + 0.35 * ear_h
        paint.fill(_ellipse(ear_x, ear_y, 0.45 * ear_h, ear_h), skin * 0.92, depth=-0.3)
        paint.fill(_ellipse(ear_x, ear_y, 0.2 * ear_h, 0.6 * ear_h), skin * 0.72, depth=-0.3)
    outline = _head_outline(a, b, t)
    paint.fill(outline, skin)
    _draw_beard(paint, t, at, outline)
    if t.hair_style != _BALD:
        paint.fill(_hair_cap(a, b, t, eye_y, at.brow_y), hair)
        if t.hair_style == _SIDE_PART:
            part_x = np.sign(t.part_tilt) * 0.4 * a
            paint.line(np.array([[part_x, -0.55 * b], [0.7 * part_x, -1.02 * b]]), skin, 0.008)

    nose_w, bridge_y = t.nose_width * a, eye_y + 0.05 * b
    nose = [[-0.05 * a, bridge_y], [0.05 * a, bridge_y], [nose_w, nose_y], [0, nose_y + 0.06 * a]]
    paint.fill(np.array([*nose, [-nose_w, nose_y]]), skin * 0.86, depth=0.15)
    for side in (-1, 1):
        nostril = _ellipse(side * 0.55 * nose_w, nose_y - 0.01 * a, 0.3 * nose_w, 0.14 * nose_w)
        paint.fill(nostril, skin * 0.45, depth=0.2)
        _draw_eye_and_brow(paint, t, at, side, gaze)
    _draw_mouth(paint, t, at, smile, mouth_open)
    _draw_marks_and_glasses(paint, t, at)
    # Where each landmark is drawn: the eye openings' centres, the nose polygon's tip (at the
    # nose's depth) and the ends of the lip line (_draw_mouth's centre curve at u = -1, 1).
    eye_x, corner_x = t.eye_spacing * a, t.mouth_width * a
    corner_y = at.mouth_y - smile * 0.2 * t.mouth_width * a * 0.7
    flat = np.array([[-eye_x, eye_y], [eye_x, eye_y], [-corner_x, corner_y], [corner_x, corner_y]])
    flat_pixels = paint.project(flat)
    nose_tip = paint.project(np.array([[0.0, nose_y + 0.06 * a]]), depth=0.15)
    return np.concatenate([flat_pixels[:2], nose_tip, flat_pixels[2:]])


def _draw_beard(paint: _Painter, t: FaceTraits, at: _Layout, outline: np.ndarray) -> None:
    """Full beard: jaw and cheeks up to between nose and mouth; goatee: the chin, narrowed."""
    colour = np.multiply(t.hair, 0.8)
    from_top = np.roll(outline, len(outline) // 4, axis=0)  # right side, chin, left side
    if t.beard_style == 1:
        sideburn_y, top_y = at.eye_y + 0.1 * at.b, (at.nose_y + at.mouth_y) / 2
        jaw = from_top[from_top[:, 1] > sideburn_y] * 1.01
        xs = np.linspace(jaw[-1, 0], jaw[0, 0], 15)
        ys = top_y - (top_y - sideburn_y) * (xs / max(abs(xs[0]), 1e-6)) ** 2
        paint.fill(np.concatenate([jaw, _curve(xs, ys)]), colour)
    elif t.beard_style == 2:
        chin = from_top[from_top[:, 1] > at.mouth_y + (t.lower_lip + 0.03) * at.a]
        paint.fill(chin * [0.5, 1.01], colour)


def _draw_eye_and_brow(paint: _Painter, t: FaceTraits, at: _Layout, side: int, gaze) -> None:
    eye_w, eye_h = at.eye_w, at.eye_h
    tilt = -side * t.eye_tilt
    rotation = np.array([[np.cos(tilt), np.sin(tilt)], [-np.sin(tilt), np.cos(tilt)]])
    centre = np.array([side * t.eye_spacing * at.a, at.eye_y])

    def placed(local: np.ndarray) -> np.ndarray:
        """Clip to the eye opening (so lids cover the iris), then tilt and move into place."""
        limit = eye_h * np.sqrt(np.clip(1 - (local[:, 0] / eye_w) ** 2, 0, 1))
        clipped = np.stack(
            [np.clip(local[:, 0], -eye_w, eye_w), np.clip(local[:, 1], -limit, limit)], axis=1
        )
        return clipped @ rotation + centre

    iris_r, iris_x, iris_y = 0.5 * eye_w, gaze[0] * 0.4 * eye_w, gaze[1] * 0.3 * eye_h
    paint.fill(placed(_ellipse(0, 0, eye_w, eye_h)), (240, 238, 232))
    paint.fill(placed(_ellipse(iris_x, iris_y, iris_r, iris_r)), t.iris)
    paint.fill(placed(_ellipse(iris_x, iris_y, 0.45 * iris_r, 0.45 * iris_r)), (15, 12, 12))
    paint.line(placed(_ellipse(0, 0, eye_w, eye_h)[12:]), np.multiply(t.hair, 0.35), 0.008)

    u = np.linspace(0, 1, 9)
    xs = side * (t.eye_spacing * at.a - eye_w + u * 2.3 * eye_w)
    ys = at.brow_y - (t.brow_arch * 4 * u * (1 - u) + t.brow_angle * (u - 0.5)) * at.a
    half = t.brow_thickness * at.a * (1 - 0.45 * u) / 2
    paint.fill(
        np.concatenate([_curve(xs, ys - half), _curve(xs, ys + half)[::-1]]),
        np.multiply(t.hair, 0.6),
    )


def _draw_mouth(paint: _Painter, t: FaceTraits, at: _Layout, smile: float, opened: float) -> None:
    lips = np.array(t.lips)
    u = np.linspace(-1, 1, 17)
    xs, envelope = u * t.mouth_width * at.a, np.sqrt(1 - u**2)
    centre = at.mouth_y - smile * 0.2 * t.mouth_width * at.a * (u**2 - 0.3)
    gap = opened * 0.25 * t.mouth_width * at.a * envelope
    upper, lower = centre - gap / 2, centre + gap / 2
    upper_top = upper - t.upper_lip * at.a * envelope
    if opened > 0.05:
        paint.fill(np.concatenate([_curve(xs, upper), _curve(xs, lower)[::-1]]), (70, 25, 30))
    paint.fill(np.concatenate([_curve(xs, upper_top), _curve(xs, upper)[::-1]]), lips)
    lower_bottom = lower + t.lower_lip * at.a * envelope
    paint.fill(np.concatenate([_curve(xs, lower), _curve(xs, lower_bottom)[::-1]]), lips)
    paint.line(_curve(xs, centre), lips * 0.5, 0.006)
    if t.beard_style in (1, 3):
        moustache_y = upper_top - (0.04 - 0.05 * u**2) * at.a
        paint.line(
            _curve(xs * 0.95, moustache_y), np.multiply(t.hair, 0.8), 0.012 + 0.01 * t.hairline
        )


def _draw_marks_and_glasses(paint: _Painter, t: FaceTraits, at: _Layout) -> None:
    a = at.a
    if t.mole is not None:
        x, y, radius = t.mole
        paint.fill(_ellipse(x * a, y * a, radius * a, radius * a, n=12), (70, 45, 35))
    for x, y in t.freckles:
        paint.fill(_ellipse(x * a, y * a, 0.025 * a, 0.025 * a, n=8), np.multiply(t.skin, 0.72))
    if not t.glasses:
        return
    rim_x, rim_y, y = 1.45 * at.eye_w, 1.2 * at.eye_w, at.eye_y
    for side in (-1, 1):
        x = side * t.eye_spacing * a
        rim = (
            _ellipse(x, y, rim_x, rim_y, n=32)
            if t.glasses == 1
            else _trapezoid(x, rim_x, rim_x, y - rim_y, y + rim_y)
        )
        paint.line(rim, t.glasses_colour, 0.012, closed=True)
        paint.line(np.array([[x + side * rim_x, y], [side * 0.97 * a, y]]), t.glasses_colour, 0.012)
    inner = t.eye_spacing * a - rim_x
    paint.line(np.array([[-inner, y], [inner, y]]), t.glasses_colour, 0.012)


def _ramp(side: int, angle: float, start, end) -> np.ndarray:
    """(side, side, channels) float32 image going linearly from start to end along a direction.

    Computed on a coarse grid and upsampled bilinearly: the same image (but for a flat border a
    few pixels wide) in a fraction of the time.
    """
    coords = (np.arange(16, dtype=np.float32) + np.float32(0.5)) / 16 - np.float32(0.5)
    weight = (np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]) * np.sqrt(2)
    start = np.asarray(start, dtype=np.float32).reshape(-1)
    end = np.asarray(end, dtype=np.float32).reshape(-1)
    coarse = ((weight[..., None] + 1) / 2 * (end - start) + start).astype(np.float32)
    image = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_LINEAR)
    return image.reshape(side, side, -1)


def _background(side: int, rng: np.random.Generator, variation: float) -> np.ndarray:
    grey = np.full(3, 128.0)
    start, end = np.clip(grey + variation * (rng.uniform(0, 255, (2, 3)) - grey), 0, 255)
    canvas = _ramp(side, rng.uniform(0, 2 * np.pi), start, end).astype(np.uint8)
    for _ in range(rng.poisson(5 * variation)):
        colour, kind = _colour(rng.uniform(0, 255, 3)), rng.integers(3)
        centre, extent = rng.uniform(0, side, 2), rng.uniform(0.05, 0.35) * side
        centre_pixel = tuple(centre.astype(int).tolist())
        if kind == 0:
            cv2.circle(canvas, centre_pixel, int(extent / 2), colour, -1, cv2.LINE_AA)
        elif kind == 1:
            size = (extent, rng.uniform(0.2, 1) * extent)
            box = cv2.boxPoints((tuple(centre), size, rng.uniform(0, 180))).astype(np.int32)
            cv2.fillPoly(canvas, [box], colour, cv2.LINE_AA)
        else:
            tip = tuple((centre + rng.uniform(-1, 1, 2) * extent).astype(int).tolist())
            cv2.line(canvas, centre_pixel, tip, colour, int(rng.integers(2, 10)), cv2.LINE_AA)
    return canvas


def _photometric(image: np.ndarray, rng: np.random.Generator, variation: float) -> np.ndarray:
    """Directional lighting, brightness, contrast, colour cast, occasional blur, sensor noise."""
    strength = rng.uniform(0, 0.5) * variation
    shading = _ramp(image.shape[0], rng.uniform(0, 2 * np.pi), 1 - strength, 1 + strength)
    colour_cast = rng.normal(1, 0.08 * variation, 3)
    contrast = 1 + rng.uniform(-0.3, 0.3) * variation
    offset = 128 * (1 - contrast) + rng.uniform(-30, 30) * variation
    pixels = image * shading * (colour_cast * contrast).astype(np.float32) + np.float32(offset)
    if rng.uniform() < 0.3 * variation:
        pixels = cv2.GaussianBlur(pixels, (0, 0), rng.uniform(0.6, 1.4))
    noise = rng.random(pixels.shape, dtype=np.float32) - np.float32(0.5)  # uniform: much faster
    pixels += noise * np.float32(np.sqrt(12) * rng.uniform(0, 8) * variation)  # std 0..8
    return np.clip(pixels, 0, 255).astype(np.uint8)


def draw_face(
    traits: FaceTraits, rng: np.random.Generator, size: int = 112, variation: float = 1.0
) -> np.ndarray:
    """One RGB image (size, size, 3) uint8 of the identity, with fresh nuisance factors from rng.

    Drawn at twice the size and downsampled for antialiasing.
    """
    return draw_face_with_landmarks(traits, rng, size, variation)[0]


def draw_face_with_landmarks(
    traits: FaceTraits, rng: np.random.Generator, size: int = 112, variation: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``draw_face``'s image (the same pixels for the same rng) and where its five landmarks
    were drawn: (5, 2) float64 image pixels (pixel centres at integers), ordered left eye,
    right eye, nose tip, left mouth corner, right mouth corner (left = the viewer's left), the
    order of ``facetrain.align``. Eyes are the centres of the eye openings, not of the irises
    (which follow the gaze)."""
    canvas = _background(2 * size, rng, variation)
    paint = _Painter(canvas, traits.half_width, rng, variation)
    landmarks = _draw_person(paint, traits, rng, variation)
    image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    # INTER_AREA by 2: pixel k covers canvas pixels 2k and 2k + 1, centred at 2k + 0.5.
    return _photometric(image, rng, variation), (landmarks - 0.5) / 2


def draw_photo(
    traits: FaceTraits,
    rng: np.random.Generator,
    size: int = 256,
    face_size: tuple[int, int] = (96, 160),
    max_roll: float = 30.0,
    variation: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An unaligned "photo": a face of the identity (``draw_face_with_landmarks``) drawn
    ``face_size`` pixels wide, turned up to ``max_roll`` degrees and placed anywhere it fits on
    a ``size`` x ``size`` background of its own. Returns the RGB image and the face's five
    landmarks in its pixels, to test face alignment and detection against."""
    side = int(rng.integers(face_size[0], face_size[1] + 1))
    face, landmarks = draw_face_with_landmarks(traits, rng, side, variation)
    angle = rng.uniform(-max_roll, max_roll)
    # Turn the face about its centre; the turned square's corners must stay on the canvas.
    reach = side / 2 * (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle))))
    centre = rng.uniform(reach, size - reach, 2) if size > 2 * reach else np.full(2, size / 2)
    matrix = cv2.getRotationMatrix2D(((side - 1) / 2, (side - 1) / 2), angle, 1.0)
    matrix[:, 2] += centre - (side - 1) / 2
    photo = _background(size, rng, variation)
    placed = cv2.warpAffine(face, matrix, (size, size), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((side, side), np.float32), matrix, (size, size))[..., None]
    photo = (placed * mask + photo * (1 - mask)).round().astype(np.uint8)
    return photo, landmarks @ matrix[:, :2].T + matrix[:, 2]


def _verification_pairs(identities: int, images: int, num_pairs: int, seed: int) -> list[str]:
    """LFW-style lines: 10 folds, each with its same pairs then its different pairs, no repeats."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PAIRS_STREAM,)))
    per_fold = num_pairs // 20
    image_pairs = list(combinations(range(images), 2))
    same = [
        divmod(int(i), len(image_pairs))
        for i in rng.choice(identities * len(image_pairs), size=num_pairs // 2, replace=False)
    ]
    different, seen = [], set()
    while len(different) < num_pairs // 2:
        (i, j), (k, m) = rng.choice(identities, 2, replace=False), rng.integers(images, size=2)
        key = frozenset([(int(i), int(k)), (int(j), int(m))])
        if key not in seen:
            seen.add(key)
            different.append((int(i), int(k), int(j), int(m)))

    def path(identity: int, image: int) -> str:
        return f"verification/id_{identity:05d}/{image:04d}.jpg"

    lines = []
    for fold in range(10):
        for identity, pair in same[fold * per_fold : (fold + 1) * per_fold]:
            k, m = image_pairs[pair]
            lines.append(f"{path(identity, k)} {path(identity, m)} 1")
        for i, k, j, m in different[fold * per_fold : (fold + 1) * per_fold]:
            lines.append(f"{path(i, k)} {path(j, m)} 0")
    return lines


@dataclass(frozen=True)
class SyntheticFaces:
    """Writes synthetic face identities as identity folders plus a verification pair list."""

    root: str  # output folder
    num_train_identities: int = 400
    images_per_train_identity: int = 25
    num_verification_identities: int = 100
    images_per_verification_identity: int = 10
    num_pairs: int = 2000  # a multiple of 20: 10 folds, half same / half different per fold
    image_size: int = 112
    seed: int = 0
    workers: int | None = None  # processes for drawing; None = os.cpu_count()
    variation: float = 1.0  # scales every nuisance factor; 0 gives canonical, clean images

    def __post_init__(self):
        if min(self.num_train_identities, self.images_per_train_identity) < 1:
            raise ValueError("need at least one training identity and image")
        n, m = self.num_verification_identities, self.images_per_verification_identity
        if n < 2 or m < 2:
            raise ValueError("verification needs at least 2 identities with 2 images each")
        if self.num_pairs <= 0 or self.num_pairs % 20:
            raise ValueError(f"num_pairs must be a positive multiple of 20, got {self.num_pairs}")
        same_possible, different_possible = n * m * (m - 1) // 2, n * (n - 1) // 2 * m * m
        if self.num_pairs // 2 > min(same_possible, different_possible):
            raise ValueError(
                f"num_pairs={self.num_pairs} needs {self.num_pairs // 2} distinct same and "
                f"different pairs, but {n} verification identities x {m} images give only "
                f"{same_possible} same and {different_possible} different pairs"
            )
        if self.image_size < 32 or self.variation < 0:
            raise ValueError("image_size must be >= 32 and variation >= 0")

    @property
    def train_root(self) -> Path:
        return Path(self.root) / "train"

    @property
    def verification_root(self) -> Path:
        return Path(self.root) / "verification"

    @property
    def pairs_file(self) -> Path:
        return Path(self.root) / "verification_pairs.txt"

    def manifest(self) -> dict:
        settings = {k: v for k, v in asdict(self).items() if k not in ("root", "workers")}
        return {**settings, "generator": GENERATOR_VERSION}

    def _is_current(self, folder: Path) -> bool:
        try:
            return json.loads((folder / MANIFEST_NAME).read_text()) == self.manifest()
        except (OSError, ValueError):
            return False

    def generate(self) -> "SyntheticFaces":
        """Write the dataset if it is missing or was made with other settings; return self."""
        root = Path(self.root)
        if self._is_current(root):
            return self
        if root.is_dir() and not (root / MANIFEST_NAME).exists() and any(root.iterdir()):
            raise FileExistsError(
                f"{root} is not empty and has no {MANIFEST_NAME}; refusing to "
                "replace a folder this generator did not make"
            )
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(f"{root}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._write(staging)
            self._install(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self

    def _write(self, folder: Path) -> None:
        train, verification = folder / "train", folder / "verification"
        n_train, n_verification = self.num_train_identities, self.num_verification_identities
        jobs = [
            (train / f"id_{i:05d}", _TRAIN_STREAM, i, self.images_per_train_identity)
            for i in range(n_train)
        ] + [
            (
                verification / f"id_{i:05d}",
                _VERIFICATION_STREAM,
                i,
                self.images_per_verification_identity,
            )
            for i in range(n_verification)
        ]
        workers = min(self.workers or os.cpu_count() or 1, len(jobs))
        if workers == 1:
            for job in jobs:
                self._write_identity(*job)
        else:
            with Pool(workers) as pool:
                pool.starmap(self._write_identity, jobs, chunksize=4)
        pairs = _verification_pairs(
            n_verification, self.images_per_verification_identity, self.num_pairs, self.seed
        )
        (folder / self.pairs_file.name).write_text("\n".join(pairs) + "\n")
        (folder / MANIFEST_NAME).write_text(json.dumps(self.manifest(), indent=2) + "\n")

    def _write_identity(self, folder: Path, stream: int, index: int, images: int) -> None:
        """Draw one identity; its seeds depend on (seed, stream, index) only, never on workers."""
        sequence = np.random.SeedSequence(self.seed, spawn_key=(stream, index))
        trait_seed, *image_seeds = sequence.spawn(images + 1)
        traits = sample_traits(np.random.default_rng(trait_seed))
        folder.mkdir(parents=True)
        for k, image_seed in enumerate(image_seeds):
            rng = np.random.default_rng(image_seed)
            image = draw_face(traits, rng, self.image_size, self.variation)
            cv2.imwrite(
                str(folder / f"{k:04d}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95]
            )

    def _install(self, staging: Path, root: Path) -> None:
        """Move the finished folder into place; tolerate a concurrent generator doing the same."""
        for _ in range(5):
            try:
                os.rename(staging, root)  # succeeds when root is missing or an empty folder
                return
            except OSError as error:
                if self._is_current(root):
                    return
                if not (root / MANIFEST_NAME).exists():
                    if root.exists():
                        message = f"{root} appeared without a {MANIFEST_NAME}"
                        raise FileExistsError(message) from error
                    continue
                stale = Path(f"{root}.stale-{os.getpid()}")
                try:
                    os.rename(root, stale)
                except FileNotFoundError:
                    continue
                shutil.rmtree(stale)
        raise RuntimeError(f"could not move {staging} into place at {root}")
