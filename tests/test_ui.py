"""The training tab under the installed gradio (CI runs this under 3.41.2 and 4.40.0)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from lora_trainer.config import TrainConfig  # noqa: E402
from lora_trainer.hosts.standalone import StandaloneHost, standalone_backend  # noqa: E402
from lora_trainer.ui.tab import build_tab, config_from_values, form_fields  # noqa: E402


def _values(tab, cfg: TrainConfig):
    return [getattr(cfg, c.elem_id.removeprefix("lora_trainer_")) for c in tab.lora_trainer_inputs]


def test_tab_builds_from_config_fields(tiny_sd, tiny_config):
    backend = standalone_backend(StandaloneHost(tiny_sd), tiny_config)
    tab = build_tab(backend)
    ids = [c.elem_id for c in tab.lora_trainer_inputs]
    assert ids == [f"lora_trainer_{f.name}" for f in form_fields(backend)]
    # choices come from the config, so the form cannot offer a value validation refuses
    opt = next(c for c in tab.lora_trainer_inputs if c.elem_id == "lora_trainer_optimizer")
    choices = [c[0] if isinstance(c, (tuple, list)) else c for c in opt.choices]
    assert "AdamW8bit" in choices and "Prodigy" in choices
    assert config_from_values(backend, _values(tab, tiny_config)) == tiny_config


def test_tab_trains_and_shows_progress_and_files(tiny_sd, tiny_config):
    backend = standalone_backend(StandaloneHost(tiny_sd), tiny_config)
    tab = build_tab(backend)
    h = tab.lora_trainer_handlers
    assert "started" in h["start"](*_values(tab, tiny_config))
    status_html, _fig, files_html, _log, _grid, _files = h["refresh"]()
    assert "lora_trainer_status_box" in status_html
    backend.extra["job"].wait(120)
    status_html, fig, files_html, log, _grid, _files = h["refresh"]()
    assert 'data-state="done"' in status_html and "16 / 16" in status_html
    assert "&lt;lora:t-000001:1&gt;" in files_html and "&lt;lora:t:1&gt;" in files_html
    assert "loraTrainerSendToTxt2img" in files_html
    assert fig is not None and "epoch 2 done" in log


def test_tab_shows_config_errors_without_starting(tiny_sd, tiny_config):
    backend = standalone_backend(StandaloneHost(tiny_sd), tiny_config)
    tab = build_tab(backend)
    values = _values(tab, tiny_config)
    i = [c.elem_id for c in tab.lora_trainer_inputs].index("lora_trainer_network_dim")
    values[i] = 0
    msg = tab.lora_trainer_handlers["start"](*values)
    assert "network_dim" in msg and "lora_trainer_error" in msg
    time.sleep(0.2)
    assert backend.status().state == "idle"
    assert "Nothing is running" in tab.lora_trainer_handlers["stop"]()


def test_tab_shows_the_grid_and_the_clicked_cell_tag(tiny_sd, tiny_config):
    from lora_trainer.grid import cell_origin, read_grid_parameters

    cfg = tiny_config.with_overrides(["grid_after_training=true", "grid_weights=0, 0.8", "grid_steps=2"])
    backend = standalone_backend(StandaloneHost(tiny_sd), cfg)
    tab = build_tab(backend)
    h = tab.lora_trainer_handlers
    h["start"](*_values(tab, cfg))
    s = backend.extra["job"].wait(120)
    assert s.grid_path
    *_, grid, _files = h["refresh"]()
    assert grid == s.grid_path

    class Evt:  # what gradio passes to a select handler
        index = None

    x, y = cell_origin(read_grid_parameters(s.grid_path), row=1, col=1)
    evt = Evt()
    evt.index = [x + 1, y + 1]
    assert h["grid_select"](evt) == "<lora:t:0.8>"
    evt.index = [1, 1]
    assert h["grid_select"](evt) == ""


def test_build_grid_button_makes_a_grid_of_the_chosen_files(tiny_sd, tiny_config):
    from PIL import Image

    from lora_trainer.grid import read_grid_parameters

    cfg = tiny_config.with_overrides(["grid_after_training=false", "grid_weights=0, 1", "grid_steps=2"])
    backend = standalone_backend(StandaloneHost(tiny_sd), cfg)
    tab = build_tab(backend)
    h = tab.lora_trainer_handlers
    values = _values(tab, cfg)
    # nothing chosen yet: a message, no job
    assert "Choose saved LoRA files" in h["build_grid"]([], *values)
    h["start"](*values)
    s = backend.extra["job"].wait(120)
    assert s.state == "done" and s.grid_path is None
    # the list follows the run: both files listed (oldest first) and chosen
    *_, files_update = h["refresh"]()
    assert files_update["choices"] == ["t-000001.safetensors", "t.safetensors"]
    assert files_update["value"] == ["t-000001.safetensors", "t.safetensors"]
    listed = h["grid_list"]([], *values)
    assert listed["choices"] == files_update["choices"] and listed["value"] == []

    assert "Building a grid of 1 files" in h["build_grid"](["t-000001.safetensors"], *values)
    s = backend.extra["job"].wait(120)
    assert s.state == "done", s.error
    params = read_grid_parameters(s.grid_path)
    assert [c["epoch"] for c in params["columns"]] == [1] and params["weights"] == [0.0, 1.0]
    with Image.open(s.grid_path) as im:
        assert im.width > 64 and im.height > 2 * 64  # one column, two rows of 64 px cells, plus labels
    *_, grid, _files = h["refresh"]()
    assert grid == s.grid_path

    # a second grid never replaces the first
    first = s.grid_path
    h["build_grid"](["t-000001.safetensors", "t.safetensors"], *values)
    s = backend.extra["job"].wait(120)
    assert s.grid_path != first and Path(first).is_file() and Path(s.grid_path).is_file()
    assert len(read_grid_parameters(s.grid_path)["columns"]) == 2

    # a file that went away: the error names it, no job runs
    Path(s.grid_path).unlink()
    (Path(cfg.output_dir) / "t.safetensors").unlink()
    msg = h["build_grid"](["t.safetensors"], *values)
    assert "lora_trainer_error" in msg and "t.safetensors" in msg and "Refresh" in msg
    assert backend.status().state == "done"
