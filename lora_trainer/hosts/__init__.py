"""Hosts hand the core their loaded models. Host imports (``modules.*``, ``backend.*``) live only here."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..config import TrainConfig
from ..model.bundle import ModelBundle
from ..train.runtime import Runtime


class Host(Protocol):
    name: str

    def model_bundle(self, cfg: TrainConfig, runtime: Runtime) -> ModelBundle:
        """The loaded model as a bundle on ``runtime.device`` (no second copy in a WebUI)."""

    def lora_dir(self, cfg: TrainConfig) -> Path:
        """Where epoch files go (the host's models/Lora, or cfg.output_dir standalone)."""

    def refresh_loras(self) -> None:
        """Make newly saved files visible to the host's LoRA list."""
