"""Loading SD1.5-architecture models offline: diffusers folders and A1111-layout single files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_trainer.errors import ModelLoadError
from lora_trainer.model.ldm_names import to_a1111_checkpoint
from lora_trainer.model.loading import file_sha256, load_sd
from lora_trainer.model.tiny import save_diffusers_folder


@pytest.fixture
def saved(tiny_sd, tmp_path):
    folder = save_diffusers_folder(tiny_sd, tmp_path / "tiny-sd15")
    ckpt = to_a1111_checkpoint(
        tiny_sd.unet.state_dict(),
        tiny_sd.vae.state_dict(),
        tiny_sd.text_encoder.state_dict(),
        dict(tiny_sd.unet.config),
        dict(tiny_sd.vae.config),
    )
    single = tmp_path / "models" / "tiny.safetensors"
    single.parent.mkdir()
    save_file({k: v.contiguous() for k, v in ckpt.items()}, single)
    return tiny_sd, folder, single


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if "position_ids" not in k]
    return all(torch.equal(sa[k], sb[k]) for k in keys)


def test_diffusers_folder_loads(saved):
    ref, folder, _ = saved
    parts = load_sd(folder)
    assert parts.family == "sd1"
    assert _same_weights(parts.unet, ref.unet)
    assert _same_weights(parts.vae, ref.vae)
    assert _same_weights(parts.text_encoder, ref.text_encoder)
    assert parts.tokenizer("ohwx ring").input_ids == ref.tokenizer("ohwx ring").input_ids
    assert parts.scheduler_config["beta_schedule"] == "scaled_linear"


def test_single_file_loads_with_config_dir(saved):
    ref, folder, single = saved
    parts = load_sd(single, config_dir=folder)
    assert _same_weights(parts.unet, ref.unet)
    assert _same_weights(parts.vae, ref.vae)
    assert _same_weights(parts.text_encoder, ref.text_encoder)
    assert parts.sha256 == file_sha256(single)
    assert parts.name == "tiny"


def test_single_file_finds_sibling_config_folder(saved, tmp_path):
    import shutil

    ref, folder, single = saved
    shutil.copytree(folder, single.with_suffix(""))  # models/tiny/ beside models/tiny.safetensors
    parts = load_sd(single)
    assert _same_weights(parts.unet, ref.unet)


def test_training_from_single_file_records_the_model(saved, tiny_config):
    import json

    from safetensors import safe_open

    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.train.loop import train
    from lora_trainer.train.runtime import Runtime

    _, folder, single = saved
    cfg = tiny_config.with_overrides([f"pretrained_model={single}", f"model_config_dir={folder}", "max_train_epochs=1"])
    bundle = StandaloneHost().model_bundle(cfg, Runtime(torch.device("cpu")))
    result = train(cfg, bundle)
    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    assert meta["ss_sd_model_name"] == "tiny"
    assert meta["ss_new_sd_model_hash"] == file_sha256(single)
    assert json.loads(meta["ss_network_args"]) == {}


def _touch(path):
    path.write_bytes(b"x")
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "nope.safetensors", "not found"),
        (lambda p: _touch(p / "model.bin"), "unsupported model file type"),
        (lambda p: (p / "half").mkdir() or p / "half", "not a complete diffusers SD folder"),
    ],
)
def test_bad_model_paths_say_what_to_do(tmp_path, make, match):
    with pytest.raises(ModelLoadError, match=match):
        load_sd(make(tmp_path))


def test_single_file_without_configs_says_what_to_pass(saved, tmp_path, monkeypatch):
    _, _, single = saved
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(ModelLoadError, match="model_config_dir"):
        load_sd(single)
