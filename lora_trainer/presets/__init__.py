"""Training presets: built-in TOML files next to this module, and the user's own in a folder.

A preset file is a sectioned config TOML (the same sections as :meth:`TrainConfig.to_toml`) with
a ``[preset]`` table: ``name`` (shown in the UI), ``description`` and optionally ``extends`` (the
file stem of another preset whose values it starts from). A preset sets training settings only:
:func:`load_preset` starts from the defaults, applies the preset, then keeps the *run* fields
(base model, folders, output name, caption extension) of the ``base`` config it is given, so
choosing a preset never points a run at another dataset or overwrites another run's files.

Does not import torch.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from ..config import TrainConfig, _toml_value
from ..errors import ConfigError, LoraTrainerError
from ..files import write_file

BUILTIN_DIR = Path(__file__).resolve().parent

RUN_FIELDS: tuple[str, ...] = (
    "pretrained_model",
    "model_config_dir",
    "train_data_dir",
    "caption_extension",
    "output_dir",
    "output_name",
    "logging_dir",
    "grid_prompt",
    "grid_negative_prompt",
)
"""Fields that belong to one run, not to a preset: kept from the current config when a preset is applied."""

_SECTIONS = {f.metadata["section"] for f in fields(TrainConfig)}
_FIELD_NAMES = {f.name for f in fields(TrainConfig)}


@dataclass(frozen=True)
class PresetInfo:
    name: str
    description: str
    path: Path
    builtin: bool


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("preset", str(path), f"valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError("preset", str(path), f"a readable file ({e.strerror or e})") from None


def _info(path: Path, builtin: bool) -> PresetInfo:
    meta = _read(path).get("preset", {})
    if not isinstance(meta, dict):
        meta = {}
    return PresetInfo(
        name=str(meta.get("name") or path.stem),
        description=str(meta.get("description", "")),
        path=path,
        builtin=builtin,
    )


def presets_info(user_folder: str | Path | None = None) -> list[PresetInfo]:
    """Built-in presets (sorted by name), then the user's (``*.toml`` in ``user_folder``, sorted by name)."""
    out = sorted((_info(p, True) for p in BUILTIN_DIR.glob("*.toml")), key=lambda i: i.name.lower())
    if user_folder:
        folder = Path(user_folder).expanduser()
        if folder.is_dir():
            out += sorted((_info(p, False) for p in folder.glob("*.toml")), key=lambda i: i.name.lower())
    return out


def list_presets(user_folder: str | Path | None = None) -> list[str]:
    """Names of all presets, built-in first: what a dropdown shows."""
    return [i.name for i in presets_info(user_folder)]


def _find(name: str, user_folder: str | Path | None) -> PresetInfo:
    key = str(name).strip().lower()
    infos = presets_info(user_folder)
    # a user preset wins over a built-in of the same file stem; names are unique (save refuses clashes)
    for i in sorted(infos, key=lambda i: i.builtin):
        if i.name.lower() == key or i.path.stem.lower() == key:
            return i
    raise ConfigError("preset", name, "one of " + ", ".join(repr(i.name) for i in infos))


def _flatten(data: dict[str, Any], where: Path) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "preset":
            continue
        if isinstance(value, dict) and key in _SECTIONS:
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - _FIELD_NAMES)
    if unknown:
        raise ConfigError(unknown[0], flat[unknown[0]], f"a known option (in preset {where})")
    return flat


def _preset_values(info: PresetInfo, user_folder: str | Path | None, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    data = _read(info.path)
    meta = data.get("preset", {}) if isinstance(data.get("preset"), dict) else {}
    values: dict[str, Any] = {}
    parent = meta.get("extends")
    if parent:
        if str(parent).lower() in seen:
            raise ConfigError("extends", parent, f"a preset that does not extend itself (in {info.path})")
        values.update(_preset_values(_find(str(parent), user_folder), user_folder, (*seen, info.path.stem.lower())))
    values.update(_flatten(data, info.path))
    return values


def load_preset(name: str, base: TrainConfig | None = None, user_folder: str | Path | None = None) -> TrainConfig:
    """The config of preset ``name`` (its display name or file stem, case-insensitive), validated.

    Defaults, then the preset's values, then the :data:`RUN_FIELDS` of ``base`` when given.
    """
    info = _find(name, user_folder)
    values = TrainConfig().to_dict()
    values.update(_preset_values(info, user_folder))
    if base is not None:
        for f in RUN_FIELDS:
            if f in _FIELD_NAMES:
                values[f] = getattr(base, f)
    try:
        return TrainConfig.from_dict(values, source=f"preset {info.name!r}").validate()
    except ConfigError as e:
        raise ConfigError(e.field, e.value, f"{e.allowed} (in preset {info.path})") from None


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", name.strip()).strip("_").lower()
    return s or "preset"


def preset_toml(name: str, cfg: TrainConfig, description: str = "", include_run_fields: bool = False) -> str:
    """A preset file's text: the ``[preset]`` table and every field of ``cfg`` (run fields only on request)."""
    lines = ["[preset]", f"name = {_toml_value(name)}", f"description = {_toml_value(description)}", ""]
    section = None
    for f in fields(TrainConfig):
        if f.name in RUN_FIELDS and not include_run_fields:
            continue
        sec = f.metadata["section"]
        if sec != section:
            if section is not None:
                lines.append("")
            lines.append(f"[{sec}]")
            section = sec
        lines.append(f"# {f.metadata['help']}")
        lines.append(f"{f.name} = {_toml_value(getattr(cfg, f.name))}")
    return "\n".join(lines) + "\n"


def save_user_preset(
    name: str,
    cfg: TrainConfig,
    folder: str | Path,
    description: str = "",
    overwrite: bool = False,
    include_run_fields: bool = False,
) -> Path:
    """Save ``cfg`` as preset ``name`` in ``folder`` (``<slug>.toml``) and return the file.

    Refuses a name a built-in preset has, and an existing file unless ``overwrite``. Written to a
    temporary file first and renamed, so a crash never leaves half a preset.
    """
    name = str(name).strip()
    if not name:
        raise ConfigError("preset name", name, "a non-empty name")
    cfg.validate()
    builtin = {i.name.lower() for i in presets_info(None)} | {p.stem.lower() for p in BUILTIN_DIR.glob("*.toml")}
    if name.lower() in builtin or _slug(name) in builtin:
        raise ConfigError("preset name", name, "a name no built-in preset has")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_slug(name)}.toml"
    text = preset_toml(name, cfg, description, include_run_fields)
    try:
        return write_file(path, text.encode("utf-8"), replace=overwrite)
    except FileExistsError:  # never replaced without overwrite, even one saved a moment ago elsewhere
        raise LoraTrainerError(f"{path}: a preset with this name exists already. Choose another name or allow overwriting") from None


__all__ = [
    "BUILTIN_DIR",
    "RUN_FIELDS",
    "PresetInfo",
    "list_presets",
    "load_preset",
    "preset_toml",
    "presets_info",
    "save_user_preset",
]
