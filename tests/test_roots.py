"""Paths a served page may name: only under the roots given at start, symlinks and ``..`` followed, and the
refusal the same whether or not the path exists."""

from __future__ import annotations

import os

import pytest

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.roots import Roots, is_inside


@pytest.fixture
def roots(tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd15.safetensors").write_bytes(b"x")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("k")
    return Roots.from_start([str(tmp_path / "data")], [str(tmp_path / "models")], TrainConfig())


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_paths_under_the_roots_pass(roots, tmp_path):
    roots.check(_cfg(train_data_dir=str(tmp_path / "data" / "img"), pretrained_model=str(tmp_path / "models" / "sd15.safetensors")))
    roots.check(_cfg(pretrained_model="builtin:tiny-sd15", logging_dir=str(tmp_path / "data" / "tb")))


@pytest.mark.parametrize(
    "field,value",
    [
        ("train_data_dir", "/etc"),
        ("train_data_dir", "{tmp}/data/../secret"),
        ("pretrained_model", "/etc/shadow"),
        ("pretrained_model", "{tmp}/models/../secret/key"),
        ("model_config_dir", "{tmp}/secret"),
        ("logging_dir", "{tmp}/secret/tb"),
        ("pretrained_model", "{tmp}/models-evil/sd.safetensors"),  # a prefix of the root is not inside it
    ],
)
def test_paths_outside_are_refused_by_name(roots, tmp_path, field, value):
    with pytest.raises(ConfigError) as e:
        roots.check(_cfg(**{field: value.format(tmp=tmp_path)}))
    assert e.value.field == field and "--" in str(e.value) and "-root" in str(e.value)


def test_a_symlink_inside_a_root_does_not_escape_it(roots, tmp_path):
    os.symlink(tmp_path / "secret", tmp_path / "data" / "link")
    with pytest.raises(ConfigError):
        roots.check(_cfg(train_data_dir=str(tmp_path / "data" / "link")))
    assert not is_inside(tmp_path / "data" / "link" / "key", tmp_path / "data")


def test_the_refusal_says_nothing_about_existence(roots, tmp_path):
    messages = []
    for value in (str(tmp_path / "secret" / "key"), str(tmp_path / "secret" / "nothing-here")):
        with pytest.raises(ConfigError) as e:
            roots.check(_cfg(pretrained_model=value))
        messages.append((e.value.field, e.value.allowed))
    assert messages[0] == messages[1]


def test_the_start_configs_own_paths_are_roots(tmp_path):
    cfg = TrainConfig(train_data_dir=str(tmp_path / "img"), pretrained_model=str(tmp_path / "m" / "a.safetensors"))
    roots = Roots.from_start([], [], cfg)
    roots.check(cfg)
    with pytest.raises(ConfigError):
        roots.check(TrainConfig(train_data_dir=str(tmp_path)))
