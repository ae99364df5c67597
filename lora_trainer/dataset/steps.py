"""How many optimizer steps and epochs a run takes, and a human summary of it (kohya's formulas)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .layout import DatasetScan


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def steps_per_epoch(num_samples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch: ``ceil(ceil(num_samples / batch_size) / grad_accum)``."""
    _check_positive("batch_size", batch_size)
    _check_positive("grad_accum", grad_accum)
    if num_samples < 0:
        raise ValueError(f"num_samples must not be negative, got {num_samples}")
    batches = math.ceil(num_samples / batch_size)
    return math.ceil(batches / grad_accum)


def total_steps(
    num_samples: int,
    batch_size: int,
    grad_accum: int,
    epochs: int,
    max_train_steps: int = 0,
) -> tuple[int, int]:
    """Return ``(total optimizer steps, epochs)``.

    With ``max_train_steps > 0`` it wins over ``epochs``: the run lasts
    ``ceil(max_train_steps / steps_per_epoch)`` epochs and stops after ``max_train_steps``
    steps (the last epoch may be partial). Otherwise it is ``steps_per_epoch * epochs``.
    """
    per_epoch = steps_per_epoch(num_samples, batch_size, grad_accum)
    if max_train_steps > 0:
        if per_epoch == 0:
            raise ValueError("the dataset has no samples, so no epoch can be run")
        return max_train_steps, math.ceil(max_train_steps / per_epoch)
    _check_positive("epochs", epochs)
    return per_epoch * epochs, epochs


def _n(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe_steps(
    scan: DatasetScan,
    batch_size: int,
    grad_accum: int,
    epochs: int,
    max_train_steps: int = 0,
) -> str:
    """A multi-line summary: the step arithmetic on the first line, one line per folder after it."""
    n = scan.num_samples
    per_epoch = steps_per_epoch(n, batch_size, grad_accum)
    total, n_epochs = total_steps(n, batch_size, grad_accum, epochs, max_train_steps)
    head = (
        f"{_n(len(scan.subsets), 'folder')}, {_n(scan.num_images, 'image')}, "
        f"{n} samples per epoch (images x repeats) / batch {batch_size} / accumulation {grad_accum} "
        f"= {_n(per_epoch, 'step')} per epoch"
    )
    if max_train_steps > 0:
        partial = " (the last one partial)" if per_epoch * n_epochs != total else ""
        head += f"; max_train_steps = {total} -> {_n(n_epochs, 'epoch')}{partial}, {_n(total, 'step')}"
    else:
        head += f" x {_n(n_epochs, 'epoch')} = {_n(total, 'step')}"
    lines = [head]
    for s in scan.subsets:
        lines.append(
            f"  {s.dir.name}: {_n(len(s.images), 'image')} x {_n(s.repeats, 'repeat')} = "
            f"{_n(len(s.images) * s.repeats, 'sample')}"
        )
    return "\n".join(lines)
