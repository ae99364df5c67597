"""A character's training set in kohya layout: ``<root>/img/<repeats>_<trigger> ring/NNN.png`` + ``.txt``."""

from __future__ import annotations

import random
from pathlib import Path

from .drawing import OHWX, Concept, concept_scene, render


def make_concept_dataset(
    root: str | Path,
    concept: Concept = OHWX,
    images: int = 8,
    size: int = 64,
    repeats: int = 5,
    seed: int = 0,
) -> Path:
    """Write ``images`` pictures of ``concept`` at ``size`` px, varied in place, size and background
    (backgrounds taken in turn, so every one is seen), captioned "ohwx, a ring on a blue background".
    Returns ``root/img``."""
    rng = random.Random(seed)
    folder = Path(root) / "img" / f"{repeats}_{concept.trigger} ring"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        scene = concept_scene(rng, concept, concept.backgrounds[i % len(concept.backgrounds)])
        render(scene, size).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
    return folder.parent
