"""TensorBoard logging as an event listener (optional: needs the ``tensorboard`` package)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .events import EpochEnd, Event, StepEvent, TrainingFinished, ValidationLoss


def tensorboard_listener(logging_dir: str | Path, run_name: str) -> Callable[[Event], None] | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    import time

    writer = SummaryWriter(str(Path(logging_dir) / f"{run_name}_{time.strftime('%Y%m%d-%H%M%S')}"))

    def on_event(ev: Event) -> None:
        if isinstance(ev, StepEvent):
            writer.add_scalar("loss/current", ev.loss, ev.step)
            writer.add_scalar("loss/average", ev.loss_average, ev.step)
            for name, lr in ev.lrs.items():
                writer.add_scalar(f"lr/{name}", lr, ev.step)
        elif isinstance(ev, EpochEnd):
            writer.add_scalar("loss/epoch", ev.loss_epoch, ev.epoch)
        elif isinstance(ev, ValidationLoss):
            writer.add_scalar("loss/validation", ev.loss, ev.epoch)
        elif isinstance(ev, TrainingFinished):
            writer.flush()
            writer.close()

    return on_event
