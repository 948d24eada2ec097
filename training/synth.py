"""Synthetic weakly supervised segmentation data for tests and benchmarks (``hsc data synth``).

``hsc data synth OUT --train N --val M --seed S`` writes a small dataset in the PASCAL VOC layout
(docs/algorithm.md 4.1-4.2) whose pixel truth is known exactly, so that CAM seeds and pseudo-labels
can be scored without downloading anything. It is **not** a substitute for real data: numbers
measured on it say how methods compare on the failure modes built into it, nothing more.

Layout written under ``OUT`` (ids are ``train_000000``, ``val_000000``, ...)::

    JPEGImages/<id>.jpg                 RGB, JPEG quality 95 by default, 4:4:4
    SegmentationClass/<id>.png          VOC palette PNG: 0 background, c + 1 class c, 255 void
                                        (only with ``void_band > 0``: a band on every label boundary)
    saliency/<id>.png                   8-bit grey, 255 = salient (an imperfect "detector", see below)
    ImageSets/Segmentation/train.txt    ids, one a line (also val.txt)
    cls_labels.npy                      pickled dict id -> float32[K] multi-hot in channel space
    classes.txt                         ``background`` then the K class names, one a line
    manifest.jsonl                      one JSON object a line for every image of both splits, with a
                                        ``"split"`` field; manifest_train.jsonl / manifest_val.jsonl
                                        hold the same lines split by split
    synth_config.json                   the recipe (SynthConfig) and the class designs
    README.md                           what this is, the command, the classes, the failure modes

A manifest line: ``{"image", "labels": [names], "mask", "saliency"}`` (paths relative to ``OUT``)
plus per-image metadata: ``id``, ``split``, ``objects`` (class, kind, visible bbox and area, full
area, head area, occluded, small), ``context`` (background context name or null),
``context_class`` (the class it was chosen for, or null), ``occluded``, ``clutter`` (count of
background distractors), ``clutter_in_front`` (cables drawn over the objects),
``saliency_false_positive`` (the map exceeds 127 on some clutter), ``saliency_missed`` (an object
with no pixel above 127) and ``failure_modes`` (a sorted subset of ``clutter``, ``context``,
``occlusion``, ``small_part``).

Classes come in three kinds (the designs are fixed per class index, independent of the seed):

* ``part``: a plain body whose colour and shape are drawn, per instance, from a set shared by all
  part classes, with a small distinctive patterned "head": only the head tells the class (a CAM
  finds the head); plain body-coloured blobs also appear as background clutter;
* ``context``: a distinctively coloured object that appears on its own background context (water,
  grass, sand, snow, brick wall, sky, carpet) with probability ``p_context``; the context also
  appears, rarely, without the class (a CAM spills onto the context);
* ``textured``: a body covered in a two-colour class pattern (the easy kind).

Objects (1..``max_objects``, multi-label images common) overlap with probability ``p_occlusion``
(depth order = drawing order, the truth is the visible part); thin parts (legs, antennae, masts,
strings, tails) belong to the objects. Clutter (polygons, stripe patches, rings, spots, cables,
body-coloured blobs) is background; cables sometimes cross in front of objects. Lighting gradients,
vignetting, colour casts, low-frequency blotches and pixel noise are applied to every image.

Saliency maps imitate a saliency detector: each object's visible mask is morphologically opened
(thin and small parts vanish), small objects are sometimes missed, high-contrast clutter gives false
positives, edges are shifted and blurred and the confidence is modulated by low-frequency noise.

Determinism: image ``i`` of split ``s`` uses ``numpy.random.default_rng([seed, s, i])`` (``s`` = 0
train, 1 val), so the same arguments give the same files byte for byte (with the same numpy, Pillow
and libjpeg), and a val image does not depend on the number of train images. numpy + Pillow only.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from hsc.core.encoders import label_to_png
from hsc.model.classes import BACKGROUND, IGNORE_INDEX

F32 = NDArray[np.float32]
RGB = tuple[float, float, float]

MAX_CLASSES = 20
DEFAULT_SIZE: tuple[int, int] = (192, 144)
MIN_SIZE: tuple[int, int] = (48, 48)
SPLITS: tuple[str, ...] = ("train", "val")
FAILURE_MODES: tuple[str, ...] = ("clutter", "context", "occlusion", "small_part")
FORMAT_VERSION = 1
_ID_RE = re.compile(r"^(train|val)_\d{6}$")
_MARKER = "synth_config.json"

# --------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SynthConfig:
    """The whole recipe of a synthetic dataset (saved as ``synth_config.json``).

    ``size`` is ``(width, height)`` in pixels; ``void_band`` the width in pixels of the 255 band drawn
    on every label boundary of the masks (0 = exact truth, VOC's band is about 5 px).
    """

    train: int = 100
    val: int = 50
    seed: int = 0
    size: tuple[int, int] = DEFAULT_SIZE
    num_classes: int = 5
    max_objects: int = 3
    void_band: int = 0
    jpeg_quality: int = 95
    p_context: float = 0.85
    """probability that a context class's image shows its context"""
    p_context_alone: float = 0.1
    """probability that an image without a context class still shows some class's context"""
    p_occlusion: float = 0.45
    """probability that a second or third object is placed overlapping an earlier one"""
    p_small: float = 0.15
    """probability that an object is drawn at about half size"""
    max_clutter: int = 5

    def __post_init__(self) -> None:
        w, h = self.size
        if self.train < 0 or self.val < 0 or self.train + self.val == 0:
            raise ValueError(f"need at least one image (train={self.train}, val={self.val})")
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {self.num_classes}")
        if w < MIN_SIZE[0] or h < MIN_SIZE[1]:
            raise ValueError(f"size must be at least {MIN_SIZE[0]}x{MIN_SIZE[1]}, got {w}x{h}")
        if not 1 <= self.max_objects <= 6:
            raise ValueError(f"max_objects must be in 1..6, got {self.max_objects}")
        if not 0 <= self.void_band <= 16:
            raise ValueError(f"void_band must be in 0..16 pixels, got {self.void_band}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("p_context", "p_context_alone", "p_occlusion", "p_small"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not 0 <= self.max_clutter <= 20:
            raise ValueError(f"max_clutter must be in 0..20, got {self.max_clutter}")


# --------------------------------------------------------------------------------------------------
# class designs (fixed per class index)


@dataclass(frozen=True)
class ClassDesign:
    """How instances of one class are drawn. Colours are RGB in [0, 1]."""

    name: str
    kind: str  # "part" | "context" | "textured"
    body_shape: str  # "ellipse" | "superellipse" | "blob" | "shared" (part classes)
    aspect: float  # body half-length / half-height
    body_colour: RGB | None  # None: drawn from SHARED_BODY_COLOURS per instance (part classes)
    body_pattern: str | None = None
    pattern_colour: RGB = (0.0, 0.0, 0.0)
    power: float = 2.0  # superellipse exponent
    head_pattern: str | None = None
    head_colour: RGB = (0.0, 0.0, 0.0)
    head_colour2: RGB = (0.0, 0.0, 0.0)
    head_angle: float = 0.0  # direction of the head from the body centre, body frame, y down
    appendage: str | None = None  # "legs" | "antennae" | "mast" | "tail" | "string" | "runners"
    context: str | None = None
    description: str = ""


SHARED_BODY_COLOURS: tuple[RGB, ...] = ((0.47, 0.41, 0.35), (0.38, 0.43, 0.35), (0.40, 0.41, 0.48))
"""Body colours shared by every ``part`` class (drawn per instance): the body says nothing."""

_DARK: RGB = (0.10, 0.08, 0.07)

CLASS_DESIGNS: tuple[ClassDesign, ...] = (
    ClassDesign("beetle", "part", "shared", 1.5, None, head_pattern="dots", head_colour=(0.85, 0.10, 0.10),
                head_colour2=(0.05, 0.05, 0.05), head_angle=0.0,
                description="plain body, red head with black dots"),
    ClassDesign("raft", "context", "superellipse", 2.6, (0.85, 0.45, 0.15), body_pattern="planks",
                pattern_colour=(0.55, 0.27, 0.08), power=2.5, appendage="mast", context="water",
                description="orange plank raft with a mast and a flag, usually on water"),
    ClassDesign("zebra", "textured", "ellipse", 1.9, (0.93, 0.93, 0.90), body_pattern="stripes_v",
                pattern_colour=(0.06, 0.06, 0.06), appendage="legs",
                description="white body with black vertical stripes, legs"),
    ClassDesign("owl", "part", "shared", 1.3, None, head_pattern="rings", head_colour=(0.95, 0.80, 0.10),
                head_colour2=(0.30, 0.15, 0.05), head_angle=-math.pi / 2,
                description="plain body, yellow/brown ringed head on top"),
    ClassDesign("grazer", "context", "ellipse", 1.7, (0.92, 0.87, 0.74), appendage="legs", context="grass",
                description="cream oval with legs, usually on grass"),
    ClassDesign("gift", "textured", "superellipse", 1.0, (0.80, 0.10, 0.12), body_pattern="checker",
                pattern_colour=(0.10, 0.60, 0.20), power=6.0,
                description="red/green chequered box"),
    ClassDesign("turtle", "part", "shared", 1.6, None, head_pattern="checker", head_colour=(0.10, 0.70, 0.30),
                head_colour2=(0.95, 0.90, 0.20), head_angle=0.0,
                description="plain body, green/yellow chequered head"),
    ClassDesign("camel", "context", "blob", 1.5, (0.72, 0.50, 0.25), appendage="legs", context="sand",
                description="tan lumpy body with legs, usually on sand"),
    ClassDesign("leopard", "textured", "blob", 1.6, (0.95, 0.70, 0.15), body_pattern="dots",
                pattern_colour=(0.15, 0.08, 0.03), appendage="tail",
                description="yellow body with dark spots, tail"),
    ClassDesign("penguin", "part", "shared", 1.2, None, head_pattern="stripes_h",
                head_colour=(0.95, 0.95, 0.95), head_colour2=(0.05, 0.05, 0.10), head_angle=-math.pi / 2,
                description="plain body, black/white striped head on top"),
    ClassDesign("sled", "context", "superellipse", 2.2, (0.80, 0.10, 0.15), power=4.0, appendage="runners",
                context="snow", description="red sled on runners, usually on snow"),
    ClassDesign("target", "textured", "ellipse", 1.0, (0.85, 0.10, 0.10), body_pattern="rings",
                pattern_colour=(0.97, 0.97, 0.97), description="red/white concentric rings"),
    ClassDesign("robot", "part", "shared", 1.4, None, head_pattern="stripes_v",
                head_colour=(0.10, 0.80, 0.90), head_colour2=(0.05, 0.10, 0.40), head_angle=-math.pi / 4,
                appendage="antennae",
                description="plain body, cyan/navy striped head with antennae"),
    ClassDesign("poster", "context", "superellipse", 0.75, (0.96, 0.96, 0.92), body_pattern="frame",
                pattern_colour=(0.15, 0.30, 0.80), power=10.0, context="brick",
                description="white-framed blue poster, usually on a brick wall"),
    ClassDesign("melon", "textured", "ellipse", 1.25, (0.45, 0.75, 0.20), body_pattern="diagonal",
                pattern_colour=(0.10, 0.30, 0.08), appendage="tail",
                description="green melon with dark diagonal stripes and a stem"),
    ClassDesign("lantern", "part", "shared", 1.2, None, head_pattern="diagonal",
                head_colour=(1.00, 0.50, 0.00), head_colour2=(0.40, 0.10, 0.50), head_angle=-math.pi / 2,
                description="plain body, orange/purple diagonal-striped head on top"),
    ClassDesign("kite", "context", "superellipse", 0.7, (0.98, 0.85, 0.10), body_pattern="quadrants",
                pattern_colour=(0.85, 0.10, 0.10), power=1.0, appendage="string", context="sky",
                description="yellow/red diamond kite with a string, usually in the sky"),
    ClassDesign("quilt", "textured", "superellipse", 1.3, (0.15, 0.25, 0.75), body_pattern="checker_diag",
                pattern_colour=(0.95, 0.85, 0.30), power=5.0,
                description="blue/yellow diagonal chequered quilt"),
    ClassDesign("mushroom", "part", "shared", 1.3, None, head_pattern="eye", head_colour=(0.90, 0.20, 0.70),
                head_colour2=(0.05, 0.05, 0.05), head_angle=-3 * math.pi / 4,
                description="plain body, magenta head with a white eye"),
    ClassDesign("cushion", "context", "superellipse", 1.4, (0.50, 0.15, 0.60), power=3.0, context="carpet",
                body_pattern="dots", pattern_colour=(0.80, 0.60, 0.90),
                description="purple cushion with pale buttons, usually on a carpet"),
)  # fmt: skip

CONTEXTS: tuple[str, ...] = ("water", "grass", "sand", "snow", "brick", "sky", "carpet")
_FULL_FRAME_CONTEXTS = frozenset({"brick", "sky"})


def class_names(num_classes: int) -> tuple[str, ...]:
    """The names of the first ``num_classes`` synthetic classes (channel order, no background)."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    return tuple(d.name for d in CLASS_DESIGNS[:num_classes])


# --------------------------------------------------------------------------------------------------
# geometry: approximate signed distances in pixels (positive inside); truth = d >= 0, alpha = d + 0.5


def _ellipse(u: F32, v: F32, a: float, b: float) -> F32:
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return ((1.0 - r) * min(a, b)).astype(np.float32)


def _superellipse(u: F32, v: F32, a: float, b: float, p: float) -> F32:
    r = (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1.0 / p)
    return ((1.0 - r) * min(a, b)).astype(np.float32)


def _blob(u: F32, v: F32, a: float, b: float, harmonics: Sequence[tuple[int, float, float]]) -> F32:
    un, vn = u / a, v / b
    rho = np.sqrt(un * un + vn * vn)
    theta = np.arctan2(vn, un)
    radius = np.ones_like(rho)
    for k, amp, phase in harmonics:
        radius += amp * np.cos(k * theta + phase)
    return ((1.0 - rho / radius) * min(a, b)).astype(np.float32)


def _segment(u: F32, v: F32, p0: tuple[float, float], p1: tuple[float, float], half_t: float) -> F32:
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    ll = dx * dx + dy * dy + 1e-9
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / ll, 0.0, 1.0)
    dist = np.hypot(u - (x0 + t * dx), v - (y0 + t * dy))
    return (half_t - dist).astype(np.float32)


def _polygon(u: F32, v: F32, pts: Sequence[tuple[float, float]]) -> F32:
    """Convex polygon, vertices in either orientation."""
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    area2 = float(np.sum(xs * np.roll(ys, -1) - np.roll(xs, -1) * ys))
    sign = 1.0 if area2 > 0 else -1.0
    d = np.full(u.shape, np.inf, dtype=np.float32)
    n = len(pts)
    for i in range(n):
        x0, y0 = pts[i]
        x1, y1 = pts[(i + 1) % n]
        ex, ey = x1 - x0, y1 - y0
        norm = math.hypot(ex, ey) + 1e-9
        # inside is to the left of each edge for a counter-clockwise polygon (in y-up terms)
        di = sign * ((u - x0) * ey - (v - y0) * ex) / norm
        d = np.minimum(d, -di)
    return d.astype(np.float32)


def _alpha(d: F32) -> F32:
    return np.clip(d + 0.5, 0.0, 1.0).astype(np.float32)


def _hsv(h: float, s: float, v: float) -> RGB:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


# --------------------------------------------------------------------------------------------------
# textures


class _Frame:
    """Pixel grid of one image and helpers to draw on it."""

    def __init__(self, width: int, height: int, rng: np.random.Generator) -> None:
        self.w, self.h = width, height
        self.s = float(min(width, height))
        self.rng = rng
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self.x, self.y = xs, ys
        self.thin = max(0.75, 0.0075 * self.s)  # half thickness of thin parts

    def noise(self, cell: float, stretch: tuple[float, float] = (1.0, 1.0)) -> F32:
        """Smooth value noise in [0, 1] with feature size ``cell`` pixels (x, y stretch)."""
        gw = max(2, int(math.ceil(self.w / (cell * stretch[0]))) + 2)
        gh = max(2, int(math.ceil(self.h / (cell * stretch[1]))) + 2)
        grid = self.rng.random((gh, gw), dtype=np.float32)
        img = Image.fromarray(grid, mode="F").resize((self.w, self.h), Image.Resampling.BICUBIC)
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)

    def local(self, cx: float, cy: float, theta: float, flip: bool) -> tuple[F32, F32]:
        dx, dy = self.x - cx, self.y - cy
        c, s = math.cos(theta), math.sin(theta)
        u = dx * c + dy * s
        v = -dx * s + dy * c
        return (-u if flip else u), v


def _pattern(name: str, u: F32, v: F32, period: float, a: float, b: float) -> F32:
    """Weight in [0, 1] of the second colour of a two-colour pattern, in object coordinates."""
    tau = 2.0 * math.pi / period

    def soft(x: F32) -> F32:
        return (0.5 + 0.5 * np.tanh(4.0 * x)).astype(np.float32)

    if name in ("stripes_v", "planks"):
        w = soft(np.sin(tau * u))
        return (w * 0.6).astype(np.float32) if name == "planks" else w
    if name == "stripes_h":
        return soft(np.sin(tau * v))
    if name == "diagonal":
        return soft(np.sin(tau * (u + v) / math.sqrt(2.0)))
    if name == "checker":
        return soft(np.sin(tau * u) * np.sin(tau * v) * 2.0)
    if name == "checker_diag":
        ru, rv = (u + v) / math.sqrt(2.0), (u - v) / math.sqrt(2.0)
        return soft(np.sin(tau * ru) * np.sin(tau * rv) * 2.0)
    if name == "dots":
        px = np.mod(u + period / 2, period) - period / 2
        py = np.mod(v + period / 2, period) - period / 2
        return _alpha((0.28 * period - np.hypot(px, py)).astype(np.float32))
    if name == "rings":
        return soft(np.sin(tau * np.hypot(u, v)))
    if name == "eye":
        r = np.hypot(u, v)
        white = _alpha((0.55 * b - r).astype(np.float32))
        pupil = _alpha((0.25 * b - r).astype(np.float32))
        return (white * 0.5 + pupil * 0.5).astype(np.float32)  # 0.5 = white, 1 = pupil (see caller)
    if name == "quadrants":
        return soft((u * v) / (a * b) * 8.0)
    if name == "frame":
        inner = _superellipse(u, v, a * 0.72, b * 0.78, 10.0)
        return _alpha(inner)
    raise ValueError(f"unknown pattern {name!r}")


# --------------------------------------------------------------------------------------------------
# objects


@dataclass
class _Layer:
    d: F32  # signed distance, pixels
    colour: F32  # (H, W, 3)
    role: str  # "body" | "head" | "thin"


@dataclass
class _Object:
    cls: int
    design: ClassDesign
    cx: float
    cy: float
    a: float
    b: float
    small: bool
    layers: list[_Layer] = field(default_factory=list)

    def mask(self) -> NDArray[np.bool_]:
        m = self.layers[0].d >= 0
        for layer in self.layers[1:]:
            m |= layer.d >= 0
        return m

    def head_mask(self) -> NDArray[np.bool_]:
        m = np.zeros(self.layers[0].d.shape, dtype=bool)
        for layer in self.layers:
            if layer.role == "head":
                m |= layer.d >= 0
        return m


def _jitter(rng: np.random.Generator, c: RGB, amount: float = 0.06) -> NDArray[np.float32]:
    return np.clip(np.asarray(c, dtype=np.float32) * (1.0 + rng.normal(0.0, amount, 3)), 0.0, 1.0).astype(
        np.float32
    )


def _two_colour(
    fr: _Frame,
    c1: NDArray[np.float32],
    c2: NDArray[np.float32],
    w: F32,
    u: F32,
    v: F32,
    a: float,
    b: float,
    light: tuple[float, float],
) -> F32:
    base = c1[None, None, :] * (1.0 - w[..., None]) + c2[None, None, :] * w[..., None]
    shade = np.clip(1.0 + 0.22 * (-(u / a) * light[0] - (v / b) * light[1]), 0.6, 1.35)
    grain = fr.rng.normal(0.0, 0.025, (fr.h, fr.w)).astype(np.float32)
    return (base * shade[..., None] + grain[..., None]).astype(np.float32)


def _shaded(
    fr: _Frame, c: NDArray[np.float32], u: F32, v: F32, a: float, b: float, light: tuple[float, float]
) -> F32:
    return _two_colour(fr, c, c, np.zeros_like(u), u, v, a, b, light)


def _build_object(
    fr: _Frame, cls: int, design: ClassDesign, cx: float, cy: float, a: float, b: float, small: bool,
    light: tuple[float, float],
) -> _Object:  # fmt: skip
    rng = fr.rng
    rot = 0.15 if design.kind == "context" else 0.35
    theta = float(rng.uniform(-rot, rot))
    flip = bool(rng.random() < 0.5)
    u, v = fr.local(cx, cy, theta, flip)
    obj = _Object(cls, design, cx, cy, a, b, small)
    t = fr.thin

    # body
    shape = design.body_shape
    power = design.power
    if shape == "shared":
        shape = ("ellipse", "superellipse")[int(rng.integers(2))]
        power = 2.6
    if shape == "ellipse":
        d_body = _ellipse(u, v, a, b)
    elif shape == "superellipse":
        d_body = _superellipse(u, v, a, b, power)
    else:
        harm = [
            (int(k), float(rng.uniform(0.06, 0.12)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 5)
        ]
        d_body = _blob(u, v, a, b, harm)
    if design.body_colour is None:
        c1 = _jitter(rng, SHARED_BODY_COLOURS[int(rng.integers(len(SHARED_BODY_COLOURS)))], 0.05)
    else:
        c1 = _jitter(rng, design.body_colour)
    if design.body_pattern is None:
        colour = _shaded(fr, c1, u, v, a, b, light)
    else:
        period = {"rings": 0.45, "dots": 0.55, "planks": 0.3}.get(design.body_pattern, 0.5) * b
        w = _pattern(design.body_pattern, u, v, period, a, b)
        colour = _two_colour(fr, c1, _jitter(rng, design.pattern_colour), w, u, v, a, b, light)
    obj.layers.append(_Layer(d_body, colour, "body"))

    # head (part classes): small, patterned, on the body outline
    hx = hy = 0.0
    hr = 0.0
    if design.head_pattern is not None:
        ang = design.head_angle + float(rng.uniform(-0.25, 0.25))
        hr = 0.48 * b
        hx, hy = 0.92 * a * math.cos(ang), 0.92 * b * math.sin(ang)
        uh, vh = u - hx, v - hy
        d_head = _ellipse(uh, vh, hr, hr)
        h1, h2 = _jitter(rng, design.head_colour, 0.04), _jitter(rng, design.head_colour2, 0.04)
        w = _pattern(design.head_pattern, uh, vh, 0.8 * hr, hr, hr)
        if design.head_pattern == "eye":  # magenta, white sclera (w = 0.5), dark pupil (w = 1)
            white = np.ones(3, dtype=np.float32)
            colour = np.where(
                (w >= 0.75)[..., None], h2[None, None, :], np.where((w >= 0.25)[..., None], white, h1)
            ).astype(np.float32)
        else:
            colour = _two_colour(fr, h1, h2, w, uh, vh, hr, hr, light)
        obj.layers.append(_Layer(d_head, colour, "head"))

    # thin parts
    dark = _jitter(rng, _DARK, 0.1)

    def thin(d: F32, c: NDArray[np.float32] = dark) -> None:
        obj.layers.append(_Layer(d, np.broadcast_to(c, (fr.h, fr.w, 3)).astype(np.float32), "thin"))

    app = design.appendage
    if design.kind == "part" and app is None:
        app = (None, "legs", "tail")[int(rng.integers(3))]
    if app == "legs":
        n = int(rng.integers(2, 5))
        for k in range(n):
            ux = a * (-0.6 + 1.2 * (k + 0.5) / n)
            vy = b * math.sqrt(max(0.0, 1.0 - (ux / a) ** 2)) * 0.85
            thin(_segment(u, v, (ux, vy), (ux * 1.1 + float(rng.uniform(-0.1, 0.1)) * a, vy + 0.8 * b), t))
    elif app == "antennae":
        ang = math.atan2(hy, hx)
        for off in (-0.45, 0.45):
            d0 = (hx + hr * math.cos(ang + off), hy + hr * math.sin(ang + off))
            d1 = (hx + 2.2 * hr * math.cos(ang + off), hy + 2.2 * hr * math.sin(ang + off))
            thin(_segment(u, v, d0, d1, t))
            thin(_ellipse(u - d1[0], v - d1[1], 1.6 * t + 0.6, 1.6 * t + 0.6))
    elif app == "tail":
        p0 = (-0.95 * a, 0.0)
        p1 = (-1.35 * a, -0.35 * b)
        p2 = (-1.6 * a, 0.05 * b)
        thin(_segment(u, v, p0, p1, t))
        thin(_segment(u, v, p1, p2, t))
    elif app == "mast":
        top = -b - 1.5 * b
        thin(_segment(u, v, (0.0, -0.5 * b), (0.0, top), t), _jitter(rng, (0.35, 0.22, 0.10)))
        flag = _polygon(u, v, [(t, top), (t + 0.7 * b, top + 0.3 * b), (t, top + 0.6 * b)])
        thin(flag, _jitter(rng, (0.97, 0.97, 0.97), 0.03))
    elif app == "string":
        p1 = (0.25 * a, b + 1.2 * b)
        p2 = (-0.1 * a, b + 2.4 * b)
        thin(_segment(u, v, (0.0, b * 0.95), p1, t * 0.8))
        thin(_segment(u, v, p1, p2, t * 0.8))
    elif app == "runners":
        grey = _jitter(rng, (0.25, 0.25, 0.28))
        yr = b + 0.45 * b
        thin(_segment(u, v, (-1.05 * a, yr), (1.1 * a, yr), t), grey)
        thin(_segment(u, v, (1.1 * a, yr), (1.25 * a, yr - 0.35 * b), t), grey)
        for ux in (-0.6 * a, 0.6 * a):
            thin(_segment(u, v, (ux, 0.8 * b), (ux, yr), t), grey)
    return obj


# --------------------------------------------------------------------------------------------------
# backgrounds and clutter


def _lower_region(fr: _Frame, horizon: float) -> F32:
    """Alpha of the area below a wavy horizon line."""
    rng = fr.rng
    amp = float(rng.uniform(0.0, 0.03)) * fr.h
    ph = float(rng.uniform(0, 2 * math.pi))
    line = horizon + amp * np.sin(fr.x * (2 * math.pi / fr.w) * float(rng.uniform(0.5, 2.0)) + ph)
    return _alpha((fr.y - line).astype(np.float32))


def _generic_background(fr: _Frame) -> F32:
    rng = fr.rng
    base = np.asarray(_hsv(float(rng.random()), float(rng.uniform(0.05, 0.4)), float(rng.uniform(0.35, 0.8))))
    img = np.broadcast_to(base.astype(np.float32), (fr.h, fr.w, 3)).copy()
    blot = fr.noise(fr.s * float(rng.uniform(0.15, 0.4)))
    img *= (0.85 + 0.3 * blot)[..., None]
    if rng.random() < 0.5:  # a floor
        floor = np.asarray(
            _hsv(float(rng.random()), float(rng.uniform(0.1, 0.5)), float(rng.uniform(0.25, 0.7)))
        )
        fa = _lower_region(fr, float(rng.uniform(0.55, 0.8)) * fr.h)
        grain = fr.noise(fr.s * 0.05, (6.0, 0.5))
        floor_img = floor[None, None, :].astype(np.float32) * (0.8 + 0.35 * grain)[..., None]
        img = (img * (1 - fa[..., None]) + floor_img * fa[..., None]).astype(np.float32)
    return img


def _context_texture(fr: _Frame, name: str) -> F32:
    rng = fr.rng
    x, y, s = fr.x, fr.y, fr.s
    if name == "water":
        base = _jitter(rng, (0.12, 0.36, 0.58), 0.08)
        p = s * float(rng.uniform(0.035, 0.05))
        ripple = np.sin(2 * math.pi * (y / p + 0.25 * np.sin(2 * math.pi * x / (7 * p))))
        glint = (fr.noise(s * 0.06, (5.0, 0.4)) > 0.7).astype(np.float32)
        f = 0.85 + 0.12 * ripple + 0.35 * glint * (ripple > 0.6)
        return (base[None, None, :] * f[..., None]).astype(np.float32)
    if name == "grass":
        base = _jitter(rng, (0.22, 0.50, 0.15), 0.08)
        blades = fr.noise(s * 0.03, (0.3, 3.0))
        patch = fr.noise(s * 0.3)
        f = 0.6 + 0.55 * blades + 0.2 * (patch - 0.5)
        return (base[None, None, :] * f[..., None]).astype(np.float32)
    if name == "sand":
        base = _jitter(rng, (0.84, 0.73, 0.52), 0.05)
        dunes = np.sin(2 * math.pi * (y / (s * 0.12) + 0.6 * fr.noise(s * 0.4)))
        speck = rng.normal(0.0, 0.06, (fr.h, fr.w)).astype(np.float32)
        f = 0.92 + 0.06 * dunes + speck
        return (base[None, None, :] * f[..., None]).astype(np.float32)
    if name == "snow":
        base = _jitter(rng, (0.92, 0.94, 0.98), 0.02)
        shadow = fr.noise(s * 0.25)
        sparkle = (rng.random((fr.h, fr.w)) > 0.985).astype(np.float32)
        img = base[None, None, :] * (0.85 + 0.15 * shadow)[..., None]
        img[..., 2] += 0.04 * (1 - shadow)
        return (img + 0.1 * sparkle[..., None]).astype(np.float32)
    if name == "brick":
        bh = s * float(rng.uniform(0.07, 0.09))
        bw = 2.2 * bh
        row = np.floor(y / bh)
        xo = x + (row % 2) * bw / 2
        col = np.floor(xo / bw)
        mortar = (np.mod(y, bh) < max(1.0, 0.12 * bh)) | (np.mod(xo, bw) < max(1.0, 0.06 * bw))
        hue_noise = np.sin(row * 12.9898 + col * 78.233) * 43758.5453
        shade = 0.8 + 0.3 * (hue_noise - np.floor(hue_noise))
        brick = _jitter(rng, (0.62, 0.25, 0.18), 0.06)
        img = brick[None, None, :] * shade[..., None]
        img[mortar] = _jitter(rng, (0.75, 0.72, 0.68), 0.03)
        return img.astype(np.float32)
    if name == "sky":
        top = _jitter(rng, (0.30, 0.55, 0.90), 0.05)
        bottom = _jitter(rng, (0.70, 0.82, 0.95), 0.04)
        g = (y / fr.h)[..., None]
        img = top * (1 - g) + bottom * g
        cloud = np.clip((fr.noise(s * 0.25, (2.0, 1.0)) - 0.55) * 4.0, 0.0, 1.0)[..., None]
        return (img * (1 - cloud) + 0.97 * cloud).astype(np.float32)
    if name == "carpet":
        base = _jitter(rng, (0.50, 0.08, 0.12), 0.06)
        gold = _jitter(rng, (0.85, 0.65, 0.20), 0.05)
        p = s * float(rng.uniform(0.09, 0.12))
        dx = np.abs(np.mod(x, p) - p / 2)
        dy = np.abs(np.mod(y, p) - p / 2)
        diamond = _alpha((p * 0.3 - (dx + dy)).astype(np.float32)) - _alpha(
            (p * 0.18 - (dx + dy)).astype(np.float32)
        )
        img = base * (1 - diamond[..., None]) + gold * diamond[..., None]
        return (img * (0.9 + 0.15 * fr.noise(s * 0.02))[..., None]).astype(np.float32)
    raise ValueError(f"unknown context {name!r}")


@dataclass
class _Clutter:
    d: F32
    colour: F32
    kind: str
    front: bool = False
    contrast: float = 0.0


def _make_clutter(fr: _Frame, kind: str) -> _Clutter:
    rng = fr.rng
    s = fr.s
    cx, cy = float(rng.uniform(0, fr.w)), float(rng.uniform(0, fr.h))
    r = s * float(rng.uniform(0.05, 0.16))
    theta = float(rng.uniform(0, math.pi))
    u, v = fr.local(cx, cy, theta, False)

    def flat(c: NDArray[np.float32]) -> F32:
        grain = rng.normal(0.0, 0.02, (fr.h, fr.w)).astype(np.float32)
        return (c[None, None, :] + grain[..., None]).astype(np.float32)

    def rand_colour() -> NDArray[np.float32]:
        c = _hsv(float(rng.random()), float(rng.uniform(0.0, 0.9)), float(rng.uniform(0.1, 1.0)))
        return np.asarray(c, dtype=np.float32)

    if kind == "polygon":
        n = int(rng.integers(3, 7))
        angs = np.sort(rng.uniform(0, 2 * math.pi, n))
        rr = r * rng.uniform(0.6, 1.0, n)
        pts = [(float(rr[i] * math.cos(angs[i])), float(rr[i] * math.sin(angs[i]))) for i in range(n)]
        return _Clutter(_polygon(u, v, pts), flat(rand_colour()), kind)
    if kind == "stripes":
        d = _superellipse(u, v, r * 1.3, r * 0.7, 8.0)
        w = _pattern("stripes_v", u, v, r * float(rng.uniform(0.3, 0.5)), r, r)
        c1, c2 = rand_colour(), rand_colour()
        colour = c1[None, None, :] * (1 - w[..., None]) + c2[None, None, :] * w[..., None]
        return _Clutter(d, colour.astype(np.float32), kind)
    if kind == "ring":
        d_out = _ellipse(u, v, r, r * float(rng.uniform(0.6, 1.0)))
        d = np.minimum(d_out, -(d_out - max(1.5, 0.25 * r))).astype(np.float32)
        return _Clutter(d, flat(rand_colour()), kind)
    if kind == "spots":
        d = np.full((fr.h, fr.w), -1e3, dtype=np.float32)
        for _ in range(int(rng.integers(3, 7))):
            ox, oy = rng.uniform(-2 * r, 2 * r, 2)
            rs = r * float(rng.uniform(0.15, 0.3))
            d = np.maximum(d, _ellipse(u - float(ox), v - float(oy), rs, rs))
        return _Clutter(d, flat(rand_colour()), kind)
    if kind == "cable":
        ang = float(rng.uniform(0, math.pi))
        length = 2.0 * max(fr.w, fr.h)
        p0 = (-length * math.cos(ang), -length * math.sin(ang))
        p1 = (length * math.cos(ang), length * math.sin(ang))
        d = _segment(u, v, p0, p1, fr.thin * float(rng.uniform(0.8, 1.6)))
        front = bool(rng.random() < 0.3)
        return _Clutter(d, flat(_jitter(rng, _DARK, 0.2)), kind, front=front)
    if kind == "body_blob":  # a plain part-class body without a head: background
        a = r * float(rng.uniform(1.0, 1.6))
        c = _jitter(rng, SHARED_BODY_COLOURS[int(rng.integers(len(SHARED_BODY_COLOURS)))], 0.05)
        d = _ellipse(u, v, a, r) if rng.random() < 0.5 else _superellipse(u, v, a, r, 2.6)
        return _Clutter(d, _shaded(fr, c, u, v, a, r, (0.5, 0.8)), kind)
    raise ValueError(f"unknown clutter {kind!r}")


_CLUTTER_KINDS: tuple[str, ...] = ("polygon", "stripes", "ring", "spots", "cable", "body_blob")


def _paint(img: F32, d: F32, colour: F32) -> None:
    a = _alpha(d)[..., None]
    img *= 1.0 - a
    img += colour * a


# --------------------------------------------------------------------------------------------------
# one image


@dataclass
class SynthSample:
    """One generated image: ``image`` (H, W, 3) uint8 RGB, ``label`` (H, W) uint8 VOC labels,
    ``saliency`` (H, W) uint8 and ``meta`` (the manifest's metadata fields)."""

    image: NDArray[np.uint8]
    label: NDArray[np.uint8]
    saliency: NDArray[np.uint8]
    meta: dict[str, Any]


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _place(
    fr: _Frame,
    placed: list[tuple[float, float, float]],
    radius: float,
    occlude: bool,
    y_range: tuple[float, float] | None,
) -> tuple[float, float]:
    """A centre for an object of the given radius: overlapping the last placed object when
    ``occlude``, otherwise as far as possible (12 tries) from the others."""
    rng = fr.rng
    x_lo, x_hi = 0.12 * fr.w, 0.88 * fr.w
    y_lo, y_hi = (0.15 * fr.h, 0.85 * fr.h) if y_range is None else y_range
    if placed and occlude:
        ox, oy, orad = placed[-1]
        ang = float(rng.uniform(0, 2 * math.pi))
        dist = float(rng.uniform(0.35, 0.65)) * (radius + orad)
        cx = float(np.clip(ox + dist * math.cos(ang), x_lo, x_hi))
        cy = float(np.clip(oy + dist * math.sin(ang), y_lo, y_hi))
        return cx, cy
    best = (float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi)))
    best_gap = -math.inf
    for _ in range(12):
        cx, cy = float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))
        gap = min((math.hypot(cx - px, cy - py) - pr for px, py, pr in placed), default=math.inf)
        if gap > best_gap:
            best, best_gap = (cx, cy), gap
        if gap > 1.2 * radius:
            break
    return best


