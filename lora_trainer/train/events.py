"""Training events: the one source of truth for progress (CLI bar, tab, TensorBoard, host state)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Event:
    pass


@dataclass
class Message(Event):
    level: str  # "info" | "warning" | "error"
    text: str


@dataclass
class CachingProgress(Event):
    done: int
    total: int


@dataclass
class TrainingStarted(Event):
    total_steps: int
    epochs: int
    steps_per_epoch: int
    num_images: int
    summary: str


@dataclass
class StepEvent(Event):
    step: int  # optimizer steps done, 1-based
    total_steps: int
    epoch: int  # 1-based
    loss: float
    loss_average: float  # moving average over recent steps
    lrs: dict[str, float]
    elapsed: float
    eta: float  # seconds


@dataclass
class EpochEnd(Event):
    epoch: int
    loss_epoch: float
    step: int


@dataclass
class ValidationLoss(Event):
    """Loss on fixed noise and timesteps, after each epoch (epoch 0: before training)."""

    epoch: int
    loss: float
    held_out: bool  # False: measured on training images (too few images to hold some out)
    images: int


@dataclass
class FileSaved(Event):
    path: str
    epoch: int
    step: int
    final: bool


@dataclass
class GridProgress(Event):
    done: int
    total: int


@dataclass
class GridSaved(Event):
    path: str
    best_epoch: int | None = None


@dataclass
class TrainingFinished(Event):
    files: list[str] = field(default_factory=list)
    stopped: bool = False
    steps: int = 0
    seconds: float = 0.0


Listener = Callable[[Event], None]


class EventBus:
    """Fan-out of events to listeners. A failing listener is reported once and then ignored:
    a broken progress bar must not stop a training run."""

    def __init__(self, *listeners: Listener):
        self._listeners: list[Listener] = list(listeners)
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, event: Event) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(event)
            except Exception as e:  # noqa: BLE001 - see class docstring
                with self._lock:
                    if fn in self._listeners:
                        self._listeners.remove(fn)
                import logging

                logging.getLogger("lora_trainer").warning("progress listener %r failed and was removed: %s", fn, e)

    def info(self, text: str) -> None:
        self.emit(Message("info", text))

    def warning(self, text: str) -> None:
        self.emit(Message("warning", text))


class StopControl:
    """Thread-safe stop request: ``stop()`` discards the unfinished epoch, ``stop(save=True)`` saves now.

    Requests are counted, so a loop that waits on a failed save can tell a new press of Stop
    (give up) or Stop and save (try again now) from the request that started the save."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._changed = threading.Condition()
        self.save = False
        self.requests = 0
        self.last_save = False  # the kind of the latest request

    def stop(self, save: bool = False) -> None:
        with self._changed:
            self.save = self.save or save
            self.last_save = save
            self.requests += 1
            self._event.set()
            self._changed.notify_all()

    def wait_for_request(self, seen: int, timeout: float) -> int:
        """Wait until there are more than ``seen`` requests, at most ``timeout`` s; the count."""
        with self._changed:
            self._changed.wait_for(lambda: self.requests != seen, timeout)
            return self.requests

    @property
    def requested(self) -> bool:
        return self._event.is_set()
