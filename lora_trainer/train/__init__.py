"""The training loop, its maths, optimizers, schedulers, caches and events."""

from .events import EventBus, StopControl
from .loop import TrainResult, epoch_file_name, train

__all__ = ["EventBus", "StopControl", "TrainResult", "epoch_file_name", "train"]