def _lighting(fr: _Frame, img: F32) -> NDArray[np.uint8]:
    rng = fr.rng
    beta = float(rng.uniform(0, 2 * math.pi))
    ramp = ((fr.x - fr.w / 2) * math.cos(beta) + (fr.y - fr.h / 2) * math.sin(beta)) / max(fr.w, fr.h)
    vig = ((fr.x - fr.w / 2) / (fr.w / 2)) ** 2 + ((fr.y - fr.h / 2) / (fr.h / 2)) ** 2
    light = float(rng.uniform(0.8, 1.12)) * (
        1.0 + float(rng.uniform(0.15, 0.5)) * ramp - float(rng.uniform(0, 0.15)) * vig
    )
    cast = rng.uniform(0.92, 1.08, 3).astype(np.float32)
    out = img * light[..., None] * cast[None, None, :]
    out += rng.normal(0.0, float(rng.uniform(0.01, 0.03)), out.shape).astype(np.float32)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _void_band(label: NDArray[np.uint8], width: int) -> NDArray[np.uint8]:
    """Set to 255 every pixel within about ``width / 2`` pixels of a boundary between two labels."""
    if width <= 0:
        return label
    k = 2 * max(1, int(round(width / 2))) + 1
    im = Image.fromarray(label)
    hi = np.asarray(im.filter(ImageFilter.MaxFilter(k)))
    lo = np.asarray(im.filter(ImageFilter.MinFilter(k)))
    out = label.copy()
    out[hi != lo] = IGNORE_INDEX
    return out


