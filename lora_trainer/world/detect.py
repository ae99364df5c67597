"""Deterministic detectors for the tiny world's pictures (numpy only, no learned weights).

Every pixel is named by its nearest palette colour; the background is the colour most of the
border has; a shape is named by rendering every shape's template into the box of the shape's
pixels and taking the best intersection-over-union.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .drawing import COLOURS, PALETTE, SHAPES, Concept, draw_shape

_PAL = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (K, 3)
MIN_SHAPE_FRACTION = 0.03
"""A shape must cover at least this part of the picture to be seen at all."""


def label_pixels(img: np.ndarray) -> np.ndarray:
    """(H, W) indices into ``COLOURS``: each pixel's nearest palette colour."""
    px = img.reshape(-1, 3).astype(np.float32)
    d = ((px[:, None, :] - _PAL[None, :, :]) ** 2).sum(-1)
    return d.argmin(1).reshape(img.shape[:2])


def _border_mode(labels: np.ndarray) -> int:
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    return int(np.bincount(border, minlength=len(COLOURS)).argmax())


def _robust_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Box (x0, y0, x1, y1) in pixel edges around ``mask``, ignoring stray specks (1% per side)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return None
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    return float(x0), float(y0), float(x1) + 1.0, float(y1) + 1.0


def _template(size: int, draw) -> np.ndarray:
    """Label map of a template drawn by ``draw(ImageDraw)`` with palette-index colours, at 4x then reduced."""
    ss = 4
    im = Image.new("L", (size * ss, size * ss), 0)
    draw(ImageDraw.Draw(im), ss)
    # nearest-neighbour reduction keeps the labels exact (a box filter would blend them)
    return np.asarray(im.resize((size, size), Image.NEAREST))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@dataclass(frozen=True)
class Reading:
    """What the classifier sees in one picture."""

    background: str
    colour: str | None
    shape: str | None
    shape_iou: float

    def matches(self, shape: str, colour: str | None, background: str | None) -> bool:
        return (
            self.shape == shape
            and (colour is None or self.colour == colour)
            and (background is None or self.background == background)
        )


def read_picture(img: np.ndarray) -> Reading:
    """Name the background, the shape's colour and the shape of a world picture (uint8 H x W x 3)."""
    labels = label_pixels(img)
    h, w = labels.shape
    bg = _border_mode(labels)
    counts = np.bincount(labels.ravel(), minlength=len(COLOURS))
    counts[bg] = 0
    if counts.max() < MIN_SHAPE_FRACTION * h * w:
        return Reading(COLOURS[bg], None, None, 0.0)
    colour = int(counts.argmax())
    mask = labels == colour
    box = _robust_box(mask)
    if box is None:
        return Reading(COLOURS[bg], COLOURS[colour], None, 0.0)
    best, best_iou = None, -1.0
    for shape in SHAPES:
        t = _template(w, lambda d, ss, shape=shape: draw_shape(d, shape, tuple(v * ss for v in box), 1, 0)) == 1
        iou = _iou(mask, t)
        if iou > best_iou:
            best, best_iou = shape, iou
    return Reading(COLOURS[bg], COLOURS[colour], best, best_iou)


@dataclass(frozen=True)
class ConceptMatch:
    found: bool
    ring: float
    """How ring-like the ring-coloured pixels are: 1 - the share of them in the ring's middle (0 if no ring)."""
    coverage: float
    """Share of the 8 directions around the centre in which the ring is present."""
    dot: float
    """Dot-coloured pixels in the ring's middle, as a share of the dot's expected area."""


RING_MIN = 0.85
COVERAGE_MIN = 0.85
DOT_MIN = 0.35


def find_concept(img: np.ndarray, concept: Concept) -> ConceptMatch:
    """Is ``concept`` (a ring of one colour with a dot of another in its middle) in the picture?

    Pixels are named by their nearest palette colour. The ring-coloured pixels must form a ring:
    all around their centre (at least ``COVERAGE_MIN`` of 8 directions) and almost none of them in
    the middle (``ring`` >= ``RING_MIN``); the middle must hold dot-coloured pixels covering at least
    ``DOT_MIN`` of the dot's expected area. A plain ring, a filled circle with a dot, the colours
    swapped or a dot beside the ring all fail. Tolerant of thick, thin or wobbly rings, as a
    small model draws them."""
    labels = label_pixels(img)
    h, w = labels.shape
    ring_i, dot_i = COLOURS.index(concept.ring), COLOURS.index(concept.dot)
    none = ConceptMatch(False, 0.0, 0.0, 0.0)
    if _border_mode(labels) in (ring_i, dot_i):
        return none
    ys, xs = np.nonzero(labels == ring_i)
    if len(xs) < MIN_SHAPE_FRACTION * h * w:
        return none
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    d = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
    r_out = float(np.percentile(d, 95))
    if r_out < 0.1 * min(h, w):
        return none
    ring = 1.0 - float((d < 0.45 * r_out).mean())
    angles = np.arctan2(ys + 0.5 - cy, xs + 0.5 - cx)
    sectors = np.bincount(((angles + np.pi) / (2 * np.pi) * 8).astype(int) % 8, minlength=8)
    coverage = float((sectors >= 0.03 * len(xs)).mean())
    gy, gx = np.mgrid[0:h, 0:w]
    middle = np.hypot(gx + 0.5 - cx, gy + 0.5 - cy) < 0.55 * r_out
    expected = np.pi * (concept.dot_ratio * r_out) ** 2
    dot = float(np.logical_and(labels == dot_i, middle).sum() / expected)
    found = ring >= RING_MIN and coverage >= COVERAGE_MIN and dot >= DOT_MIN
    return ConceptMatch(found, ring, coverage, dot)
