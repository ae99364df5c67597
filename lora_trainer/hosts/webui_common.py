"""What the A1111 and Forge adapters do the same way: the LoRA folder and its rescan, the queue
lock, and the "Build grid" job. Every WebUI import happens inside a function."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError
from ..train.events import EventBus, StopControl

log = logging.getLogger("lora_trainer")

SUBFOLDER_OPTION = "lora_trainer_subfolder"


def webui_lora_dir(shared: Any) -> Path:
    """The WebUI's LoRA folder (``--lora-dir``, default models/Lora) plus the settings' sub-folder,
    which must stay inside it."""
    base = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
    if not base:
        base = os.path.join(getattr(shared, "models_path", "models"), "Lora")
    base_path = Path(base)
    sub = str(getattr(getattr(shared, "opts", None), SUBFOLDER_OPTION, "") or "").strip().strip("/\\")
    if not sub:
        return base_path
    root = base_path.resolve()
    target = (base_path / sub).resolve()
    if Path(sub).is_absolute() or ".." in Path(sub).parts or (target != root and root not in target.parents):
        raise ConfigError(SUBFOLDER_OPTION, sub, f"a sub-folder inside {root} (Settings > LoRA Trainer), without '..'")
    return base_path / sub


def rescan_loras(networks: Any) -> None:
    """``networks.list_available_networks()`` of the WebUI's Lora extension, if it is loaded; a
    failed rescan is logged, never raised (it must not fail a training)."""
    fn = getattr(networks, "list_available_networks", None)
    if fn is None:
        return
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - see docstring
        log.warning("refreshing the WebUI's LoRA list failed: %s", e)


def acquire_queue_lock(lock: Any, events: EventBus, stop: StopControl) -> bool:
    """Take the WebUI's queue lock; False when Stop came first. The hosts' FIFOLock takes no
    timeout: poll, so that Stop still works while a generation runs."""
    if lock.acquire(blocking=False):
        return True
    events.info("waiting for the WebUI to finish the current generation")
    while not lock.acquire(blocking=False):
        time.sleep(0.2)
        if stop.requested:
            events.info("stopped before it began")
            return False
    return True


def build_grid_locked(
    shared: Any,
    cfg: TrainConfig,
    files: list[str],
    events: EventBus,
    stop: StopControl,
    generate: Callable,
    refresh: Callable[[], None],
) -> None:
    """The "Build grid" button inside a WebUI: saved LoRA files x ``cfg.grid_weights`` through the
    host's txt2img (``generate``), with generation locked out as for a training."""
    from modules import call_queue

    from ..grid import grid_of_files

    lock = call_queue.queue_lock
    if not acquire_queue_lock(lock, events, stop):
        return
    state = shared.state
    state.begin(job="LoRA grid")
    try:
        refresh()  # files copied in since the last scan
        grid_of_files(cfg, files, generate, events, stop)
    finally:
        state.end()
        lock.release()


def txt2img_cell(cell: Any, **extra: Any) -> Any:
    """One grid cell through the WebUI's ``modules.processing``, as its txt2img tab does it
    (``<lora:file:w>`` in the prompt). The picture keeps the host's infotext in
    ``image.info["parameters"]`` (with its "Lora hashes"), which the grid PNG records per cell."""
    from contextlib import closing

    from modules import processing, shared

    from ..errors import LoraTrainerError

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model,
        prompt=cell.prompt_with_lora(),
        negative_prompt=cell.negative_prompt,
        seed=cell.seed,
        steps=cell.steps,
        cfg_scale=cell.cfg_scale,
        width=cell.width,
        height=cell.height,
        sampler_name=cell.sampler_name,
        do_not_save_samples=True,
        do_not_save_grid=True,
        **extra,
    )
    with closing(p):
        processed = processing.process_images(p)
    if not getattr(processed, "images", None):
        raise LoraTrainerError(f"the WebUI's txt2img gave no image for {cell.tag()}")
    image = processed.images[0]
    infotexts = getattr(processed, "infotexts", None) or []
    if infotexts and hasattr(image, "info"):
        image.info["parameters"] = str(infotexts[0])
    return image


