"""The output folder: checked before anything is loaded, and what happens when a save fails.

A read-only or full folder used to show up only at the first save, after the model load, the
latent cache and an epoch, as a raw traceback. :func:`check_output_folder` finds it in preflight;
:func:`save_or_keep` turns a save that fails anyway (the disk filled up meanwhile, another run took
the name) into one line that says which file, why and what to do, and keeps the LoRA in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import TrainConfig
from ..errors import ConfigError
from ..files import check_writable, free_disk, remove_stale_temp_files, write_problem
from .events import EventBus, Message, StopControl

# Bytes of an SD1.5 LoRA (UNet + text encoder) per unit of network_dim in fp16: 144 MB at dim 128.
# SD1.5 gives the smallest files of the families, so the free-space check is a lower bound: it
# refuses only a folder where even that does not fit (the family is known only after the load).
LORA_BYTES_PER_DIM = 1_130_000
SAVE_RETRY_SECONDS = 30.0


def expected_output_bytes(cfg: TrainConfig, epochs: int) -> int:
    """At least what the run's LoRA files take: one per ``save_every_n_epochs`` and the final one."""
    files = 1 + (epochs - 1) // cfg.save_every_n_epochs if cfg.save_every_n_epochs else 1
    per_dim = LORA_BYTES_PER_DIM * (2 if cfg.save_precision == "float" else 1)
    return files * cfg.network_dim * per_dim


def check_output_folder(cfg: TrainConfig, epochs: int, extra_folders: list[Path], events: EventBus | None) -> None:
    """Remove temp files of interrupted saves, then make sure the output folder takes the files."""
    folder = Path(cfg.output_dir)
    for f in [folder, *extra_folders]:
        removed = remove_stale_temp_files(f)
        if removed and events is not None:
            events.info(f"removed {len(removed)} temp file(s) of an interrupted save in {f}")
    try:
        check_writable(folder)
    except OSError as e:
        why, fix = write_problem(e)
        raise ConfigError("output_dir", str(folder), f"a folder files can be created in ({why}): {fix}") from None
    need = expected_output_bytes(cfg, epochs)
    free = free_disk(folder)
    if free < need:
        raise ConfigError(
            "output_dir",
            str(folder),
            f"a folder with at least {_mb(need)} free for the LoRA files of this run ({_mb(free)} free now): "
            "free space there or choose another output folder",
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e6:.1f} MB"


def save_failed_line(path: Path, err: OSError, then: str) -> str:
    """One line: which file, why, what to do, and ``then`` (what happens to the LoRA in memory)."""
    why, fix = write_problem(err)
    return f"could not save {path}: {why}. {fix[0].upper()}{fix[1:]} ({path.parent}); {then}"


def save_or_keep(write: Callable[[], object], path: Path, final: bool, events: EventBus, stop: StopControl) -> bool:
    """Run ``write``; on an ``OSError`` report one line and keep the LoRA in memory. True if written.

    An epoch file that fails is skipped: training goes on and the next save writes the LoRA again.
    The final file is the last chance, so it is tried again every ``SAVE_RETRY_SECONDS`` (at once on
    Stop and save) until it is written or Stop gives it up."""
    then = (
        "training goes on with the LoRA in memory: the next save, or Stop and save, writes it again"
        if not final
        else f"the LoRA is kept in memory and saving is tried again every {SAVE_RETRY_SECONDS:g} s "
        "(Stop and save: at once); Stop (Ctrl-C in a terminal) gives it up"
    )
    seen = stop.requests
    last = ""
    while True:
        try:
            write()
            return True
        except OSError as e:
            line = save_failed_line(path, e, then)
        if line != last:  # the same failure again is not news
            events.emit(Message("error", line))
            last = line
        if not final:
            return False
        now = stop.wait_for_request(seen, SAVE_RETRY_SECONDS)
        if now != seen and not stop.last_save:
            events.emit(Message("error", f"{path.name} was not saved: stopped"))
            return False
        seen = now
