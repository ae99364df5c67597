"""Built-in and user presets: the values they promise, validation, run fields kept, saving."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_trainer.config import TrainConfig, parse_optimizer_args
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.presets import (
    BUILTIN_DIR,
    RUN_FIELDS,
    list_presets,
    load_preset,
    presets_info,
    save_user_preset,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FACE = "Realistic face, SD1.5"
FACE_DADAPT = "Realistic face, SD1.5, dynamic LR (DAdaptAdam)"
SDXL = "Realistic character, SDXL"
SDXL_DADAPT = "Realistic character, SDXL, dynamic LR (DAdaptAdam)"
DADAPT_ARGS = {"decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.999)}


def test_builtin_presets_are_listed() -> None:
    names = list_presets()
    assert {FACE, FACE_DADAPT, SDXL, SDXL_DADAPT} <= set(names)
    assert len(names) == len(list(BUILTIN_DIR.glob("*.toml")))
    assert all(i.builtin and i.description for i in presets_info())


@pytest.mark.parametrize("name", [FACE, FACE_DADAPT, SDXL, SDXL_DADAPT])
def test_every_builtin_preset_validates(name: str) -> None:
    cfg = load_preset(name)
    assert isinstance(cfg, TrainConfig)
    assert cfg.validate() is cfg
    # every preset holds only known options (a typo in a TOML file must fail this test)
    assert load_preset(name.lower()) == cfg


def test_realistic_face_sd15_values() -> None:
    cfg = load_preset(FACE)
    assert (cfg.network_dim, cfg.network_alpha) == (128, 64.0)
    assert cfg.optimizer == "AdamW8bit"
    assert cfg.lr_scheduler == "cosine_with_restarts" and cfg.lr_scheduler_num_cycles == 3
    assert cfg.max_train_epochs == 10 and cfg.save_every_n_epochs == 1
    assert cfg.mixed_precision == "fp16" and cfg.cache_latents is True
    assert cfg.resolution == 768


def test_realistic_character_sdxl_values() -> None:
    cfg = load_preset(SDXL)
    assert (cfg.network_dim, cfg.network_alpha) == (128, 32.0)
    assert cfg.optimizer == "Adafactor"
    assert parse_optimizer_args(cfg.optimizer_args) == {"relative_step": True, "scale_parameter": True, "warmup_init": True}
    assert cfg.mixed_precision == "bf16" and cfg.train_batch_size == 2
    assert cfg.gradient_checkpointing is True and cfg.cache_latents is True
    assert cfg.resolution == 1024
    # the SDXL-only options that do not exist yet are named in the file
    text = (BUILTIN_DIR / "realistic_character_sdxl.toml").read_text(encoding="utf-8")
    assert "enable_bucket" in text and "cache_text_encoder_outputs" in text


@pytest.mark.parametrize(("name", "parent"), [(FACE_DADAPT, FACE), (SDXL_DADAPT, SDXL)])
def test_dynamic_lr_variants(name: str, parent: str) -> None:
    cfg, base = load_preset(name), load_preset(parent)
    assert cfg.optimizer == "DAdaptAdam"
    assert parse_optimizer_args(cfg.optimizer_args) == DADAPT_ARGS
    assert cfg.learning_rate == cfg.unet_lr == cfg.text_encoder_lr == 1.0  # DAdaptAdam refuses different group lrs
    # everything else comes from the preset it extends
    assert (cfg.network_dim, cfg.network_alpha, cfg.resolution) == (base.network_dim, base.network_alpha, base.resolution)
    assert cfg.mixed_precision == base.mixed_precision and cfg.train_batch_size == base.train_batch_size


def test_preset_keeps_the_run_fields_of_the_base() -> None:
    base = TrainConfig(
        pretrained_model="/models/rv.safetensors", train_data_dir="/p/img", output_dir="/p/model",
        output_name="anna", logging_dir="/p/log", caption_extension=".caption", network_dim=8, optimizer="Lion",
    )
    cfg = load_preset(FACE, base=base)
    for f in RUN_FIELDS:
        if hasattr(base, f):
            assert getattr(cfg, f) == getattr(base, f)
    assert cfg.network_dim == 128 and cfg.optimizer == "AdamW8bit"
    # switching presets does not keep the previous preset's optimizer arguments
    assert load_preset(FACE, base=load_preset(FACE_DADAPT)).optimizer_args == ""


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="Realistic face"):
        load_preset("does not exist")


def test_user_preset_save_and_load(tmp_path: Path) -> None:
    folder = tmp_path / "presets"
    cfg = load_preset(FACE).with_overrides(["network_dim=64", "train_data_dir=/somewhere", "output_name=anna"])
    path = save_user_preset("My face v2", cfg, folder, description="smaller rank")
    assert path.parent == folder and path.suffix == ".toml"
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["preset"]["name"] == "My face v2"
    assert "train_data_dir" not in data["dataset"] and "output_name" not in data["output"]  # run fields are not saved
    assert list_presets(folder)[-1] == "My face v2"
    info = presets_info(folder)[-1]
    assert not info.builtin and info.description == "smaller rank"
    base = TrainConfig(train_data_dir="/data/now", output_name="bob")
    loaded = load_preset("My face v2", base=base, user_folder=folder)
    assert loaded.network_dim == 64 and loaded.train_data_dir == "/data/now" and loaded.output_name == "bob"
    expected = TrainConfig.from_dict({**cfg.to_dict(), "train_data_dir": "/data/now", "output_name": "bob"})
    assert loaded == expected
    # never overwritten silently; built-in names are refused
    with pytest.raises(LoraTrainerError, match="exists"):
        save_user_preset("My face v2", cfg, folder)
    save_user_preset("My face v2", cfg.with_overrides(["network_dim=32"]), folder, overwrite=True)
    assert load_preset("my face v2", user_folder=folder).network_dim == 32
    with pytest.raises(ConfigError, match="built-in"):
        save_user_preset(FACE, cfg, folder)
    assert not list(folder.glob(".*.tmp"))


def test_broken_user_preset_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[preset]\nname = "Bad"\n[network]\nnetwork_dimm = 4\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="network_dimm"):
        load_preset("Bad", user_folder=tmp_path)
