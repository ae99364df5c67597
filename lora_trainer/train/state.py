"""Training states: what a run needs to continue as if it had never stopped.

A state is two files in ``<output_dir>/.lora_trainer_state/<output_name>/``: ``step-<n>.state`` (torch
pickle, loaded with ``weights_only``) with the LoRA weights in float32, the optimizer, scheduler and
loss-scaler states, every random generator of the loop and the losses so far; then ``step-<n>.json``,
written last, so a state without its JSON is incomplete and ignored. The JSON alone (no torch) says
where the run stands and what defines it, so preflight can refuse a resume that would change the run
before a model is loaded.

The folder starts with a dot and holds no ``.safetensors`` / ``.pt`` / ``.ckpt`` names: the WebUIs walk
the LoRA folder recursively for those and must not list a state as a LoRA.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RESUME_MAY_CHANGE, TrainConfig
from ..dataset import DatasetScan
from ..errors import ConfigError
from ..files import write_file

STATE_FOLDER = ".lora_trainer_state"
FORMAT = 1


def state_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / STATE_FOLDER / cfg.output_name


def run_fingerprint(cfg: TrainConfig, scan: DatasetScan, world_size: int) -> dict[str, Any]:
    """What defines the run: the options a resume may not change, the dataset's content, the process count."""
    options = {k: v for k, v in sorted(cfg.to_dict().items()) if k not in RESUME_MAY_CHANGE}
    return {"options": options, "dataset": dataset_hash(scan), "world_size": world_size}


def dataset_hash(scan: DatasetScan) -> str:
    """The files (by folder and name, so a moved dataset still matches), their sizes, captions and repeats."""
    h = hashlib.sha256()
    for s in scan.subsets:
        for e in s.images:
            h.update(json.dumps([s.dir.name, s.repeats, e.path.name, e.path.stat().st_size, e.caption]).encode())
    return h.hexdigest()


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Human lines for what differs between two fingerprints."""
    out = []
    for k in sorted(set(saved["options"]) | set(now["options"])):
        a, b = saved["options"].get(k), now["options"].get(k)
        if a != b:
            out.append(f"{k}: {a!r} in the saved run, {b!r} now")
    if saved["dataset"] != now["dataset"]:
        out.append("the dataset: its files, sizes, captions or repeats changed")
    if saved["world_size"] != now["world_size"]:
        out.append(f"processes: {saved['world_size']} in the saved run, {now['world_size']} now")
    if saved.get("model_hash") and now.get("model_hash") and saved["model_hash"] != now["model_hash"]:
        out.append("the base model's hash")
    return out


@dataclass
class Checkpoint:
    """Where a saved run stands (the JSON) and, once loaded, its tensors."""

    path: Path  # the .json
    info: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.info["step"])

    @property
    def epoch(self) -> int:
        """The epoch the run continues in (1-based)."""
        return int(self.info["epoch"])

    @property
    def position(self) -> int:
        """Batches of that epoch already trained."""
        return int(self.info["position"])

    def load_tensors(self) -> Checkpoint:
        data = (self.path.parent / self.info["state_file"]).read_bytes()
        self.tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return self


def list_states(cfg: TrainConfig) -> list[Path]:
    """Complete states of this output_name (their JSON), oldest first."""
    folder = state_folder(cfg)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*.json") if p.with_suffix(".state").exists())


def find_state(cfg: TrainConfig, spec: str | bool | None) -> Path:
    """The state to resume: the latest of this output_name (``spec`` True or "latest") or the one at ``spec``."""
    if spec in (True, "latest"):
        states = list_states(cfg)
        if not states:
            raise ConfigError("resume", "latest", f"a saved training state of {cfg.output_name!r}: none in {state_folder(cfg)}")
        return states[-1]
    path = Path(str(spec))
    if path.is_dir():
        found = sorted(p for p in path.glob("step-*.json") if p.with_suffix(".state").exists())
        if not found:
            raise ConfigError("resume", str(spec), "a folder holding a complete training state (step-*.json and .state)")
        return found[-1]
    if path.suffix == ".state":
        path = path.with_suffix(".json")
    if not path.is_file() or not path.with_suffix(".state").exists():
        raise ConfigError("resume", str(spec), "a training state: a step-*.json beside its step-*.state")
    return path


def open_state(path: Path, fingerprint: dict[str, Any]) -> Checkpoint:
    """Read a state's JSON and refuse it when the run it belongs to is not this one."""
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT:
        raise ConfigError("resume", str(path), f"a training state of format {FORMAT} (this one: {info.get('format')})")
    diff = differences(info["fingerprint"], fingerprint)
    if diff:
        raise ConfigError(
            "resume",
            str(path),
            "a state of this same run, but these differ: " + "; ".join(diff)
            + f". Options a resume may change: {', '.join(RESUME_MAY_CHANGE)}",
        )
    return Checkpoint(path, info)