def _saliency(
    fr: _Frame, objs: list[_Object], inst: NDArray[np.int16], clutter: list[_Clutter]
) -> tuple[NDArray[np.uint8], bool, bool]:
    """An imperfect saliency map, and whether (above 127) it fires on clutter and misses an object."""
    rng = fr.rng
    fg = inst >= 0
    sal = np.zeros((fr.h, fr.w), dtype=np.float32)
    k = 2 * max(1, int(round(2.0 * fr.thin))) + 1  # opening removes parts thinner than ~k pixels
    for i, o in enumerate(objs):
        m = Image.fromarray(((inst == i) * 255).astype(np.uint8))
        opened = np.asarray(m.filter(ImageFilter.MinFilter(k)).filter(ImageFilter.MaxFilter(k)), np.float32)
        strength = float(rng.uniform(0.75, 1.0))
        if o.small and rng.random() < 0.4:  # a small object the detector (nearly) misses
            strength *= float(rng.uniform(0.1, 0.35))
        sal = np.maximum(sal, opened / 255.0 * strength)
    fp_mask = np.zeros_like(fg)
    for c in clutter:  # high-contrast distractors light up
        if c.front or c.kind == "cable" or c.contrast < 0.25 or rng.random() >= 0.5:
            continue
        vis = (c.d >= 0) & ~fg
        if vis.sum() < 0.002 * fr.w * fr.h:
            continue
        sal = np.maximum(sal, vis.astype(np.float32) * float(rng.uniform(0.55, 0.95)))
        fp_mask |= vis
    im = Image.fromarray(np.clip(sal * 255.0 + 0.5, 0, 255).astype(np.uint8))
    morph = int(rng.integers(3))  # edges shifted out or in by a pixel
    if morph == 1:
        im = im.filter(ImageFilter.MaxFilter(3))
    elif morph == 2:
        im = im.filter(ImageFilter.MinFilter(3))
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 1.6)) * fr.s / 100.0))
    out = np.asarray(im, dtype=np.float32) / 255.0
    out = out * (0.8 + 0.3 * fr.noise(fr.s * 0.3)) + 0.08 * fr.noise(fr.s * 0.2)
    final = np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
    on = final > 127
    false_pos = bool((on & fp_mask).any())
    missed = any(not on[inst == i].any() for i in range(len(objs)))
    return final, false_pos, missed


