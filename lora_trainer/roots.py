"""Where a served page may point training: folders the user named when starting the server.

The standalone page and its REST routes take paths from the browser (dataset, base model, configs,
TensorBoard folder). A client must not read, probe or fill folders the user never offered: every such
path must resolve, symlinks followed, inside one of the roots given at start. The refusal reads the same
whether or not the path exists, so it tells nothing about the file system.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .errors import ConfigError

# field -> which roots it must be under
PATH_FIELDS = {
    "train_data_dir": "data",
    "logging_dir": "data",
    "pretrained_model": "models",
    "model_config_dir": "models",
}
BUILTIN_PREFIX = "builtin:"


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def is_inside(path: str | Path, root: str | Path) -> bool:
    """``path`` is ``root`` or below it once both are resolved (``..`` and symlinks followed)."""
    real, top = _real(path), _real(root)
    return os.path.commonpath([real, top]) == top


@dataclass(frozen=True)
class Roots:
    data: tuple[str, ...]
    models: tuple[str, ...]

    @classmethod
    def of(cls, data: Iterable[str], models: Iterable[str] = ()) -> Roots:
        return cls(tuple(_real(p) for p in data), tuple(_real(p) for p in models))

    @classmethod
    def from_start(cls, data: Iterable[str], models: Iterable[str], cfg: TrainConfig) -> Roots:
        """The roots given on the command line, plus what the start config itself names (the user chose
        those when starting): its dataset folder and the folder of its base model and configs."""
        data = [*data, *([cfg.train_data_dir] if cfg.train_data_dir else [])]
        models = list(models)
        if cfg.pretrained_model and not cfg.pretrained_model.startswith(BUILTIN_PREFIX):
            models.append(str(Path(cfg.pretrained_model).parent))
        if cfg.model_config_dir:
            models.append(cfg.model_config_dir)
        return cls.of(data, models)

    def check(self, cfg: TrainConfig) -> None:
        """Raise a ConfigError for the first path option outside its roots."""
        for name, kind in PATH_FIELDS.items():
            value = getattr(cfg, name)
            if not value or (name == "pretrained_model" and value.startswith(BUILTIN_PREFIX)):
                continue
            roots = getattr(self, kind)
            if not any(is_inside(value, r) for r in roots):
                raise ConfigError(
                    name,
                    value,
                    f"a path under {', '.join(roots) or '(none)'}: the folders this page serves "
                    f"(start `lora_trainer ui` with --{kind}-root <folder> to offer another)",
                )
