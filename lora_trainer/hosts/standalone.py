"""The standalone host: loads the base model itself (no WebUI), offline."""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..errors import ConfigError
from ..model.bundle import ModelBundle
from ..model.sd import DiffusersSD, make_sd_bundle
from ..train.runtime import Runtime


class StandaloneHost:
    name = "standalone"

    def __init__(self, parts: DiffusersSD | None = None):
        """``parts`` short-circuits loading (tests, the demo); otherwise ``cfg.pretrained_model`` is loaded."""
        self._parts = parts

    def load_parts(self, cfg: TrainConfig) -> DiffusersSD:
        if self._parts is None:
            if not cfg.pretrained_model:
                raise ConfigError("pretrained_model", "", "a .safetensors checkpoint or a diffusers folder")
            from ..model.loading import load_sd

            self._parts = load_sd(cfg.pretrained_model, cfg.model_config_dir or None)
        return self._parts

    def model_bundle(self, cfg: TrainConfig, runtime: Runtime) -> ModelBundle:
        return make_sd_bundle(
            self.load_parts(cfg),
            device=runtime.device,
            dtype=runtime.weight_dtype,
            clip_skip=cfg.clip_skip,
            prediction_type=cfg.prediction_type,
        )

    def lora_dir(self, cfg: TrainConfig) -> Path:
        return Path(cfg.output_dir)

    def refresh_loras(self) -> None:
        pass

    def run(self, cfg: TrainConfig, events, stop) -> None:
        """One training run on this host (what a background job calls)."""
        from ..train.loop import train

        runtime = Runtime(Runtime.from_env(cfg.mixed_precision).device, cfg.mixed_precision)
        events.info(f"loading {cfg.pretrained_model}" if self._parts is None else "using the loaded model")
        bundle = self.model_bundle(cfg, runtime)
        train(cfg, bundle, events, stop, runtime=runtime)
        self.refresh_loras()
