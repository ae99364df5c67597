from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def _tiny_sd_master(tmp_path_factory):
    from lora_trainer.model.tiny import build_tiny_sd

    return build_tiny_sd(seed=0, tokenizer_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture
def tiny_sd(_tiny_sd_master):
    """A fresh copy of the tiny SD1.5-architecture model (tests may modify it)."""
    return copy.deepcopy(_tiny_sd_master)


@pytest.fixture
def demo_data(tmp_path) -> Path:
    from lora_trainer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path / "data", images=4, size=64, repeats=2)


@pytest.fixture
def tiny_config(demo_data, tmp_path):
    from lora_trainer.config import TrainConfig

    return TrainConfig(
        train_data_dir=str(demo_data),
        output_dir=str(tmp_path / "Lora"),
        output_name="t",
        resolution=64,
        network_dim=4,
        network_alpha=2.0,
        max_train_epochs=2,
        unet_lr=1e-3,
        text_encoder_lr=1e-3,
        lr_scheduler="constant",
        seed=1,
        grid_after_training=False,  # the grid has its own tests
        validation_loss=False,  # so has the validation loss (it adds forward passes that spies would count)
    )