@dataclass
class Position:
    """Where the loop stands between two optimizer steps, with the random generators' states there.

    Taken after every optimizer step (and at each epoch start): a Stop in the middle of a gradient
    accumulation resumes from the last step, whose generators are then the ones that count."""

    epoch: int
    position: int
    step: int
    noise: torch.Tensor
    captions: tuple
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    epoch_losses: list[float]

    @classmethod
    def take(cls, epoch: int, position: int, step: int, gen: torch.Generator, caption_rng: random.Random,
             epoch_losses: list[float]) -> Position:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(epoch, position, step, gen.get_state(), caption_rng.getstate(), torch.get_rng_state(), cuda,
                   list(epoch_losses))

    def restore(self, gen: torch.Generator, caption_rng: random.Random) -> None:
        gen.set_state(self.noise)
        caption_rng.setstate(self.captions)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)


def save_state(
    cfg: TrainConfig,
    fingerprint: dict[str, Any],
    at: Position,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    losses: list[float],
    validation_losses: dict[int, float],
) -> Path:
    """Write one state (tensors first, the JSON that completes it last), then remove the oldest beyond
    ``save_last_n_states``. Returns the JSON's path. A state of the same step is replaced: it is this run's."""
    folder = state_folder(cfg)
    stem = f"step-{at.step:09d}"
    tensors = {
        "network": {k: v.detach().float().cpu() for k, v in network.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "noise": at.noise,
        "captions": _tuple_to_list(at.captions),
        "torch_cpu": at.torch_cpu,
        "cuda": at.cuda,
        "epoch_losses": at.epoch_losses,
        "losses": list(losses),
    }
    buf = io.BytesIO()
    torch.save(tensors, buf)
    write_file(folder / f"{stem}.state", buf.getvalue(), replace=True)
    info = {
        "format": FORMAT,
        "output_name": cfg.output_name,
        "step": at.step,
        "epoch": at.epoch,
        "position": at.position,
        "validation_losses": {str(k): v for k, v in validation_losses.items()},
        "fingerprint": fingerprint,
        "state_file": f"{stem}.state",
    }
    path = write_file(folder / f"{stem}.json", json.dumps(info, indent=1).encode(), replace=True)
    for old in list_states(cfg)[: -cfg.save_last_n_states]:
        old.unlink(missing_ok=True)  # the JSON first: a state without it is incomplete, never half-read
        old.with_suffix(".state").unlink(missing_ok=True)
    return path


def position_of(ckpt: Checkpoint) -> Position:
    t = ckpt.tensors
    return Position(ckpt.epoch, ckpt.position, ckpt.step, t["noise"], _list_to_tuple(t["captions"]), t["torch_cpu"],
                    t["cuda"], list(t["epoch_losses"]))


def _tuple_to_list(x: Any) -> Any:
    """``random.getstate()`` is nested tuples; lists survive any pickle setting the same way."""
    return [_tuple_to_list(v) for v in x] if isinstance(x, (tuple, list)) else x


def _list_to_tuple(x: Any) -> Any:
    return tuple(_list_to_tuple(v) for v in x) if isinstance(x, (tuple, list)) else x
