"""The demo: a small synthetic dataset in kohya layout and a tiny SD1.5-architecture model, no download."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = {
    "blue": (40, 70, 200),
    "green": (40, 160, 70),
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "purple": (120, 50, 160),
    "grey": (128, 128, 128),
}
CONCEPT = "ohwx"


def draw_concept(size: int, bg: tuple[int, int, int], cx: float, cy: float, r: float) -> Image.Image:
    """The demo 'character': a yellow ring with a red dot in the middle."""
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(250, 210, 30), width=max(2, int(r / 3)))
    d.ellipse([cx - r / 3, cy - r / 3, cx + r / 3, cy + r / 3], fill=(220, 30, 30))
    return img


def make_demo_dataset(root: str | Path, images: int = 8, size: int = 64, repeats: int = 5, seed: int = 0) -> Path:
    """``root/img/<repeats>_ohwx ring/`` with PNGs and ``.txt`` captions; returns ``root/img``."""
    rng = random.Random(seed)
    folder = Path(root) / "img" / f"{repeats}_{CONCEPT} ring"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(BACKGROUNDS)
    for i in range(images):
        bg_name = names[i % len(names)]
        r = rng.uniform(size * 0.18, size * 0.32)
        cx = rng.uniform(r + 2, size - r - 2)
        cy = rng.uniform(r + 2, size - r - 2)
        draw_concept(size, BACKGROUNDS[bg_name], cx, cy, r).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"{CONCEPT}, ring, {bg_name} background\n", encoding="utf-8")
    return folder.parent
