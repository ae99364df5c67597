"""A background training job: start, stop, stop-and-save, status snapshots; one job at a time.

The UI thread only ever calls :meth:`TrainingJob.start` (which validates and returns at once),
:meth:`stop` and :meth:`status`; the work happens in a daemon thread that reports through the
same events the CLI prints.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import LoraTrainerError
from .train.events import (
    CachingProgress,
    EpochEnd,
    Event,
    EventBus,
    FileSaved,
    GridProgress,
    GridSaved,
    Message,
    StepEvent,
    StopControl,
    TrainingFinished,
    TrainingStarted,
    ValidationLoss,
)

IDLE, PREPARING, CACHING, TRAINING, FINISHING, GRID, DONE, STOPPED, FAILED = (
    "idle",
    "preparing",
    "caching latents",
    "training",
    "finishing",
    "building grid",
    "done",
    "stopped",
    "failed",
)
# "finishing": the loop has ended but the host still holds the model and the queue lock (releasing,
# refreshing the LoRA list, starting the grid). The job is running until its thread returns.
RUNNING_STATES = (PREPARING, CACHING, TRAINING, FINISHING, GRID)


class JobBusy(LoraTrainerError):
    pass


@dataclass(frozen=True)
class SavedFile:
    path: str
    epoch: int
    step: int
    final: bool

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def tag(self, weight: float = 1.0) -> str:
        return f"<lora:{self.name}:{weight:g}>"


@dataclass(frozen=True)
class JobStatus:
    state: str = IDLE
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    loss_average: float | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    eta: float | None = None
    cache_done: int = 0
    cache_total: int = 0
    files: tuple[SavedFile, ...] = ()
    messages: tuple[str, ...] = ()
    error: str | None = None
    summary: str = ""
    loss_history: tuple[tuple[int, float, float], ...] = ()
    """(step, loss, moving average) for the loss plot."""
    epoch_losses: tuple[tuple[int, float], ...] = ()
    validation: tuple[tuple[int, float], ...] = ()
    """(epoch, validation loss); epoch 0 is before training."""
    validation_held_out: bool = False
    grid_done: int = 0
    grid_total: int = 0
    grid_path: str | None = None

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def best_epoch(self) -> int | None:
        """The saved-epoch candidate with the lowest validation loss (epoch 0 excluded)."""
        trained = [(v, e) for e, v in self.validation if e > 0]
        return min(trained)[1] if trained else None

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (REST status route)."""
        return {
            "state": self.state,
            "running": self.running,
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "progress": round(self.progress, 4),
            "loss": self.loss,
            "loss_average": self.loss_average,
            "lrs": dict(self.lrs),
            "elapsed": round(self.elapsed, 1),
            "eta": None if self.eta is None else round(self.eta, 1),
            "files": [{"path": f.path, "epoch": f.epoch, "final": f.final, "tag": f.tag()} for f in self.files],
            "messages": list(self.messages),
            "error": self.error,
            "grid": {"done": self.grid_done, "total": self.grid_total, "path": self.grid_path},
            "validation": [{"epoch": e, "loss": v} for e, v in self.validation],
            "best_epoch": self.best_epoch,
        }


