"""The background job: the caller's thread never blocks, progress arrives, stop and stop-and-save work."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lora_trainer.errors import ConfigError
from lora_trainer.hosts.standalone import StandaloneHost
from lora_trainer.job import DONE, FAILED, STOPPED, JobBusy, TrainingJob


def _wait_for(cond, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_job_runs_in_background_and_reports(tiny_sd, tiny_config):
    host = StandaloneHost(tiny_sd)
    job = TrainingJob(host.run)
    t0 = time.time()
    job.start(tiny_config)
    assert time.time() - t0 < 1.0, "start() must return at once"
    assert threading.current_thread() is threading.main_thread()
    assert _wait_for(lambda: job.status().step > 0)
    mid = job.status()
    assert mid.running and mid.total_steps == 16 and mid.loss is not None
    final = job.wait(120)
    assert final.state == DONE and final.step == final.total_steps == 16
    assert [f.name for f in final.files] == ["t-000001", "t"]
    assert final.files[0].tag(0.8) == "<lora:t-000001:0.8>"
    assert len(final.loss_history) == 16 and len(final.epoch_losses) == 2
    assert final.elapsed > 0 and final.eta == 0.0  # a finished job still shows how long it took
    d = final.as_dict()
    assert d["files"][1]["tag"] == "<lora:t:1>" and d["progress"] == 1.0


def test_one_job_at_a_time_and_bad_config_fails_fast(tiny_sd, tiny_config):
    job = TrainingJob(StandaloneHost(tiny_sd).run)
    tiny_config.max_train_epochs = 20
    job.start(tiny_config)
    with pytest.raises(JobBusy):
        job.start(tiny_config)
    assert job.stop() is True
    assert job.wait(120).state == STOPPED
    bad = tiny_config.with_overrides(["output_name=x"])
    bad.network_dim = 0
    with pytest.raises(ConfigError, match="network_dim"):
        job.start(bad)


def test_stop_discards_unfinished_epoch_and_stop_and_save_writes(tiny_sd, tiny_config):
    tiny_config.max_train_epochs = 50
    job = TrainingJob(StandaloneHost(tiny_sd).run)
    job.start(tiny_config)
    assert _wait_for(lambda: job.status().epoch >= 2)
    job.stop()
    s = job.wait(120)
    assert s.state == STOPPED
    names = sorted(p.name for p in Path(tiny_config.output_dir).glob("*.safetensors"))
    assert "t.safetensors" not in names and all(n.startswith("t-0000") for n in names)

    cfg2 = tiny_config.with_overrides(["output_name=saved"])
    job.start(cfg2)
    assert _wait_for(lambda: job.status().step >= 3)
    job.stop(save=True)
    s = job.wait(120)
    assert s.state == STOPPED and any(f.final and f.name == "saved" for f in s.files)
    assert (Path(cfg2.output_dir) / "saved.safetensors").is_file()


def test_failure_is_reported_not_raised(tiny_sd, tiny_config, tmp_path):
    tiny_config.train_data_dir = str(tmp_path / "missing")
    job = TrainingJob(StandaloneHost(tiny_sd).run)
    job.start(tiny_config)
    s = job.wait(60)
    assert s.state == FAILED and "missing" in s.error
    assert any(m.startswith("error:") for m in s.messages)


def test_grid_is_built_automatically_after_training(tiny_sd, tiny_config):
    from PIL import Image

    from lora_trainer.grid import cell_origin, cell_tag_from_png, read_grid_parameters

    cfg = tiny_config.with_overrides(["grid_after_training=true", "grid_weights=0, 1", "grid_steps=3"])
    job = TrainingJob(StandaloneHost(tiny_sd).run)
    grid_states = []
    job.start(cfg)
    while job.running:
        st = job.status()
        if st.state == "building grid":
            grid_states.append((st.grid_done, st.grid_total))
        time.sleep(0.01)
    s = job.wait(120)
    assert s.state == DONE and s.grid_path and s.grid_total == 4  # 2 epochs x 2 weights
    assert Path(s.grid_path).parent == Path(cfg.output_dir)
    with Image.open(s.grid_path) as im:
        assert "lora_trainer_grid" in im.text
    params = read_grid_parameters(s.grid_path)
    x, y = cell_origin(params, row=1, col=1)
    assert cell_tag_from_png(s.grid_path, x + 3, y + 3) == "<lora:t:1>"
    x, y = cell_origin(params, row=0, col=0)
    assert cell_tag_from_png(s.grid_path, x + 3, y + 3) == "<lora:t-000001:0>"
    assert cell_tag_from_png(s.grid_path, 1, 1) is None


def test_running_until_the_host_has_finished(tiny_sd, tiny_config):
    """Status must not say 'not running' while the host still holds the model (grid, release):
    a client that sees running=False may start the next job at once."""
    release = threading.Event()
    host = StandaloneHost(tiny_sd)

    def run(cfg, events, stop):
        host.run(cfg, events, stop)
        release.wait(30)  # the host is still busy after the loop's TrainingFinished

    job = TrainingJob(run)
    tiny_config.max_train_epochs = 1
    job.start(tiny_config)
    assert _wait_for(lambda: job.status().state == "finishing")
    s = job.status()
    assert s.running and s.as_dict()["running"] is True
    with pytest.raises(JobBusy):
        job.start(tiny_config)
    release.set()
    assert job.wait(60).state == DONE and not job.status().running
