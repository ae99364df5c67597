"""Per-step caption augmentation with kohya sd-scripts semantics. Does not import torch."""

from __future__ import annotations

import random


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Split a caption into stripped tags; empty parts (from ``"a, , b"`` or a trailing comma) are dropped."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def process_caption(
    caption: str,
    rng: random.Random,
    shuffle: bool = False,
    keep_tokens: int = 0,
    tag_dropout_rate: float = 0.0,
    caption_dropout_rate: float = 0.0,
    separator: str = ",",
) -> str:
    """Return the caption to train one step with.

    - With probability ``caption_dropout_rate`` the whole caption becomes ``""``.
    - Otherwise, when ``shuffle`` or ``tag_dropout_rate`` is on, the caption is split on
      ``separator`` into stripped tags; the first ``keep_tokens`` tags stay first, in order;
      each other tag is dropped with probability ``tag_dropout_rate``; the remaining ones are
      shuffled when ``shuffle`` is set; all are joined with ``", "``.
    - With neither on, the caption is returned unchanged (stripped), as kohya does.

    Only ``rng`` is used for randomness, so the same ``rng`` state gives the same result.
    """
    if not 0.0 <= caption_dropout_rate <= 1.0:
        raise ValueError(f"caption_dropout_rate must be within [0, 1], got {caption_dropout_rate}")
    if not 0.0 <= tag_dropout_rate <= 1.0:
        raise ValueError(f"tag_dropout_rate must be within [0, 1], got {tag_dropout_rate}")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be at least 0, got {keep_tokens}")
    if not separator:
        raise ValueError("separator must not be empty")

    if caption_dropout_rate > 0.0 and rng.random() < caption_dropout_rate:
        return ""
    if not shuffle and tag_dropout_rate <= 0.0:
        return caption.strip()

    tags = split_tags(caption, separator)
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout_rate > 0.0:
        flex = [t for t in flex if rng.random() >= tag_dropout_rate]
    if shuffle:
        rng.shuffle(flex)
    return ", ".join(fixed + flex)