def _render(fr: _Frame, config: SynthConfig) -> SynthSample | None:
    """One attempt at an image; None when no object stayed visible (the caller retries)."""
    rng = fr.rng
    designs = CLASS_DESIGNS[: config.num_classes]
    k = config.num_classes
    w, h = fr.w, fr.h

    # classes: 1..max_objects objects, mostly distinct classes
    n = 1 + int(rng.binomial(config.max_objects - 1, 0.45))
    classes: list[int] = []
    for _ in range(n):
        unused = [j for j in range(k) if j not in classes]
        if classes and (not unused or rng.random() < 0.15):
            classes.append(classes[int(rng.integers(len(classes)))])
        else:
            classes.append(unused[int(rng.integers(len(unused)))])

    # background, maybe a context
    context: str | None = None
    context_class: int | None = None
    for cls in classes:
        if designs[cls].context is not None:
            if rng.random() < config.p_context:
                context, context_class = designs[cls].context, cls
            break
    if context is None:
        available = [d.context for d in designs if d.context is not None]
        if available and rng.random() < config.p_context_alone:
            context = available[int(rng.integers(len(available)))]
    img = _generic_background(fr)
    ctx_range: tuple[float, float] | None = None
    if context is not None:
        tex = _context_texture(fr, context)
        if context in _FULL_FRAME_CONTEXTS:
            img = tex
        else:
            horizon = float(rng.uniform(0.3, 0.5)) * h
            ra = _lower_region(fr, horizon)[..., None]
            img = img * (1 - ra) + tex * ra
            ctx_range = (horizon + 0.3 * (h - horizon), 0.9 * h)

    # clutter behind the objects (cables may cross in front)
    clutter: list[_Clutter] = []
    if config.max_clutter > 0 and rng.random() < 0.9:
        for _ in range(int(rng.integers(1, config.max_clutter + 1))):
            c = _make_clutter(fr, _CLUTTER_KINDS[int(rng.integers(len(_CLUTTER_KINDS)))])
            m = c.d >= 0
            if m.any():
                c.contrast = float(np.abs(c.colour[m] - img[m]).mean())
            if not c.front:
                _paint(img, c.d, c.colour)
            clutter.append(c)

    # objects
    light_ang = float(rng.uniform(-math.pi, 0.0))  # from above
    light = (math.cos(light_ang), math.sin(light_ang))
    placed: list[tuple[float, float, float]] = []
    objs: list[_Object] = []
    shrink = (1.0, 0.9, 0.8, 0.75, 0.7, 0.65)[n - 1]
    for cls in classes:
        d = designs[cls]
        b = fr.s * float(rng.uniform(0.12, 0.19)) * shrink
        small = bool(rng.random() < config.p_small)
        if small:
            b *= 0.55
        a = b * d.aspect * float(rng.uniform(0.9, 1.1))
        if d.aspect < 1.0:  # tall objects: keep the height in range
            a, b = a / d.aspect * 0.8, b / d.aspect * 0.8
        radius = max(a, b)
        y_range = ctx_range if (cls == context_class and ctx_range is not None) else None
        occlude = bool(rng.random() < config.p_occlusion)
        cx, cy = _place(fr, placed, radius, occlude, y_range)
        placed.append((cx, cy, radius))
        objs.append(_build_object(fr, cls, d, cx, cy, a, b, small, light))

    # visibility: drop objects hidden too much, depth order = list order
    masks = [o.mask() for o in objs]
    front = [c.d >= 0 for c in clutter if c.front]
    min_area = 0.003 * w * h
    while True:
        inst = np.full((h, w), -1, dtype=np.int16)
        for i, m in enumerate(masks):
            inst[m] = i
        for m in front:
            inst[m] = -1
        vis = [int((inst == i).sum()) for i in range(len(objs))]
        ratio = [vis[i] / max(1, int(masks[i].sum())) for i in range(len(objs))]
        bad = [i for i in range(len(objs)) if vis[i] < max(0.25 * masks[i].sum(), min_area)]
        if not bad:
            break
        drop = min(bad, key=lambda i: ratio[i])
        del objs[drop], masks[drop]
        if not objs:
            return None

    for o in objs:
        for layer in o.layers:
            _paint(img, layer.d, layer.colour)
    for c in clutter:
        if c.front:
            _paint(img, c.d, c.colour)
    image = _lighting(fr, img)

    label = np.zeros((h, w), dtype=np.uint8)
    for i, o in enumerate(objs):
        label[inst == i] = o.cls + 1
    label = _void_band(label, config.void_band)
    present = sorted(int(v) - 1 for v in np.unique(label) if 0 < v < IGNORE_INDEX)
    if not present:
        return None

    # the detector sees objects through thin cables: objects occlude each other, cables do not
    inst_objects = np.full((h, w), -1, dtype=np.int16)
    for i, m in enumerate(masks):
        inst_objects[m] = i
    saliency, false_pos, missed = _saliency(fr, objs, inst_objects, clutter)

    # metadata
    obj_meta: list[dict[str, Any]] = []
    any_occluded = False
    any_part = False
    for i, o in enumerate(objs):
        vis_m = inst == i
        full = int(masks[i].sum())
        covered = int((masks[i] & (inst >= 0) & (inst != i)).sum())
        occluded = covered >= 0.04 * full
        any_occluded |= occluded
        ys, xs = np.nonzero(vis_m)
        head = int((o.head_mask() & vis_m).sum())
        any_part |= o.design.kind == "part" and head > 0
        obj_meta.append(
            {
                "class": o.design.name,
                "kind": o.design.kind,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "area": int(vis_m.sum()),
                "full_area": full,
                "head_area": head,
                "occluded": bool(occluded),
                "small": o.small,
            }
        )
    n_clutter = len(clutter)
    modes = {
        "small_part": any_part,
        "context": context_class is not None,
        "occlusion": any_occluded,
        "clutter": n_clutter > 0,
    }
    meta: dict[str, Any] = {
        "labels": [designs[c].name for c in present],
        "objects": obj_meta,
        "context": context,
        "context_class": None if context_class is None else designs[context_class].name,
        "occluded": bool(any_occluded),
        "clutter": n_clutter,
        "clutter_in_front": sum(c.front for c in clutter),
        "saliency_false_positive": false_pos,
        "saliency_missed": missed,
        "failure_modes": sorted(m for m, on in modes.items() if on),
    }
    return SynthSample(image, label, saliency, meta)


