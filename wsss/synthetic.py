"""Synthetic weakly supervised segmentation data: the embedded default for the demo and tests.

Each foreground class is a shape family drawn with a class texture and carries a small part of a
class-specific black-and-white design (an eye, an antenna, a bullseye, ...) at a fixed place in the
object's own frame. Colours come from one palette shared by all classes, and distractor shapes
reuse class shapes and textures in mismatched pairs without a part, so colour tells nothing and
shape or texture alone is unreliable: the part is the most discriminative cue. A classifier trained
on image labels therefore tends to fire on the part, and the refinement stages have to grow that
seed to the whole object -- which is what makes the data a real test of the method.

Sample i depends only on (seed, i), so any prefix of a dataset is the same and generation can be
split across processes. Rendering is vectorised numpy over each object's bounding window plus PIL
for resizing noise and drawing clutter lines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, model_validator
from scipy import ndimage

from wsss.imageio import IGNORE_INDEX
from wsss.params import Params

# (u, v) in the object frame, major axis along u, both scaled so the object spans about [-1, 1].
Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (x, y) object-frame pixel offsets rotated to the texture angle, period in pixels -> [0, 1].
Texture = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]
# (u, v) in part units (radius about 1) -> (inside, white): the part is drawn black or white.
Part = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# --- shape families ---------------------------------------------------------------------------


def _disc(u, v):
    return u * u + v * v < 1.0


def _box(u, v):
    u2, v2 = u * u, v * v
    return u2 * u2 * u2 + v2 * v2 * v2 < 1.0


def _triangle(u, v):
    # Circumradius 1, one vertex on +u.
    c, s = 0.5, math.sqrt(3) / 2
    return (-u < 0.5) & (c * u + s * v < 0.5) & (c * u - s * v < 0.5)


def _hexagon(u, v):
    inner = math.cos(math.pi / 6)
    return (
        (np.abs(u) < inner)
        & (np.abs(0.5 * u + inner * v) < inner)
        & (np.abs(0.5 * u - inner * v) < inner)
    )


def _star(u, v):
    # Five straight-sided points, one on +u; the valleys sit at 42% of the tip radius.
    turns = np.arctan2(v, u) * (5 / (2 * math.pi))
    tip = 2 * np.abs(turns - np.floor(turns) - 0.5)
    return np.hypot(u, v) < 0.42 + 0.58 * tip


def _diamond(u, v):
    return np.abs(u) + np.abs(v) < 1.0


def _plus(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au < 1) & (av < 0.34)) | ((au < 0.34) & (av < 1))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 < 1.0) & (r2 > 0.5**2)


def _crescent(u, v):
    return (u * u + v * v < 1.0) & ((u - 0.5) ** 2 + v * v > 0.72**2)


# --- textures ---------------------------------------------------------------------------------


def _stripes(x, y, period, rng):
    return (np.mod(x / period + rng.uniform(), 1.0) < 0.5).astype(np.float32)


def _checker(x, y, period, rng):
    ox, oy = rng.uniform(0, period, 2)
    return np.mod(np.floor((x + ox) / period) + np.floor((y + oy) / period), 2).astype(np.float32)


def _dots(x, y, period, rng):
    # Staggered rows of dots.
    ox, oy = rng.uniform(0, period, 2)
    y = y + oy
    x = x + ox + 0.5 * period * np.mod(np.floor(y / period), 2)
    dx = np.mod(x, period) - 0.5 * period
    dy = np.mod(y, period) - 0.5 * period
    return (dx * dx + dy * dy < (0.3 * period) ** 2).astype(np.float32)


def _rings(x, y, period, rng):
    return (np.mod(np.hypot(x, y) / period + rng.uniform(), 1.0) < 0.5).astype(np.float32)


def _hatch(x, y, period, rng):
    ox, oy = rng.uniform(0, period, 2)
    lines = (np.mod(x + ox, period) < 0.2 * period) | (np.mod(y + oy, period) < 0.2 * period)
    return lines.astype(np.float32)


def _blobs(x, y, period, rng):
    # Sum of plane waves of one wavelength in random directions; its high crests are irregular
    # isolated spots (about a quarter of the area).
    k = 2 * math.pi / (1.5 * period)
    field = np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32)
    for angle, phase in rng.uniform(0, 2 * math.pi, (5, 2)):
        field += np.cos(k * (math.cos(angle) * x + math.sin(angle) * y) + phase)
    return (field > 1.1).astype(np.float32)


def _chevrons(x, y, period, rng):
    zigzag = np.abs(np.mod(y / period, 2.0) - 1.0) * period
    return (np.mod((x + zigzag) / period + rng.uniform(), 1.0) < 0.5).astype(np.float32)


def _waves(x, y, period, rng):
    bend = 0.35 * period * np.sin(2 * math.pi * y / (1.8 * period))
    return (np.mod((x + bend) / period + rng.uniform(), 1.0) < 0.5).astype(np.float32)


def _spokes(x, y, period, rng):
    turns = np.arctan2(y, x) * (12 / (2 * math.pi))
    return (np.mod(turns + rng.uniform(), 1.0) < 0.5).astype(np.float32)


def _bricks(x, y, period, rng):
    ox, oy = rng.uniform(0, period, 2)
    height = 0.6 * period
    y = y + oy
    x = x + ox + period * np.mod(np.floor(y / height), 2)
    mortar = (np.mod(y, height) < 0.22 * height) | (np.mod(x, 2 * period) < 0.22 * height)
    return mortar.astype(np.float32)


def _fill(x, y, period, rng):
    return np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32)


def _gradient(x, y, period, rng):
    span = max(float(np.ptp(x)), 1.0)
    return ((x - x.min()) / span).astype(np.float32)


# --- parts (black/white, radius about 1 in part units) -----------------------------------------


def _eye(u, v):
    r = np.hypot(u, v)
    return r < 1.0, (r > 0.45) & (r < 0.8)


def _antenna(u, v):
    # Stalk from inside the body (v > 0) out past the edge (v < 0), ending in a white ball.
    stalk = (np.abs(u) < 0.17) & (v > -1.6) & (v < 0.3)
    r = np.hypot(u, v + 2.0)
    return stalk | (r < 0.6), r < 0.38


def _bullseye(u, v):
    r = np.hypot(u, v)
    return r < 1.0, (r > 0.34) & (r < 0.67)


def _cross_badge(u, v):
    au, av = np.abs(u), np.abs(v)
    edge = np.maximum(au, av)
    return edge < 0.9, (edge < 0.72) & (np.abs(au - av) > 0.2)


def _fin(u, v):
    # Triangle pointing out of the body along -u, crossed by a white band.
    inside = (u < 0.3) & (u > -1.9) & (np.abs(v) < 0.45 * (u + 1.9))
    return inside, (u > -1.2) & (u < -0.85)


def _horns(u, v):
    taper = 0.2 * (v + 1.9)
    inside = (v < 0.3) & (v > -1.9) & (np.minimum(np.abs(u - 0.6), np.abs(u + 0.6)) < taper)
    return inside, v < -1.35


def _barcode(u, v):
    inside = (np.abs(u) < 1.0) & (np.abs(v) < 0.65)
    bars = np.mod(np.floor((u + 1.0) * 3.5), 2) == 1
    rim = (np.abs(u) > 0.85) | (np.abs(v) > 0.5)
    return inside, ~bars & ~rim


def _gem(u, v):
    l1 = np.abs(u) + np.abs(v)
    return l1 < 1.0, (l1 < 0.78) & (np.hypot(u, v) > 0.28)


def _triple_dots(u, v):
    inside = (np.abs(u) < 1.2) & (np.abs(v) < 0.5)
    dot = np.hypot(np.abs(u) - 0.75 * np.round(np.clip(u / 0.75, -1, 1)), v) < 0.3
    return inside, ~dot


def _twin_eyes(u, v):
    r = np.hypot(u, np.abs(v) - 0.55)
    return r < 0.5, r > 0.22


@dataclass(frozen=True)
class ClassDesign:
    """The look of one kind of object, with the ranges its instances vary in: a foreground class
    (shape family, texture and part) or, with `part` None, a distractor."""

    name: str
    shape: Shape
    aspect: tuple[float, float]  # minor / major axis
    deform: float  # amplitude of the random low-frequency radial wobble
    texture: Texture
    texture_angle: float  # degrees, relative to the object's major axis
    part: Part | None  # None for distractors
    anchor: tuple[float, float] = (0.0, 0.0)  # part centre (u, v) in the object frame


DESIGNS: tuple[ClassDesign, ...] = (
    ClassDesign("striped_disc", _disc, (0.6, 1.0), 0.1, _stripes, 45, _eye, (0.45, -0.35)),
    ClassDesign("checkered_box", _box, (0.5, 0.85), 0.06, _checker, 0, _antenna, (0.45, -1.0)),
    ClassDesign("dotted_triangle", _triangle, (0.75, 1.0), 0.06, _dots, 0, _bullseye, (-0.1, 0)),
    ClassDesign("ringed_hexagon", _hexagon, (0.8, 1.0), 0.06, _rings, 0, _cross_badge, (0.5, 0)),
    ClassDesign("hatched_star", _star, (0.85, 1.0), 0.06, _hatch, 45, _fin, (-0.42, 0)),
    ClassDesign("spotted_blob", _disc, (0.6, 1.0), 0.3, _blobs, 0, _horns, (0.0, -1.0)),
    ClassDesign("chevron_diamond", _diamond, (0.5, 0.8), 0.06, _chevrons, 0, _barcode, (0.3, 0)),
    ClassDesign("wavy_cross", _plus, (0.8, 1.0), 0.05, _waves, 0, _triple_dots, (0.62, 0)),
    ClassDesign("sunburst_ring", _ring, (0.75, 1.0), 0.06, _spokes, 0, _gem, (0.75, 0)),
    ClassDesign("brick_crescent", _crescent, (0.8, 1.0), 0.06, _bricks, 0, _twin_eyes, (-0.62, 0)),
)

# Object colours, shared by every class (and by distractors and clutter).
_PALETTE = np.array(
    [
        (200, 40, 40),  # red
        (235, 130, 30),  # orange
        (230, 205, 50),  # yellow
        (60, 160, 60),  # green
        (30, 150, 150),  # teal
        (40, 80, 200),  # blue
        (130, 60, 170),  # purple
        (230, 120, 170),  # pink
        (130, 85, 45),  # brown
        (225, 215, 190),  # cream
        (75, 85, 100),  # slate
    ],
    dtype=np.float32,
)
_PART_BLACK, _PART_WHITE = 20.0, 240.0
_MAX_ATTEMPTS = 20  # scene re-draws (same random stream) until one has a label


class SyntheticParams(Params):
    """Knobs of the synthetic dataset; sizes are fractions of the image's shorter side."""

    n_classes: int = Field(6, ge=1, le=len(DESIGNS), description="Foreground classes K.")
    min_side: int = Field(160, ge=32, le=4096, description="Smallest image height/width (px).")
    max_side: int = Field(240, ge=32, le=4096, description="Largest image height/width (px).")
    min_size: float = Field(0.2, gt=0, le=1.5, description="Smallest object extent.")
    max_size: float = Field(0.75, gt=0, le=1.5, description="Largest object extent.")
    max_objects: int = Field(3, ge=1, le=8, description="Objects per image: 1..max_objects.")
    max_distractors: int = Field(2, ge=0, le=8, description="Classless shapes: 0..max.")
    decoy_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of distractors drawn as a class shape with another class's texture "
        "(never a part), so shape or texture alone does not identify a class.",
    )
    part_size: float = Field(0.22, gt=0, le=0.5, description="Part radius / object half-size.")
    min_part_px: float = Field(3.5, ge=1, le=32, description="Smallest part radius in pixels.")
    min_label_area: float = Field(
        0.004,
        ge=0,
        le=0.1,
        description="Visible area (fraction of the image) a class needs to be an image label; "
        "smaller visible remnants are marked ignore (255) in the mask.",
    )
    boundary_ignore: int = Field(
        0,
        ge=0,
        le=16,
        description="Mark pixels within this many pixels of a class boundary as ignore (255), "
        "like the VOC boundary band; 0 keeps the exact masks.",
    )
    clutter_lines: int = Field(10, ge=0, le=64, description="Background lines/arcs: 0..max.")
    noise_sigma: float = Field(4.0, ge=0, le=50, description="Pixel noise (grey levels).")

    @model_validator(mode="after")
    def _ranges_ordered(self) -> SyntheticParams:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} > max_size {self.max_size}")
        return self


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: class index (1..K), centre (y, x) and extent (px), rotation (rad)."""

    class_index: int
    center: tuple[float, float]
    size: float
    angle: float


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8 class index, 255 = ignore
    labels: tuple[int, ...]  # class indices 1..K, ascending
    objects: tuple[PlacedObject, ...]  # in depth order, back to front, distractors excluded


def class_names(params: SyntheticParams) -> list[str]:
    """`background` followed by the K foreground class names."""
    return ["background", *(d.name for d in DESIGNS[: params.n_classes])]


def render_sample(seed: int, index: int, params: SyntheticParams | None = None) -> Sample:
    """Sample `index` of the dataset with `seed`; the same (seed, index) always gives the same
    sample. Every sample has at least one label, and its labels are exactly the foreground
    classes present in its mask."""
    params = params or SyntheticParams()
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index])
    height, width = (int(n) for n in rng.integers(params.min_side, params.max_side + 1, 2))
    for _ in range(_MAX_ATTEMPTS):
        image, mask, objects = _render_scene(rng, height, width, params)
        labels = _finalise_mask(mask, params)
        if labels:
            return Sample(image, mask, labels, objects)
    raise ValueError(
        f"sample {index} (seed {seed}): no object kept min_label_area={params.min_label_area} "
        f"visible in {_MAX_ATTEMPTS} attempts; lower min_label_area or raise min_size"
    )


def generate(
    out_dir: str | Path,
    n: int,
    seed: int,
    params: SyntheticParams | None = None,
    image_format: Literal["png", "jpg"] = "png",
) -> Path:
    """Write samples 0..n-1 in the manifest layout (docs/output.md) under `out_dir`: `classes.txt`,
    `images/<id>.<ext>`, `masks/<id>.png` (mode "L") and `manifest.jsonl`; returns the manifest
    path."""
    params = params or SyntheticParams()
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    names = class_names(params)
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    manifest = out / "manifest.jsonl"
    with manifest.open("w") as f:
        for index in range(n):
            sample = render_sample(seed, index, params)
            image_id = f"synth-{index:06d}"
            image_path = f"images/{image_id}.{image_format}"
            mask_path = f"masks/{image_id}.png"
            save_options = {"quality": 92} if image_format == "jpg" else {}
            Image.fromarray(sample.image).save(out / image_path, **save_options)
            Image.fromarray(sample.mask).save(out / mask_path)
            row = {
                "image_id": image_id,
                "image": image_path,
                "labels": [names[c] for c in sample.labels],
                "mask": mask_path,
            }
            f.write(json.dumps(row) + "\n")
    return manifest


def write_preview(
    path: str | Path, seed: int, params: SyntheticParams | None = None, n: int = 8
) -> Path:
    """Contact sheet of the first `n` samples, each image beside its colourised mask and
    captioned with its labels, written as PNG."""
    from wsss.visualize import colorize, contact_sheet

    params = params or SyntheticParams()
    names = class_names(params)
    tiles, captions = [], []
    for index in range(n):
        sample = render_sample(seed, index, params)
        tiles += [sample.image, colorize(sample.mask)]
        captions += [f"#{index}", ", ".join(names[c] for c in sample.labels)]
    per_row = 4
    rows = [tiles[i : i + per_row] for i in range(0, len(tiles), per_row)]
    caption_rows = [captions[i : i + per_row] for i in range(0, len(captions), per_row)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(contact_sheet(rows, caption_rows, tile_size=(200, 200))).save(path)
    return path


# --- rendering --------------------------------------------------------------------------------


def _render_scene(
    rng: np.random.Generator, height: int, width: int, params: SyntheticParams
) -> tuple[np.ndarray, np.ndarray, tuple[PlacedObject, ...]]:
    image = _background(rng, height, width, params)
    mask = np.zeros((height, width), np.uint8)
    n_objects = int(rng.integers(1, params.max_objects + 1))
    n_distractors = int(rng.integers(0, params.max_distractors + 1))
    # 0 marks a distractor; depth order is random so distractors may occlude objects.
    kinds = rng.permutation(
        np.concatenate(
            [rng.integers(1, params.n_classes + 1, n_objects), np.zeros(n_distractors, int)]
        )
    )
    short = min(height, width)
    log_min, log_max = math.log(params.min_size), math.log(params.max_size)
    centres: list[tuple[float, float, float]] = []
    objects = []
    for kind in kinds:
        kind = int(kind)
        if kind:
            size = short * math.exp(rng.uniform(log_min, log_max))
            design = DESIGNS[kind - 1]
        else:
            size = short * math.exp(rng.uniform(log_min, 0.5 * (log_min + log_max)))
            design = _distractor(rng, params)
        cy, cx = _place(rng, height, width, size, centres)
        centres.append((cy, cx, size))
        angle = rng.uniform(0, 2 * math.pi)
        _draw_object(image, mask, rng, kind, design, (cy, cx), size / 2, angle, params)
        if kind:
            objects.append(PlacedObject(kind, (cy, cx), size, angle))
    if params.noise_sigma:
        image += params.noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask, tuple(objects)


def _distractor(rng: np.random.Generator, params: SyntheticParams) -> ClassDesign:
    """A classless shape, never with a part: a decoy (class shape with a different class's
    texture) or an irregular polygon with a plain, gradient or class texture."""
    designs = DESIGNS[: params.n_classes]
    if len(designs) > 1 and rng.uniform() < params.decoy_fraction:
        a, b = (designs[i] for i in rng.choice(len(designs), 2, replace=False))
        return ClassDesign("decoy", a.shape, a.aspect, a.deform, b.texture, b.texture_angle, None)
    radii = rng.uniform(0.45, 1.0, int(rng.integers(3, 9)))
    angles = np.linspace(-math.pi, math.pi, len(radii), endpoint=False)

    def polygon(u, v):
        rho = np.interp(np.arctan2(v, u), angles, radii, period=2 * math.pi)
        return np.hypot(u, v) < rho

    choice = int(rng.integers(3))
    texture = (_fill, _gradient, designs[int(rng.integers(len(designs)))].texture)[choice]
    return ClassDesign("polygon", polygon, (0.5, 1.0), 0.1, texture, 0.0, None)


def _place(rng, height, width, size, centres) -> tuple[float, float]:
    """Best of a few random centres: the one farthest (relative to sizes) from earlier objects,
    so objects spread out but still overlap sometimes."""
    margin = 0.25 * size
    ys = rng.uniform(margin, max(margin, height - margin), 6)
    xs = rng.uniform(margin, max(margin, width - margin), 6)
    if not centres:
        return float(ys[0]), float(xs[0])
    prior = np.asarray(centres)
    gap = np.hypot(ys[:, None] - prior[:, 0], xs[:, None] - prior[:, 1]) / (size + prior[:, 2])
    best = int(np.argmax(gap.min(axis=1)))
    return float(ys[best]), float(xs[best])


def _draw_object(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    value: int,
    design: ClassDesign,
    centre: tuple[float, float],
    half: float,
    angle: float,
    params: SyntheticParams,
) -> None:
    """Paint one object of half-extent `half` px into `image` (float32, in place) and `value`
    into `mask` where it lands; later objects overwrite (occlude) earlier ones."""
    height, width = mask.shape
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    aspect = rng.uniform(*design.aspect)
    wobble_terms = [
        (k, rng.uniform(0, design.deform / 3), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4)
    ]

    def wobble(phi):
        return 1.0 + sum(a * np.cos(k * phi + p) for k, a, p in wobble_terms)

    if design.part is not None:
        part_radius = max(params.part_size * half, params.min_part_px)
        au, av = design.anchor
        stretch = float(wobble(math.atan2(av, au))) if (au or av) else 1.0
        anchor = (au * half * stretch, av * half * aspect * stretch)
        reach = max(1.35 * half, math.hypot(*anchor) + 2.8 * part_radius)
    else:
        reach = 1.35 * half
    cy, cx = centre
    y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
    x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    # Object frame in pixels: xr along the major axis.
    xr = cos_a * xs + sin_a * ys
    yr = -sin_a * xs + cos_a * ys
    u, v = xr / half, yr / (half * aspect)
    scale = 1.0 / wobble(np.arctan2(v, u))
    inside = design.shape(u * scale, v * scale)

    colours = _PALETTE[rng.choice(len(_PALETTE), 2, replace=False)]
    colours = np.clip(colours + rng.uniform(-25, 25, (2, 3)), 0, 255).astype(np.float32)
    period = float(np.clip(half * rng.uniform(0.22, 0.34), 3.5, 24.0))
    t_angle = math.radians(design.texture_angle + rng.uniform(-15, 15))
    tc, ts = math.cos(t_angle), math.sin(t_angle)
    t = design.texture(tc * xr + ts * yr, -ts * xr + tc * yr, period, rng)
    light = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0, 0.18) * np.clip(math.cos(light) * u + math.sin(light) * v, -1, 1)
    paint = (colours[0] + t[..., None] * (colours[1] - colours[0])) * shade[..., None]

    if design.part is not None:
        pin, white = design.part((xr - anchor[0]) / part_radius, (yr - anchor[1]) / part_radius)
        part_grey = np.where(white, _PART_WHITE, _PART_BLACK)
        paint = np.where(pin[..., None], part_grey[..., None], paint)
        inside = inside | pin

    window = image[y0:y1, x0:x1]
    window[inside] = paint[inside]
    mask[y0:y1, x0:x1][inside] = value


def _background(
    rng: np.random.Generator, height: int, width: int, params: SyntheticParams
) -> np.ndarray:
    """Muted smooth colour noise, a brightness gradient, fine grain and clutter lines/arcs."""
    grid = rng.integers(2, 6, 2)
    coarse = _PALETTE[rng.integers(len(_PALETTE), size=(grid[0], grid[1]))]
    mix = rng.uniform(0.35, 0.7)
    coarse = coarse * (1 - mix) + rng.uniform(90, 170) * mix
    base = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    grain_grid = rng.standard_normal((height // 5 + 2, width // 5 + 2)).astype(np.float32)
    grain = Image.fromarray(grain_grid).resize((width, height), Image.BILINEAR)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (
        math.cos(direction) * np.linspace(-1, 1, width, dtype=np.float32)[None, :]
        + math.sin(direction) * np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    )
    light = rng.uniform(10, 35) * ramp + rng.uniform(6, 14) * np.asarray(grain)

    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(0, params.clutter_lines + 1))):
        colour = _PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.5, 1.0)
        colour = tuple(int(c) for c in colour)
        line_width = int(rng.integers(1, 4))
        x_a, x_b = rng.uniform(-0.2, 1.2, 2) * width
        y_a, y_b = rng.uniform(-0.2, 1.2, 2) * height
        if rng.uniform() < 0.5:
            draw.line([(x_a, y_a), (x_b, y_b)], fill=colour, width=line_width)
        else:
            box = [min(x_a, x_b), min(y_a, y_b), max(x_a, x_b) + 1, max(y_a, y_b) + 1]
            start = rng.uniform(0, 360)
            draw.arc(box, start, start + rng.uniform(60, 300), fill=colour, width=line_width)
    return np.asarray(base, dtype=np.float32) + light[..., None]


def _finalise_mask(mask: np.ndarray, params: SyntheticParams) -> tuple[int, ...]:
    """Apply the boundary band, mark classes with too little visible area as ignore (in place),
    and return the classes left: the image labels."""
    if params.boundary_ignore:
        size = 2 * params.boundary_ignore + 1
        band = ndimage.maximum_filter(mask, size) != ndimage.minimum_filter(mask, size)
        mask[band] = IGNORE_INDEX
    counts = np.bincount(mask.ravel(), minlength=256)
    min_pixels = params.min_label_area * mask.size
    present = [c for c in range(1, params.n_classes + 1) if counts[c]]
    small = [c for c in present if counts[c] < min_pixels]
    if small:
        mask[np.isin(mask, small)] = IGNORE_INDEX
    return tuple(c for c in present if counts[c] >= min_pixels)