def finite_latents(latents: Any, dtype: Any, fix: str) -> Any:
    """``latents`` when every value is finite; otherwise a LoraTrainerError saying the VAE overflowed
    (SDXL's VAE does in fp16) and ``fix`` (the host's way to a full-precision VAE)."""
    import torch

    from ..errors import LoraTrainerError

    if not torch.isfinite(latents).all():
        raise LoraTrainerError(
            f"The VAE gave non-finite latents in {str(dtype).replace('torch.', '')} (SDXL's VAE overflows in "
            f"half precision): {fix}, or select an fp16-fixed SDXL VAE."
        )
    return latents


def grid_after_training_in_host(shared: Any, cfg: TrainConfig, result: Any, scan: Any, events: EventBus,
                                stop: StopControl, generate: Callable) -> None:
    """The epochs x weights grid at the end of a run, through the host's own txt2img (``<lora:file:w>``
    in the prompt, the code path the user's prompts take), as a job in the host's state. A failure
    here is reported, never fatal: the LoRA files are already saved."""
    from ..grid import grid_after_training

    state = shared.state
    state.begin(job="LoRA grid")
    try:
        grid_after_training(
            cfg, [str(p) for p in result.files], generate, events, stop, scan.trigger_word, result.validation_losses
        )
    except Exception as e:  # noqa: BLE001 - see docstring
        events.warning(f"the grid could not be built ({type(e).__name__}: {e}); the LoRA files are saved")
    finally:
        state.end()


# -- does the host apply every module of a saved file? ---------------------------------------------

LORA_WEIGHTS = ("lora_up.weight", "lora_down.weight")
NAMES_SHOWN = 8  # names in the tab's message; the log gets all of them


class HostLoaderMissing(LookupError):
    """The host's own LoRA loader cannot be reached (its built-in Lora extension is not loaded)."""


@dataclass(frozen=True)
class HostLayer:
    """The layer a host's loader puts one LoRA module on: its name in the host, its weight's shape
    (None: a layer without a plain weight, not checked) and the module itself (None: unknown)."""

    name: str
    shape: tuple[int, ...] | None = None
    module: Any = None


@dataclass
class HostMatch:
    """What the host's LoRA loader makes of one file: ``applied`` maps each module stem
    (``lora_unet_..``) it matched to the layer it lands on; ``applies_none`` says why the host drops
    the whole file (Forge does when too many keys are unmatched), or is empty."""

    applied: dict[str, HostLayer] = field(default_factory=dict)
    applies_none: str = ""