def render_sample(config: SynthConfig, split: str, index: int) -> SynthSample:
    """Image ``index`` of ``split`` ("train" or "val") of the dataset ``config`` describes, in memory.

    Pure function of ``(config, split, index)``: it is what :func:`synthesize` writes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fr = _Frame(config.size[0], config.size[1], _image_rng(config.seed, split, index))
    for _ in range(50):
        sample = _render(fr, config)
        if sample is not None:
            return sample
    raise RuntimeError(f"could not draw a visible object for {split} image {index} (size {config.size})")


# --------------------------------------------------------------------------------------------------
# writing


def sample_id(split: str, index: int) -> str:
    """The image id of image ``index`` of ``split``: ``train_000000``, ``val_000012``, ..."""
    return f"{split}_{index:06d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(arr: NDArray[np.uint8], quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 (no chroma subsampling): the small coloured heads keep their colours
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _command(config: SynthConfig) -> str:
    defaults = SynthConfig()
    parts = [f"hsc data synth OUT --train {config.train} --val {config.val} --seed {config.seed}"]
    parts.append(f"--size {config.size[0]}x{config.size[1]} --classes {config.num_classes}")
    if config.max_objects != defaults.max_objects:
        parts.append(f"--max-objects {config.max_objects}")
    if config.void_band:
        parts.append(f"--void-band {config.void_band}")
    if config.jpeg_quality != defaults.jpeg_quality:
        parts.append(f"--jpeg-quality {config.jpeg_quality}")
    other = {
        f: getattr(config, f)
        for f in ("p_context", "p_context_alone", "p_occlusion", "p_small", "max_clutter")
        if getattr(config, f) != getattr(defaults, f)
    }
    cmd = " ".join(parts)
    if other:
        cmd += "  # API-only settings: " + ", ".join(f"{k}={v}" for k, v in other.items())
    return cmd


def _readme(config: SynthConfig, counts: dict[str, int]) -> str:
    designs = CLASS_DESIGNS[: config.num_classes]
    total = config.train + config.val
    lines = [
        "# Synthetic weakly supervised segmentation data (hsc)",
        "",
        "**Synthetic data for tests and benchmarks only.** These images were drawn procedurally by",
        "`hsc.training.synth`; they are not photographs and results on them do not transfer to real",
        "data. They exist so that the CAM / pseudo-label pipeline can be trained and scored against",
        "exact pixel truth without downloading anything.",
        "",
        "Generated with:",
        "",
        "```",
        _command(config),
        "```",
        "",
        f"{config.train} train and {config.val} val images of {config.size[0]}x{config.size[1]} pixels;",
        "the same command (same numpy / Pillow) gives the same files byte for byte.",
        "",
        "## Layout (PASCAL VOC)",
        "",
        "- `JPEGImages/<id>.jpg`: the images (RGB JPEG, quality " + str(config.jpeg_quality) + ").",
        "- `SegmentationClass/<id>.png`: VOC palette PNGs of the pixel truth: 0 background, `c + 1` class"
        " `c`"
        + (
            f", 255 void on a {config.void_band}-pixel band along label boundaries."
            if config.void_band
            else " (no void band)."
        ),
        "- `saliency/<id>.png`: 8-bit grey saliency maps, 255 = salient (imperfect, see below).",
        "- `ImageSets/Segmentation/train.txt`, `val.txt`: the ids of each split.",
        "- `cls_labels.npy`: pickled dict id -> float32[K] multi-hot in channel space (SEAM/EPS format).",
        "- `classes.txt`: `background`, then the K class names.",
        '- `manifest.jsonl`: one line per image of both splits, `{"image", "labels", "mask", "saliency"}`',
        '  with paths relative to this folder, a `"split"` field and per-image metadata (`objects`,',
        "  `context`, `occluded`, `clutter`, `failure_modes`, ...); `manifest_train.jsonl` and",
        "  `manifest_val.jsonl` hold the same lines for one split each.",
        "- `synth_config.json`: the full recipe.",
        "",
        "## Classes",
        "",
        "| channel | name | kind | looks like |",
        "|---|---|---|---|",
    ]
    lines += [f"| {i} | {d.name} | {d.kind} | {d.description} |" for i, d in enumerate(designs)]
    lines += [
        "",
        "## Failure modes of CAMs built in",
        "",
    ]
    bullets = [
        "**small discriminative parts** (`part` classes): a plain body whose colour and shape are shared by"
        " all part classes, with a small patterned head that alone tells the class; plain body-coloured"
        " blobs also appear as background. A CAM tends to cover only the head.",
        "**co-occurring context** (`context` classes): the class appears on its own background (water,"
        f" grass, ...) with probability {config.p_context}; contexts also appear without their class"
        f" (probability {config.p_context_alone}). A CAM tends to spill onto the context.",
        f"**occlusion**: objects overlap (probability {config.p_occlusion} per extra object); the truth is"
        " the visible part, the front object drawn last.",
        "**clutter**: polygons, stripe patches, rings, spots, cables (sometimes in front of objects) and"
        " body-coloured blobs, all background.",
        "thin parts (legs, antennae, masts, strings, tails) belong to the objects; small objects"
        f" (probability {config.p_small}); lighting gradients, vignetting, colour casts and noise.",
    ]
    lines += [textwrap.fill(b, width=100, initial_indent="- ", subsequent_indent="  ") for b in bullets]
    lines += [
        "",
        "Saliency maps imitate a detector: thin parts and some small objects are missed, high-contrast",
        "clutter gives false positives, edges are shifted and blurred.",
        "",
        f"Images with each failure mode (of {total}): "
        + ", ".join(f"{m} {counts[m]}" for m in FAILURE_MODES)
        + ".",
        "",
    ]
    return "\n".join(lines)


def _prepare_out(out: Path, force: bool) -> bool:
    """Check / create ``out``; returns True when it held an earlier synthetic set."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force (force=True) to overwrite it")
        ours = (out / _MARKER).is_file()
        # the index files go first, so an interrupted rerun never lists a half-written set
        index = [_MARKER, "README.md", "cls_labels.npy", "classes.txt", "manifest.jsonl"]
        index += [f"manifest_{s}.jsonl" for s in SPLITS]
        index += [f"ImageSets/Segmentation/{s}.txt" for s in SPLITS]
        for name in index:
            p = out / name
            if p.is_file():
                p.unlink()
        return ours
    out.mkdir(parents=True, exist_ok=True)
    return False


