"""Resume: a run that crashed or was stopped, then resumed, writes the same LoRA tensors, bit for bit,
as the same run never interrupted (shuffled captions, buckets and the validation loss on)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.errors import ConfigError
from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.train.events import EventBus, StepEvent, StopControl
from lora_trainer.train.loop import preflight, train
from lora_trainer.train.state import STATE_FOLDER, find_state, list_states, state_folder


class Crash(Exception):
    """Stands for a kill: nothing after it runs, no file is written."""


@pytest.fixture
def run_cfg(tiny_config):
    cfg = tiny_config
    cfg.max_train_epochs = 3
    cfg.shuffle_caption = True
    cfg.keep_tokens = 1
    cfg.caption_tag_dropout_rate = 0.1
    cfg.validation_loss = True
    cfg.enable_bucket = True
    cfg.min_bucket_reso = 32
    cfg.max_bucket_reso = 128
    cfg.bucket_reso_steps = 32
    cfg.noise_offset = 0.05
    cfg.lr_scheduler = "cosine"
    cfg.save_precision = "float"  # the trained float32 weights as they are: any drift shows
    return cfg


def _crash_at_step(bundle, n: int):
    """Make the n-th training forward pass (with grad; validation runs without) raise."""
    orig, calls = bundle.predict, [0]

    def predict(x, t, c):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == n:
                raise Crash(f"killed at forward pass {n}")
        return orig(x, t, c)

    bundle.predict = predict
    return bundle


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(Path(folder).glob("*.safetensors"))}


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}: {k} differs"


@pytest.fixture
def reference(run_cfg, tiny_sd, tmp_path):
    """The run never interrupted: its files and validation losses."""
    cfg = copy.deepcopy(run_cfg)
    cfg.output_dir = str(tmp_path / "reference")
    result = train(cfg, make_sd_bundle(copy.deepcopy(tiny_sd)))
    assert not result.stopped and result.epochs_done == 3
    return _tensors(cfg.output_dir), result


def _resume(cfg, tiny_sd, spec=True):
    state = find_state(cfg, spec)
    scan = preflight(cfg, resume=state)  # the run's own epoch files are expected, not a clash
    return train(cfg, make_sd_bundle(copy.deepcopy(tiny_sd)), scan=scan, resume=state)


def test_crash_mid_epoch_then_resume_is_bit_identical(run_cfg, tiny_sd, reference, tmp_path):
    ref_files, ref = reference
    per_epoch = len(ref.losses) // 3
    assert per_epoch >= 3
    with pytest.raises(Crash):
        train(run_cfg, _crash_at_step(make_sd_bundle(copy.deepcopy(tiny_sd)), per_epoch + 2))
    assert sorted(_tensors(run_cfg.output_dir)) == ["t-000001.safetensors"]
    with pytest.raises(ConfigError, match="a name not used yet"):
        preflight(run_cfg)  # without --resume the name is still taken
    result = _resume(run_cfg, tiny_sd)
    _assert_bit_identical(_tensors(run_cfg.output_dir), ref_files)
    assert result.validation_losses == ref.validation_losses and result.losses == ref.losses


def test_crash_right_after_a_save_then_resume_is_bit_identical(run_cfg, tiny_sd, reference, tmp_path):
    ref_files, ref = reference

    def crash_after_epoch_2(path, network):
        if path.name == "t-000002.safetensors":
            raise Crash("killed right after the save")

    with pytest.raises(Crash):
        train(run_cfg, make_sd_bundle(copy.deepcopy(tiny_sd)), after_save=crash_after_epoch_2)
    result = _resume(run_cfg, tiny_sd)
    assert [p.name for p in result.files] == ["t.safetensors"]
    _assert_bit_identical(_tensors(run_cfg.output_dir), ref_files)
    assert result.losses == ref.losses


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stop_and_save_then_resume_is_bit_identical(run_cfg, tiny_sd, tmp_path, accumulation):
    """Stop and save in the middle of epoch 2 (with accumulation 2: in the middle of a step, whose
    partial gradients are dropped and trained again on resume)."""
    run_cfg.gradient_accumulation_steps = accumulation
    ref_cfg = copy.deepcopy(run_cfg)
    ref_cfg.output_dir = str(tmp_path / "reference")
    ref = train(ref_cfg, make_sd_bundle(copy.deepcopy(tiny_sd)))
    per_epoch = len(ref.losses) // 3

    stop = StopControl()
    bus = EventBus(lambda ev: isinstance(ev, StepEvent) and ev.step == per_epoch + 1 and stop.stop(save=True))
    if accumulation == 2:  # ask for the stop after the first batch of the next step
        orig, calls = None, [0]
        bundle = make_sd_bundle(copy.deepcopy(tiny_sd))
        orig = bundle.predict

        def predict(x, t, c):
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == 2 * (per_epoch + 1) + 1:
                    stop.stop(save=True)
            return orig(x, t, c)

        bundle.predict = predict
        bus = EventBus()
    else:
        bundle = make_sd_bundle(copy.deepcopy(tiny_sd))
    stopped = train(run_cfg, bundle, bus, stop=stop)
    assert stopped.stopped and stopped.steps == per_epoch + 1
    assert "t.safetensors" in _tensors(run_cfg.output_dir)  # the Stop-and-save file, replaced by the resumed run
    result = _resume(run_cfg, tiny_sd)
    assert not result.stopped and result.losses == ref.losses
    _assert_bit_identical(_tensors(run_cfg.output_dir), _tensors(ref_cfg.output_dir))


def test_a_resume_that_changes_the_run_is_refused_before_loading(run_cfg, tiny_sd):
    run_cfg.max_train_epochs = 1
    train(run_cfg, make_sd_bundle(copy.deepcopy(tiny_sd)))
    state = find_state(run_cfg, True)
    changed = copy.deepcopy(run_cfg)
    changed.network_dim = 8
    changed.optimizer = "Adafactor"  # transformers ships it: no optional package needed
    with pytest.raises(ConfigError) as e:
        preflight(changed, resume=state)
    assert "network_dim: 4 in the saved run, 8 now" in str(e.value) and "optimizer" in str(e.value)
    with pytest.raises(ConfigError, match="resuming several processes is not supported") as e:
        preflight(run_cfg, resume=state, world_size=2)  # each process's random state is not saved
    assert e.value.field == "resume"
    caption = next(Path(run_cfg.train_data_dir).rglob("*.txt"))
    caption.write_text(caption.read_text() + ", extra")
    with pytest.raises(ConfigError, match="the dataset"):
        preflight(run_cfg, resume=state)
    caption.write_text(caption.read_text().removesuffix(", extra"))
    more = copy.deepcopy(run_cfg)
    more.max_train_epochs = 2  # more epochs: allowed, and the existing files are the run's own
    result = train(more, make_sd_bundle(copy.deepcopy(tiny_sd)), scan=preflight(more, resume=state), resume=state)
    assert result.epochs_done == 2 and [p.name for p in result.files] == ["t.safetensors"]


def test_states_kept_hidden_from_hosts_and_pruned(run_cfg, tiny_sd):
    run_cfg.validation_loss = False
    run_cfg.save_last_n_states = 2
    train(run_cfg, make_sd_bundle(copy.deepcopy(tiny_sd)))
    folder = state_folder(run_cfg)
    assert folder.parent.name == STATE_FOLDER
    names = sorted(p.name for p in folder.iterdir())
    assert len(list_states(run_cfg)) == 2 and len(names) == 4
    # what A1111/Forge list as LoRAs: *.safetensors / *.pt / *.ckpt anywhere under the folder
    listed = [p for ext in ("safetensors", "pt", "ckpt") for p in Path(run_cfg.output_dir).rglob(f"*.{ext}")]
    assert all(STATE_FOLDER not in p.parts for p in listed)
    info = json.loads(list_states(run_cfg)[-1].read_text())
    assert info["epoch"] == 4 and info["position"] == 0
    size = sum(p.stat().st_size for p in folder.glob("*.state")) // 2
    print(f"\nstate size of the tiny model: {size} bytes")


def test_save_state_off_writes_no_state(run_cfg, tiny_sd):
    run_cfg.save_state = False
    run_cfg.max_train_epochs = 1
    run_cfg.validation_loss = False
    train(run_cfg, make_sd_bundle(copy.deepcopy(tiny_sd)))
    assert not state_folder(run_cfg).exists()
    with pytest.raises(ConfigError, match="none in"):
        find_state(run_cfg, True)


def test_a_host_job_resumes_from_the_config_field(run_cfg, tiny_sd):
    """What REST ``{"resume": true}`` and the tab do: the host's job gets the config only."""
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.job import TrainingJob

    run_cfg.max_train_epochs = 1
    run_cfg.validation_loss = False
    job = TrainingJob(StandaloneHost(copy.deepcopy(tiny_sd)).run)
    job.start(run_cfg)
    first = job.wait(300)
    assert first.state == "done", first.error
    more = copy.deepcopy(run_cfg)
    more.max_train_epochs = 2
    more.resume = "latest"
    job.start(more)
    s = job.wait(300)
    assert s.state == "done", s.error
    assert s.step == s.total_steps == 2 * first.step


