"""Deterministic detectors for the tiny world's pictures (numpy only, no learned weights).

Every pixel is named by its nearest palette colour; the background is the colour most of the
border has; a shape is named by rendering every shape's template into the box of the shape's
pixels and taking the best intersection-over-union.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .drawing import COLOURS, PALETTE, SHAPES, Concept, draw_ring_with_dot, draw_shape

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
    ring_iou: float
    dot_iou: float


RING_IOU_MIN = 0.5
DOT_IOU_MIN = 0.4


def find_concept(img: np.ndarray, concept: Concept) -> ConceptMatch:
    """Is ``concept`` (a ring of one colour with a dot of another in its middle) in the picture?

    The box of the ring-coloured pixels gives where the ring should be; the concept is found when
    the ring-coloured pixels match a ring there and the dot-coloured pixels match the dot in its
    middle (IoU at least ``RING_IOU_MIN`` and ``DOT_IOU_MIN``). A plain ring, a filled circle, the
    colours swapped or a dot off the centre all fail."""
    labels = label_pixels(img)
    h, w = labels.shape
    ring_i, dot_i = COLOURS.index(concept.ring), COLOURS.index(concept.dot)
    ring_mask = labels == ring_i
    if ring_mask.sum() < MIN_SHAPE_FRACTION * h * w:
        return ConceptMatch(False, 0.0, 0.0)
    box = _robust_box(ring_mask)
    if box is None:
        return ConceptMatch(False, 0.0, 0.0)
    bg_i = _border_mode(labels)
    if bg_i in (ring_i, dot_i):
        return ConceptMatch(False, 0.0, 0.0)
    # a label image: background 0, ring 1, dot 2
    def draw(d: ImageDraw.ImageDraw, ss: int) -> None:
        draw_ring_with_dot(d, tuple(v * ss for v in box), 1, 2, 0, concept.dot_ratio)

    t = _template(w, draw)
    ring_iou = _iou(ring_mask, t == 1)
    dot_iou = _iou(labels == dot_i, t == 2)
    return ConceptMatch(ring_iou >= RING_IOU_MIN and dot_iou >= DOT_IOU_MIN, ring_iou, dot_iou)
