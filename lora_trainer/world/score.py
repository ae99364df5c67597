"""Measured learning: how often fixed-seed pictures show the concept, and what happens to other prompts.

* concept score: the fraction of pictures sampled for the concept's prompts ("ohwx, a ring on a
  blue background", fixed seeds) in which the deterministic detector finds the concept (a ring
  of its colour with a dot of its colour in the middle). The base model never saw the concept,
  so the score is near zero at LoRA weight 0 and rises as the LoRA learns.
* bleed: the fraction of pictures for other world prompts ("a green square on a white
  background") that the world classifier still reads right; compare weight 1 with weight 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .detect import find_concept, read_picture
from .drawing import COLOURS, SHAPES, Concept
from .sample import Sampler, lora_weight

CONCEPT_SEED = 10_000
BLEED_SEED = 20_000
WORLD_SEED = 30_000
STEPS = 20
GUIDANCE = 5.0

# Other prompts of the world, fixed: every shape twice, in different colours on different backgrounds.
BLEED_SPECS: tuple[tuple[str, str, str], ...] = (
    ("circle", "red", "blue"),
    ("circle", "white", "black"),
    ("square", "green", "white"),
    ("square", "yellow", "purple"),
    ("triangle", "blue", "yellow"),
    ("triangle", "black", "green"),
    ("cross", "purple", "white"),
    ("cross", "yellow", "blue"),
    ("ring", "green", "white"),
    ("ring", "blue", "yellow"),
)


def world_prompt(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def world_specs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` (shape, colour, background) triples cycling through the shapes, colours at random."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        colour = rng.choice(COLOURS)
        specs.append((SHAPES[i % len(SHAPES)], colour, rng.choice([c for c in COLOURS if c != colour])))
    return specs


@dataclass(frozen=True)
class WorldAccuracy:
    n: int
    accuracy: float
    """Shape, colour and background all right."""
    shape: float
    colour: float
    background: float

    def as_dict(self) -> dict:
        return asdict(self)


def read_accuracy(images: np.ndarray, specs: Sequence[tuple[str, str, str]]) -> WorldAccuracy:
    reads = [read_picture(im) for im in images]
    n = len(specs)
    return WorldAccuracy(
        n=n,
        accuracy=sum(r.matches(*s) for r, s in zip(reads, specs)) / n,
        shape=sum(r.shape == s[0] for r, s in zip(reads, specs)) / n,
        colour=sum(r.colour == s[1] for r, s in zip(reads, specs)) / n,
        background=sum(r.background == s[2] for r, s in zip(reads, specs)) / n,
    )


def world_accuracy(
    sampler: Sampler,
    specs: Sequence[tuple[str, str, str]] | None = None,
    n: int = 24,
    seed: int = WORLD_SEED,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
) -> WorldAccuracy:
    """Sample world prompts (``specs``, or ``n`` from :func:`world_specs`) and read the pictures back."""
    specs = list(specs) if specs is not None else world_specs(n, seed)
    images = sampler.images([world_prompt(*s) for s in specs], seed=seed, steps=steps, guidance=guidance)
    return read_accuracy(images, specs)


def concept_prompts(concept: Concept, per_background: int = 2) -> list[str]:
    return [concept.caption(bg) for bg in concept.backgrounds for _ in range(per_background)]


def concept_fraction(images: np.ndarray, concept: Concept) -> float:
    return float(np.mean([find_concept(im, concept).found for im in images])) if len(images) else 0.0


@dataclass(frozen=True)
class Evaluation:
    weight: float
    concept: float
    """Fraction of the concept prompts' pictures that show the concept."""
    bleed: float | None
    """World classifier accuracy on the other prompts (``BLEED_SPECS``); None when not measured."""
    n_concept: int
    n_bleed: int
    concept_images: np.ndarray | None = field(default=None, repr=False, compare=False)
    bleed_images: np.ndarray | None = field(default=None, repr=False, compare=False)

    def line(self) -> str:
        s = f"weight {self.weight:g}: concept {self.concept:.0%} of {self.n_concept}"
        if self.bleed is not None:
            s += f", other prompts right {self.bleed:.0%} of {self.n_bleed}"
        return s


def evaluate(
    sampler: Sampler,
    concept: Concept,
    network=None,
    weight: float = 1.0,
    per_background: int = 2,
    bleed: bool = True,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    concept_seed: int = CONCEPT_SEED,
    bleed_seed: int = BLEED_SEED,
) -> Evaluation:
    """Score ``concept`` on fixed seeds with ``network`` (a LoRANetwork) at ``weight``; with no network,
    the model as it is now (e.g. inside a training run, where the LoRA being trained is applied)."""
    prompts = concept_prompts(concept, per_background)
    with lora_weight(network, weight):
        c_imgs = sampler.images(prompts, seed=concept_seed, steps=steps, guidance=guidance)
        acc, b_imgs = None, None
        if bleed:
            b_imgs = sampler.images([world_prompt(*s) for s in BLEED_SPECS], seed=bleed_seed, steps=steps, guidance=guidance)
            acc = read_accuracy(b_imgs, BLEED_SPECS).accuracy
    return Evaluation(
        weight,
        concept_fraction(c_imgs, concept),
        acc,
        len(prompts),
        len(BLEED_SPECS) if bleed else 0,
        c_imgs,
        b_imgs if bleed else None,
    )