@pytest.mark.slow
def test_a_process_killed_with_sigkill_then_resumed_from_the_cli_writes_the_same_files(run_cfg, tiny_sd, tmp_path):
    """The real thing: ``lora_trainer train`` killed with SIGKILL at a random moment after its first state
    (mid-epoch, during or right after a save), then ``--resume``: every file equals, bit for bit, that of
    the same command never interrupted."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from lora_trainer.model.tiny import save_diffusers_folder

    model = save_diffusers_folder(tiny_sd, tmp_path / "tiny-model")
    run_cfg.pretrained_model = str(model)
    run_cfg.max_train_epochs = 8
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def command(out: Path, *extra: str) -> list[str]:
        cfg = copy.deepcopy(run_cfg)
        cfg.output_dir = str(out)
        cfg.save(tmp_path / f"{out.name}.toml")
        return [sys.executable, "-m", "lora_trainer", "train", "--config", str(tmp_path / f"{out.name}.toml"),
                "--device", "cpu", "--quiet", *extra]  # fmt: skip

    whole = subprocess.run(command(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # after a random epoch's file, a random moment later: in a step, a save or a validation, at least 3
    # epochs before the end whatever the machine's speed. A state must exist by then (the first one comes
    # right after the first epoch's file; a kill before it leaves nothing to resume)
    epoch_file = out / f"{run_cfg.output_name}-{random.randint(1, 5):06d}.safetensors"
    states = out / STATE_FOLDER / run_cfg.output_name
    deadline = time.time() + 300
    while not (epoch_file.exists() and list(states.glob("*.json"))) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert not (out / f"{run_cfg.output_name}.safetensors").exists(), "killed too late: the run had finished"

    resumed = subprocess.run(command(out, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_bit_identical(_tensors(tmp_path / "whole"), _tensors(out))