def synthesize_config(out_dir: str | os.PathLike[str], config: SynthConfig, *, force: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the dataset ``config`` describes to ``out_dir`` (see the module docstring) and return a
    summary. Refuses a non-empty ``out_dir`` unless ``force``. Images are written first, the lists,
    labels, manifests, config and README last (each file through a temporary name)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    was_ours = _prepare_out(out, force)
    for sub in ("JPEGImages", "SegmentationClass", "saliency", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = class_names(config.num_classes)
    cls_labels: dict[str, NDArray[np.float32]] = {}
    records: dict[str, list[str]] = {s: [] for s in SPLITS}
    ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(FAILURE_MODES, 0)
    total = config.train + config.val
    done = 0
    for split, n in zip(SPLITS, (config.train, config.val)):
        for i in range(n):
            sid = sample_id(split, i)
            s = render_sample(config, split, i)
            _atomic_write(out / "JPEGImages" / f"{sid}.jpg", _jpeg_bytes(s.image, config.jpeg_quality))
            _atomic_write(out / "SegmentationClass" / f"{sid}.png", label_to_png(s.label))
            _atomic_write(out / "saliency" / f"{sid}.png", _png_bytes(Image.fromarray(s.saliency, mode="L")))
            y = np.zeros(config.num_classes, dtype=np.float32)
            y[[names.index(c) for c in s.meta["labels"]]] = 1.0
            cls_labels[sid] = y
            rec = {
                "id": sid,
                "split": split,
                "image": f"JPEGImages/{sid}.jpg",
                "mask": f"SegmentationClass/{sid}.png",
                "saliency": f"saliency/{sid}.png",
                **s.meta,
            }
            records[split].append(json.dumps(rec, sort_keys=False))
            ids[split].append(sid)
            for m in s.meta["failure_modes"]:
                counts[m] += 1
            done += 1
            if progress is not None:
                progress(done, total)

    if was_ours:  # files of an earlier, larger set that the new lists do not name
        keep = {sid for s in SPLITS for sid in ids[s]}
        for sub in ("JPEGImages", "SegmentationClass", "saliency"):
            for p in (out / sub).iterdir():
                if p.is_file() and _ID_RE.match(p.stem) and p.stem not in keep:
                    p.unlink()

    buf = io.BytesIO()
    np.save(buf, np.array(cls_labels, dtype=object), allow_pickle=True)
    _atomic_write(out / "cls_labels.npy", buf.getvalue())
    _atomic_write(out / "classes.txt", ("\n".join((BACKGROUND, *names)) + "\n").encode())
    for split in SPLITS:
        _atomic_write(out / f"manifest_{split}.jsonl", "".join(r + "\n" for r in records[split]).encode())
    _atomic_write(out / "manifest.jsonl", "".join(r + "\n" for s in SPLITS for r in records[s]).encode())
    for split in SPLITS:
        _atomic_write(out / "ImageSets" / "Segmentation" / f"{split}.txt",
                      "".join(i + "\n" for i in ids[split]).encode())  # fmt: skip
    recipe = {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "classes": [asdict(d) for d in CLASS_DESIGNS[: config.num_classes]],
        "failure_mode_counts": counts,
    }
    _atomic_write(out / _MARKER, (json.dumps(recipe, indent=2) + "\n").encode())
    _atomic_write(out / "README.md", _readme(config, counts).encode())
    return {
        "out": str(out),
        "train": config.train,
        "val": config.val,
        "seed": config.seed,
        "size": list(config.size),
        "classes": list(names),
        "failure_mode_counts": counts,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def synthesize(
    out_dir: str | os.PathLike[str],
    *,
    train: int,
    val: int,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    num_classes: int = 5,
    max_objects: int = 3,
    void_band: int = 0,
    jpeg_quality: int = 95,
    force: bool = False,
) -> dict[str, Any]:
    """Write a synthetic VOC-layout dataset (``size`` is ``(width, height)``); see
    :class:`SynthConfig` and the module docstring. Returns a summary dict."""
    config = SynthConfig(
        train=train,
        val=val,
        seed=seed,
        size=(int(size[0]), int(size[1])),
        num_classes=num_classes,
        max_objects=max_objects,
        void_band=void_band,
        jpeg_quality=jpeg_quality,
    )
    return synthesize_config(out_dir, config, force=force)


# --------------------------------------------------------------------------------------------------
# command line (wired as ``hsc data synth`` by core/cli.py)


def parse_size(text: str) -> tuple[int, int]:
    """``"160x120"`` -> ``(160, 120)`` (width x height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 160x120), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``hsc data synth``."""
    d = SynthConfig()
    parser.add_argument("out", help="output folder (must be empty or absent unless --force)")
    parser.add_argument("--train", type=int, default=d.train, help="train images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=d.val, help="val images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    parser.add_argument("--size", type=parse_size, default=d.size, metavar="WxH",
                        help=f"image size, width x height (default: {d.size[0]}x{d.size[1]})")  # fmt: skip
    parser.add_argument("--classes", type=int, default=d.num_classes, metavar="K", dest="num_classes",
                        help=f"number of classes, 1..{MAX_CLASSES} (default: %(default)s)")  # fmt: skip
    parser.add_argument("--max-objects", type=int, default=d.max_objects,
                        help="most objects in one image (default: %(default)s)")  # fmt: skip
    parser.add_argument("--void-band", type=int, default=d.void_band, metavar="PX",
                        help="width of a 255 (ignore) band on label boundaries, as VOC's ~5 px; "
                        "0 = exact truth (default: %(default)s)")  # fmt: skip
    parser.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality,
                        help="JPEG quality (default: %(default)s)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run_synth(args: argparse.Namespace) -> int:
    """``hsc data synth``: write the dataset, print a JSON summary; 2 on a refused or bad request."""
    try:
        config = SynthConfig(
            train=args.train,
            val=args.val,
            seed=args.seed,
            size=tuple(args.size),
            num_classes=args.num_classes,
            max_objects=args.max_objects,
            void_band=args.void_band,
            jpeg_quality=args.jpeg_quality,
        )
    except ValueError as e:
        sys.stderr.write(f"hsc data synth: {e}\n")
        return 2

    def progress(done: int, total: int) -> None:
        if done == total or done % 25 == 0:
            sys.stderr.write(f"\rsynth: {done}/{total} images")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    try:
        summary = synthesize_config(
            args.out, config, force=args.force, progress=None if getattr(args, "quiet", False) else progress
        )
    except FileExistsError as e:
        sys.stderr.write(f"hsc data synth: {e}\n")
        return 2
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0