class TrainingJob:
    """Runs ``run(cfg, events, stop)`` in a background thread and keeps a status snapshot.

    ``run`` is the host-specific part: it builds the bundle from the host's model and calls the
    training loop. Exceptions end the job as ``failed`` with the message kept for the UI; the
    thread never takes the process down."""

    HISTORY = 2000
    MESSAGES = 50

    def __init__(self, run, on_event=None, grid=None):
        self._run = run
        self._grid = grid
        self._extra_listener = on_event
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._thread: threading.Thread | None = None
        self._stop: StopControl | None = None
        self._history: deque = deque(maxlen=self.HISTORY)
        self._messages: deque = deque(maxlen=self.MESSAGES)
        self._training_stopped: bool | None = None

    # -- control ---------------------------------------------------------------------
    def start(self, cfg: TrainConfig) -> None:
        """Validate and start; raises ConfigError at once for a bad config, JobBusy if one runs."""
        cfg.validate()
        self._launch(self._run, cfg, PREPARING)

    def start_grid(self, cfg: TrainConfig, files: list[str]) -> None:
        """Build a grid of saved LoRA files (the "Build grid" button) as a job of its own: the same
        progress, Stop and one-job-at-a-time rule as a training."""
        if self._grid is None:
            raise LoraTrainerError("This host cannot build grids.")
        cfg.validate()
        if not files:
            raise LoraTrainerError("Choose at least one saved LoRA file for the grid.")
        chosen = [str(f) for f in files]
        missing = [f for f in chosen if not Path(f).is_file()]
        if missing:
            raise LoraTrainerError(f"LoRA file not found: {missing[0]}. Refresh the file list and choose again.")
        self._launch(lambda c, bus, stop: self._grid(c, chosen, bus, stop), cfg, GRID)

    def _launch(self, fn, cfg: TrainConfig, state: str) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                what = "grid" if self._status.state == GRID and self._status.total_steps == 0 else "training"
                raise JobBusy(f"A {what} is already running. Stop it first, or wait until it ends.")
            self._stop = StopControl()
            self._history.clear()
            self._messages.clear()
            self._status = JobStatus(state=state)
            self._training_stopped: bool | None = None
            self._started = time.time()
            self._thread = threading.Thread(
                target=self._main, args=(fn, cfg, self._stop), name="lora_trainer-job", daemon=True
            )
            self._thread.start()

    def stop(self, save: bool = False) -> bool:
        """Ask the running job to stop (``save``: write the LoRA as it is now). False if none runs."""
        with self._lock:
            if self._stop is None or self._thread is None or not self._thread.is_alive():
                return False
            self._stop.stop(save)
            self._messages.append("stop and save requested" if save else "stop requested: the unfinished epoch is discarded")
            self._status = replace(self._status, messages=tuple(self._messages))
            return True

    def status(self) -> JobStatus:
        with self._lock:
            if self._status.running:
                return replace(self._status, elapsed=time.time() - self._started)
            return self._status

    def wait(self, timeout: float | None = None) -> JobStatus:
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self.status()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- worker ----------------------------------------------------------------------
    def _main(self, fn, cfg: TrainConfig, stop: StopControl) -> None:
        bus = EventBus(self._on_event)
        if self._extra_listener is not None:
            bus.subscribe(self._extra_listener)
        try:
            fn(cfg, bus, stop)
        except LoraTrainerError as e:
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001 - the job reports, the host keeps running
            msg = _friendly(e)
            self._fail(msg, traceback.format_exc())
        else:
            with self._lock:
                # a stop during the grid only cut the grid short: the training itself finished
                stopped = self._training_stopped if self._training_stopped is not None else stop.requested
                self._status = replace(
                    self._status, state=STOPPED if stopped else DONE, eta=0.0, elapsed=time.time() - self._started
                )

    def _fail(self, message: str, detail: str | None = None) -> None:
        with self._lock:
            self._messages.append("error: " + message)
            self._status = replace(
                self._status, state=FAILED, error=message, messages=tuple(self._messages), elapsed=time.time() - self._started
            )
        if detail:
            import logging

            logging.getLogger("lora_trainer").error("training failed:\n%s", detail)

    def _on_event(self, ev: Event) -> None:
        with self._lock:
            s = self._status
            if isinstance(ev, TrainingStarted):
                s = replace(s, state=PREPARING, total_steps=ev.total_steps, epochs=ev.epochs, summary=ev.summary)
                self._messages.append(ev.summary)
            elif isinstance(ev, CachingProgress):
                s = replace(s, state=CACHING if ev.done < ev.total else PREPARING, cache_done=ev.done, cache_total=ev.total)
            elif isinstance(ev, StepEvent):
                self._history.append((ev.step, ev.loss, ev.loss_average))
                s = replace(
                    s,
                    state=TRAINING,
                    step=ev.step,
                    total_steps=ev.total_steps,
                    epoch=ev.epoch,
                    loss=ev.loss,
                    loss_average=ev.loss_average,
                    lrs=dict(ev.lrs),
                    eta=ev.eta,
                    loss_history=tuple(self._history),
                )
            elif isinstance(ev, EpochEnd):
                s = replace(s, epoch_losses=s.epoch_losses + ((ev.epoch, ev.loss_epoch),))
                self._messages.append(f"epoch {ev.epoch} done: mean loss {ev.loss_epoch:.4f}")
            elif isinstance(ev, FileSaved):
                f = SavedFile(ev.path, ev.epoch, ev.step, ev.final)
                s = replace(s, files=s.files + (f,))
                self._messages.append(f"saved {Path(ev.path).name}  {f.tag()}")
            elif isinstance(ev, ValidationLoss):
                s = replace(s, validation=s.validation + ((ev.epoch, ev.loss),), validation_held_out=ev.held_out)
                where = "held-out" if ev.held_out else "training"
                label = "before training" if ev.epoch == 0 else f"epoch {ev.epoch}"
                self._messages.append(f"validation loss {label}: {ev.loss:.4f} ({ev.images} {where} images)")
            elif isinstance(ev, GridProgress):
                s = replace(s, state=GRID, grid_done=ev.done, grid_total=ev.total)
            elif isinstance(ev, GridSaved):
                s = replace(s, grid_path=ev.path)
                self._messages.append(f"grid saved: {ev.path}")
            elif isinstance(ev, Message):
                self._messages.append({"warning": "warning: ", "error": "error: "}.get(ev.level, "") + ev.text)
            elif isinstance(ev, TrainingFinished):
                self._training_stopped = ev.stopped
                s = replace(s, state=FINISHING, eta=0.0, elapsed=ev.seconds)
                self._messages.append(("stopped" if ev.stopped else "finished") + f" after {ev.steps} steps in {ev.seconds:.0f} s")
            self._status = replace(s, messages=tuple(self._messages))


def _friendly(e: BaseException) -> str:
    """A message with what to do for the failures users meet most."""
    text = f"{type(e).__name__}: {e}"
    low = str(e).lower()
    if "out of memory" in low:
        return (
            f"{text}. Out of memory: lower train_batch_size or resolution, turn on gradient_checkpointing and "
            "cache_latents, use mixed_precision bf16/fp16, or a smaller network_dim."
        )
    return text
