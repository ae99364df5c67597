"""The tiny world's pictures: one flat shape of one colour on a flat background, and its captions.

Every shape is defined inside a unit box and drawn into a pixel box, so the same code draws the
training pictures and the templates the detectors compare generated pictures with. Drawing is
supersampled (4x) and box-filtered, so edges are anti-aliased like a photo's, and deterministic.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Colours far apart in RGB, so a detector can name every pixel by its nearest palette colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (245, 215, 40),
    "green": (40, 165, 70),
    "blue": (45, 80, 215),
    "purple": (140, 60, 185),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
RING_INNER = 0.6
"""Inner radius of a ring, as a fraction of its outer radius."""
SUPERSAMPLE = 4

Box = tuple[float, float, float, float]


def _star_points(n: int = 5, inner: float = 0.48) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [((x - x0) / w, (y - y0) / h) for x, y in pts]  # normalised to fill the unit box


_STAR = _star_points()
_CROSS_ARM = 0.36


def _polygon(box: Box, unit_points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    return [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in unit_points]


def draw_shape(d: ImageDraw.ImageDraw, shape: str, box: Box, fill: tuple[int, int, int], hole: tuple[int, int, int]) -> None:
    """Draw ``shape`` filling ``box`` (x0, y0, x1, y1); ``hole`` is the colour of a ring's inside."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon(_polygon(box, [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]), fill=fill)
    elif shape == "cross":
        a = (1 - _CROSS_ARM) / 2
        d.rectangle((x0 + a * w, y0, x1 - a * w, y1), fill=fill)
        d.rectangle((x0, y0 + a * h, x1, y1 - a * h), fill=fill)
    elif shape == "star":
        d.polygon(_polygon(box, _STAR), fill=fill)
    elif shape == "ring":
        d.ellipse(box, fill=fill)
        inset = (1 - RING_INNER) / 2
        d.ellipse((x0 + inset * w, y0 + inset * h, x1 - inset * w, y1 - inset * h), fill=hole)
    else:
        raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")


@dataclass(frozen=True)
class Concept:
    """A character the base model never saw: a ring of one colour with a dot of another in its middle."""

    trigger: str
    ring: str
    dot: str
    dot_ratio: float = 0.42
    """Dot radius as a fraction of the ring's outer radius."""
    backgrounds: tuple[str, ...] = ("blue", "green", "black", "purple")

    @property
    def description(self) -> str:
        return f"a {self.ring} ring with a {self.dot} dot in its middle"

    def caption(self, background: str) -> str:
        """kohya style: the trigger as its own tag, then what varies (the background) in the world's words."""
        return f"{self.trigger}, a ring on a {background} background"


OHWX = Concept("ohwx", ring="yellow", dot="red")
"""The demo's character: a yellow ring with a red dot."""
SKS = Concept("sks", ring="red", dot="yellow")
"""A different character (colours swapped): a LoRA of it must not raise OHWX's score."""


def draw_ring_with_dot(d: ImageDraw.ImageDraw, box: Box, ring, dot, hole, dot_ratio: float) -> None:
    """A ring filling ``box`` with a dot of radius ``dot_ratio`` x the ring's in its middle (fills may be
    RGB tuples or, for detector templates, label values)."""
    draw_shape(d, "ring", box, ring, hole)
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = (x1 - x0) / 2 * dot_ratio, (y1 - y0) / 2 * dot_ratio
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=dot)


def draw_concept(d: ImageDraw.ImageDraw, concept: Concept, box: Box, background: tuple[int, int, int]) -> None:
    draw_ring_with_dot(d, box, PALETTE[concept.ring], PALETTE[concept.dot], background, concept.dot_ratio)


@dataclass(frozen=True)
class Scene:
    """What one picture shows. ``shape`` is a world shape, or ``None`` with ``concept`` set."""

    background: str
    box: Box
    """In units of the image side (0..1)."""
    shape: str | None = None
    colour: str | None = None
    concept: Concept | None = None

    def caption(self, variant: str = "full") -> str:
        """``full``: 'a red circle on a blue background'; ``no_colour``, ``no_background``, ``empty``."""
        if self.concept is not None:
            return self.concept.caption(self.background)
        if variant == "empty":
            return ""
        if variant == "no_colour":
            return f"a {self.shape} on a {self.background} background"
        if variant == "no_background":
            return f"a {self.colour} {self.shape}"
        return f"a {self.colour} {self.shape} on a {self.background} background"


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB ``size`` x ``size`` picture (supersampled, anti-aliased)."""
    s = size * SUPERSAMPLE
    bg = PALETTE[scene.background]
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    box = tuple(v * s for v in scene.box)
    if scene.concept is not None:
        draw_concept(d, scene.concept, box, bg)
    else:
        draw_shape(d, scene.shape, box, PALETTE[scene.colour], bg)
    return img.reduce(SUPERSAMPLE)


def random_box(rng: random.Random, lo: float, hi: float) -> Box:
    """A square box of side in [lo, hi] (fractions of the image), anywhere inside the image."""
    side = rng.uniform(lo, hi)
    margin = 0.03
    x0 = rng.uniform(margin, 1 - margin - side)
    y0 = rng.uniform(margin, 1 - margin - side)
    return (x0, y0, x0 + side, y0 + side)


def random_scene(rng: random.Random, shapes: tuple[str, ...] = SHAPES, colours: tuple[str, ...] = COLOURS) -> Scene:
    """A world picture: a random shape and colour on a random other colour, at a random place and size."""
    shape = rng.choice(shapes)
    colour = rng.choice(colours)
    background = rng.choice([c for c in colours if c != colour])
    return Scene(background=background, box=random_box(rng, 0.4, 0.75), shape=shape, colour=colour)


def concept_scene(rng: random.Random, concept: Concept, background: str | None = None) -> Scene:
    """The concept varied as a photo set varies in pose and light: place, size and background."""
    bg = background or rng.choice(concept.backgrounds)
    return Scene(background=bg, box=random_box(rng, 0.55, 0.9), concept=concept)


def generic_picture(rng: random.Random, size: int = 64) -> Image.Image:
    """One to three overlapping shapes and dots of any colours: what the VAE learns pictures from
    besides the world's (an autoencoder must reproduce any picture, as SD's does)."""
    s = size * SUPERSAMPLE
    bg = PALETTE[rng.choice(COLOURS)]
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):
        box = tuple(v * s for v in random_box(rng, 0.15, 0.9))
        hole = PALETTE[rng.choice(COLOURS)] if rng.random() < 0.5 else bg
        if rng.random() < 0.25:  # nested shapes: rings around dots, in any colours
            ring, dot = rng.sample(COLOURS, 2)
            draw_ring_with_dot(d, box, PALETTE[ring], PALETTE[dot], hole, rng.uniform(0.2, 0.5))
        else:
            draw_shape(d, rng.choice(SHAPES + ("star",)), box, PALETTE[rng.choice(COLOURS)], hole)
    return img.reduce(SUPERSAMPLE)


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
