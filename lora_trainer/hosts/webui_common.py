"""What the A1111 and Forge adapters do the same way: the LoRA folder and its rescan, the queue
lock, and the "Build grid" job. Every WebUI import happens inside a function."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
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