def lora_module_shapes(path: Path | str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each LoRA module stem of a saved file with its (up, down) shapes, read from the header only."""
    from safetensors import safe_open

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            stem, _, part = key.partition(".")
            if part in LORA_WEIGHTS:
                shapes.setdefault(stem, {})[part] = tuple(f.get_slice(key).get_shape())
    return {s: (p[LORA_WEIGHTS[0]], p[LORA_WEIGHTS[1]]) for s, p in shapes.items() if len(p) == 2}


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def layer_misfit(up: tuple[int, ...], down: tuple[int, ...], weight: tuple[int, ...] | None) -> str:
    """Why a LoRA with these up/down shapes does not fit a layer weight of shape ``weight``, or ""
    when it fits. The delta is ``up @ down``: [out, in], times the kernel of a conv's down; the
    hosts reshape it to the layer's weight, so a 1x1 conv and a Linear take the same LoRA."""
    if weight is None:
        return ""
    out, inp, kernel = up[0], down[1], math.prod(down[2:])
    if len(weight) >= 2 and (weight[0], weight[1], math.prod(weight[2:])) == (out, inp, kernel):
        return ""
    delta = (out, inp, *down[2:])
    return f"a {_dims(delta)} change for a {_dims(weight)} layer"


def _listed(names: list[str], shown: int | None) -> str:
    if shown is None or len(names) <= shown:
        return ", ".join(names)
    return ", ".join(names[:shown]) + f" and {len(names) - shown} more"


def is_trained_layer(host_module: Any, trained: Any) -> bool:
    """Whether the host's layer is the one a LoRA module was trained on. Our LoRA on an OpenCLIP
    attention's fused projection trains a view of the ``MultiheadAttention``; the host names the
    attention itself (q/k/v) or its ``out_proj``."""
    if host_module is None or trained is None or host_module is trained:
        return True
    attention = getattr(trained, "attention", None)
    return attention is not None and host_module in (attention, getattr(attention, "out_proj", None))


def _misplaced(modules: dict, applied: dict[str, HostLayer], trained: dict[str, Any]) -> dict[str, str]:
    """Matched stems the host adds to a layer they were not trained on: another layer (same shape,
    silently wrong) or a layer of another shape (dropped at generation)."""
    why: dict[str, str] = {}
    for stem in sorted(modules):
        layer = applied.get(stem)
        if layer is None:
            continue
        if misfit := layer_misfit(*modules[stem], layer.shape):
            why[stem] = f"{layer.name}: {misfit}"
        elif not is_trained_layer(layer.module, trained.get(stem)):
            why[stem] = f"{layer.name}, not the layer it was trained on"
    return why


def ignored_modules_message(
    host: str, path: Path | str, match: HostMatch, trained: dict[str, Any] | None = None, shown: int | None = NAMES_SHOWN
) -> str:
    """The warning for a file the host does not apply as trained, or "" when it applies every module
    to its layer. ``trained``: stem -> the layer it was trained on (None: not compared);
    ``shown``: how many module names to list (None: all)."""
    modules = lora_module_shapes(path)
    name = Path(path).name
    meaning = (
        "the grid and every prompt with this file get a LoRA that is not the one trained; "
        "the loaded model's layer layout is probably not one the host's LoRA loader knows"
    )
    if match.applies_none:
        return f"{host} will apply none of the {len(modules)} LoRA modules of {name} ({match.applies_none}): {meaning}"
    unmatched = sorted(s for s in modules if s not in match.applied)
    misplaced = _misplaced(modules, match.applied, trained or {})
    if not unmatched and not misplaced:
        return ""
    reasons = []
    if unmatched:
        reasons.append(f"{len(unmatched)} match no layer of the loaded model ({_listed(unmatched, shown)})")
    if misplaced:
        wrong = [f"{s} -> {w}" for s, w in misplaced.items()]
        reasons.append(f"{len(misplaced)} land on another layer ({_listed(wrong, shown)})")
    ignored = len(unmatched) + len(misplaced)
    return f"{host} will ignore or misplace {ignored} of {len(modules)} LoRA modules of {name}: {'; '.join(reasons)}; {meaning}"


class HostKeyCheck:
    """``after_save`` step inside a WebUI: ask the host's own LoRA loader (``match(path)``, a
    :class:`HostMatch`) which modules of the saved file it applies to the loaded model, and warn
    before any grid is made with the file when it skips some. Hosts only log that at debug level
    (A1111) or print it (Forge). A missing loader is said once; the check never fails a training."""

    def __init__(self, host: str, match: Callable[[Path], HostMatch], events: EventBus):
        self.host = host
        self.match = match
        self.events = events
        self._unreachable_said = False

    def __call__(self, path: Path, network: Any = None) -> None:
        trained = {m.lora_name: m.org_module for m in getattr(network, "loras", ())}
        try:
            match = self.match(Path(path))
            message = ignored_modules_message(self.host, path, match, trained)
        except HostLoaderMissing as e:
            if not self._unreachable_said:
                self._unreachable_said = True
                self.events.info(f"the saved files' keys are not checked against {self.host}'s LoRA loader: {e}")
            return
        except Exception as e:  # noqa: BLE001 - see class docstring
            self.events.info(f"{self.host}'s LoRA loader could not check {Path(path).name} ({type(e).__name__}: {e})")
            return
        if message:
            log.warning("%s", ignored_modules_message(self.host, path, match, trained, shown=None))
            self.events.warning(message)


def checked_after_save(check: HostKeyCheck, then: Callable[[Path, Any], None] | None) -> Callable[[Path, Any], None]:
    """The loop's ``after_save``: the key check first (its warning precedes any grid), then ``then``."""

    def after_save(path: Path, network: Any) -> None:
        check(path, network)
        if then is not None:
            then(path, network)

    return after_save
