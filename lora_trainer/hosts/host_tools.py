"""The WebUI's own tools for dataset preparation: its upscalers (ESRGAN, SwinIR ... the user's
models in models/) and its captioners (BLIP, DeepBooru, and a WD14 tagger extension if installed).

A1111 and Forge keep these in the same places (``shared.sd_upscalers``, ``shared.interrogator``,
``modules.deepbooru.model``). Each use takes the host's queue lock without waiting, as the host's
own Extras and Interrogate buttons run under it: while a generation or a training runs, the tool
says the WebUI is busy instead of fighting for GPU memory. Every import happens in a function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from ..errors import LoraTrainerError

log = logging.getLogger("lora_trainer")

WD14_THRESHOLD = 0.35
BUSY = "The WebUI is busy (a generation or a LoRA training is running); try again when it is idle."


@contextmanager
def _queue_lock():
    try:
        from modules import call_queue
    except ImportError:
        yield
        return
    lock = call_queue.queue_lock
    if not lock.acquire(blocking=False):
        raise LoraTrainerError(BUSY)
    try:
        yield
    finally:
        lock.release()


def host_upscalers() -> dict[str, Callable[[Any, float], Any]]:
    """``name -> upscale(image, scale)`` for every upscaler the WebUI lists, "None" left out."""
    try:
        from modules import shared
    except ImportError:
        return {}
    out: dict[str, Callable[[Any, float], Any]] = {}
    for data in list(getattr(shared, "sd_upscalers", None) or []):
        name = str(getattr(data, "name", "") or "")
        scaler = getattr(data, "scaler", None)
        if not name or name == "None" or scaler is None:
            continue

        def upscale(image, scale, _scaler=scaler, _path=getattr(data, "data_path", None)):
            with _queue_lock():
                return _scaler.upscale(image, scale, _path)

        out[name] = upscale
    return out


class HostCaptioner:
    """``captioner(image) -> str`` with ``start()`` / ``stop()`` around a batch: the queue lock is
    held from start to stop, the model loaded at start and given back at stop."""

    def __init__(self, caption: Callable[[Any], str], load: Callable[[], None] | None = None,
                 unload: Callable[[], None] | None = None):
        self._caption, self._load, self._unload = caption, load, unload
        self._held = None

    def start(self) -> None:
        self._held = _queue_lock()
        self._held.__enter__()
        try:
            if self._load is not None:
                self._load()
        except BaseException:
            self._release()
            raise

    def stop(self) -> None:
        try:
            if self._unload is not None:
                self._unload()
        finally:
            self._release()

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)

    def __call__(self, image) -> str:
        return self._caption(image)


def _wd14_captioners() -> dict[str, HostCaptioner]:
    """The interrogators of a WD14 tagger extension (``tagger.utils.interrogators``: name ->
    object with ``interrogate(image) -> (ratings, {tag: confidence})``), if one is installed."""
    try:
        from tagger import utils  # the extension's package, on sys.path inside the WebUI
    except Exception:  # noqa: BLE001 - not installed, or broken: not offered
        return {}
    found = getattr(utils, "interrogators", None)
    if not isinstance(found, dict):
        return {}
    out = {}
    for name, it in found.items():
        if not hasattr(it, "interrogate"):
            continue

        def caption(image, _it=it) -> str:
            result = _it.interrogate(image)
            tags = result[1] if isinstance(result, tuple) and len(result) > 1 else result
            ranked = sorted(((float(c), str(t)) for t, c in dict(tags).items() if float(c) >= WD14_THRESHOLD), reverse=True)
            return ", ".join(t for _, t in ranked)

        out[f"WD14 tagger: {name}"] = HostCaptioner(caption, unload=getattr(it, "unload", None))
    return out


def host_captioners() -> dict[str, HostCaptioner]:
    """What the WebUI can caption with: BLIP (its CLIP interrogator's caption model), DeepBooru,
    and a WD14 tagger extension's models."""
    try:
        from modules import shared
    except ImportError:
        return {}
    out: dict[str, HostCaptioner] = {}
    interrogator = getattr(shared, "interrogator", None)
    if interrogator is not None and hasattr(interrogator, "generate_caption"):
        out["BLIP (WebUI interrogator)"] = HostCaptioner(
            interrogator.generate_caption, load=interrogator.load, unload=getattr(interrogator, "unload", None)
        )
    try:
        from modules import deepbooru
    except Exception:  # noqa: BLE001 - not in this WebUI
        deepbooru = None
    model = getattr(deepbooru, "model", None)
    if model is not None and hasattr(model, "tag_multi"):
        out["DeepBooru (WebUI)"] = HostCaptioner(model.tag_multi, load=model.start, unload=model.stop)
    out.update(_wd14_captioners())
    return out
