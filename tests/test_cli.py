"""The command line: ``config``, ``train`` (options, errors, the real run), ``inspect`` and ``demo``.

Error paths run as real processes (exit code, stderr, no traceback); the rest in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from lora_trainer.cli import main
from lora_trainer.config import OUTPUT_NAME_EXTRA_BYTES, TrainConfig
from lora_trainer.filenames import MAX_COMPONENT_BYTES

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "lora_trainer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_config_prints_toml_that_loads_back(tmp_path):
    proc = _cli("config", "--set", "network_dim=48", "--set", "optimizer=Lion", "--set", "output_name=my lora")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "c.toml"
    path.write_text(proc.stdout, encoding="utf-8")
    cfg = TrainConfig.load(path)
    assert cfg == TrainConfig(network_dim=48, optimizer="Lion", output_name="my lora")


def test_config_json_and_config_file(tmp_path, capsys):
    src = tmp_path / "in.toml"
    TrainConfig(resolution=640, seed=5).save(src)
    assert main(["config", "--config", str(src), "--json", "--set", "seed=6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert TrainConfig.from_dict(data) == TrainConfig(resolution=640, seed=6)


def test_print_config_applies_set_and_shortcuts(tmp_path, capsys):
    assert main(["train", "--print-config", "--set", "network_dim=64", "--data", str(tmp_path), "--name", "abc"]) == 0
    out = capsys.readouterr().out
    assert "network_dim = 64\n" in out
    (tmp_path / "p.toml").write_text(out, encoding="utf-8")
    cfg = TrainConfig.load(tmp_path / "p.toml")
    assert (cfg.network_dim, cfg.train_data_dir, cfg.output_name) == (64, str(tmp_path), "abc")


def test_bad_value_exits_2_with_one_line_error():
    proc = _cli("train", "--set", "network_dim=0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: Invalid value for 'network_dim': 0. Allowed: ")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_unknown_option_exits_2_with_hint(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[network]\nnetwork_dimm = 4\n", encoding="utf-8")
    proc = _cli("train", "--config", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "network_dimm" in proc.stderr and "did you mean network_dim?" in proc.stderr


def test_missing_dataset_folder_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no such folder"
    # the dataset is checked before the (slow) model load: a model that does not exist is not reached
    proc = _cli("train", "--data", str(missing), "--model", str(tmp_path / "model.safetensors"), "--device", "cpu")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(missing) in lines[0] and "does not exist" in lines[0]


OVERSIZED = [
    ("resolution=100000", "'resolution': 100000", "<= 4096"),
    ("train_batch_size=100000", "'train_batch_size'", "<= 256"),
    ("network_dim=100000", "'network_dim'", "<= 1024"),
    ("max_train_steps=1000000000", "'max_train_steps'", "<= 1000000"),
    ("output_name=" + "n" * 300, "'output_name'", f"at most {MAX_COMPONENT_BYTES - OUTPUT_NAME_EXTRA_BYTES} bytes"),
    ("output_name=con", "'output_name'", "Windows device name"),
    ("output_name=lora.", "'output_name'", "end with a dot"),
    # preflight: checked against the optimizer's signature, still before the model loads
    ("optimizer_args=foo=bar", "'optimizer_args': 'foo'", "weight_decay"),
]


@pytest.mark.parametrize("pair, names, allowed", OVERSIZED, ids=[p[:40] for p, _, _ in OVERSIZED])
def test_oversized_values_and_bad_names_exit_2_before_the_model_loads(demo_data, tmp_path, pair, names, allowed):
    out = tmp_path / "Lora"
    # a model that does not exist: reaching the model load would fail with another message
    proc = _cli(
        "train", "--data", str(demo_data), "--model", str(tmp_path / "model.safetensors"), "--output", str(out),
        "--device", "cpu", "--set", pair,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Invalid value for "), proc.stderr
    assert names in lines[0] and allowed in lines[0] and len(lines[0]) < 600
    assert not list(demo_data.rglob("*.npz"))


def test_latent_cache_that_cannot_fit_is_refused_before_the_model_loads(demo_data, tmp_path, monkeypatch, capsys):
    from lora_trainer.train import cache

    out = tmp_path / "Lora"
    args = ["train", "--data", str(demo_data), "--model", str(tmp_path / "model.safetensors"), "--output", str(out),
            "--device", "cpu", "--set", "resolution=2048"]  # fmt: skip
    # 4 images x 4 x 256 x 256 floats = 4 MiB; the machine "has" 3 MiB
    monkeypatch.setattr(cache, "available_memory", lambda: 3 * 2**20)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "4 images at resolution 2048" in err and "4.0 MiB of RAM" in err and "3.0 MiB is available" in err
    assert "Lower resolution" in err and "cache_latents" in err and "\n" not in err
    assert not out.exists()  # refused before the output folder is even probed
    # without the cache nothing is held: the check passes and the (missing) model is reached
    assert main([*args, "--set", "cache_latents=false"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    # to disk: the free space of the dataset's disk counts too
    monkeypatch.setattr(cache, "available_memory", lambda: 2**40)
    monkeypatch.setattr(cache, "free_disk", lambda path: 2**20)
    assert main([*args, "--set", "cache_latents_to_disk=true"]) == 2
    err = capsys.readouterr().err
    assert ".npz files" in err and str(demo_data) in err and "1.0 MiB free" in err
    assert not list(demo_data.rglob("*.npz"))


def test_available_memory_is_read_from_the_system():
    from lora_trainer.train.cache import available_memory

    free = available_memory()
    assert free is None or 2**20 < free < 2**50


def test_train_through_the_cli_then_inspect(tiny_sd, demo_data, tmp_path, capsys):
    from lora_trainer.model.tiny import save_diffusers_folder

    model = save_diffusers_folder(tiny_sd, tmp_path / "tiny-model")
    out = tmp_path / "Lora"
    args = [
        "train", "--model", str(model), "--data", str(demo_data), "--output", str(out), "--name", "cli",
        "--device", "cpu", "--quiet",
        "--set", "resolution=64", "--set", "network_dim=4", "--set", "max_train_steps=3", "--set", "lr_scheduler=constant",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "<lora:cli:1>" in printed and "finished after 3 steps" in printed
    path = out / "cli.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [".lora_trainer_state", "cli.safetensors"]  # + its training state

    # the same name again: refused (files are never overwritten), exit 2
    assert main(args) == 2
    assert "cli.safetensors exists" in capsys.readouterr().err

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    modules = {k.split(".")[0] for k in keys}
    n_unet = sum(m.startswith("lora_unet_") for m in modules)
    n_te = sum(m.startswith("lora_te_") for m in modules)
    assert n_unet and n_te
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == f"{path}: {len(keys)} tensors, {len(modules)} modules"
    assert f"  lora_unet_*: {n_unet}" in shown and f"  lora_te_*: {n_te}" in shown

    # --resume: a changed run is refused with what differs (before the model loads), more steps continue it
    assert main([*args, "--resume", "--set", "network_dim=8"]) == 2
    assert "network_dim: 4 in the saved run, 8 now" in capsys.readouterr().err
    assert main([*args, "--resume", "--set", "max_train_steps=5"]) == 0
    assert "finished after 5 steps" in capsys.readouterr().out
    assert "  ss_output_name = cli" in shown and "  ss_steps = 3" in shown
    assert "  ss_network_dim = 4" in shown
    long_keys = [k for k, v in meta.items() if len(v) > 120]
    assert long_keys, "expected at least one long metadata value (hashes, tag frequency)"
    for k in long_keys:
        line = next(s for s in shown if s.startswith(f"  {k} = "))
        assert line.endswith("...") and len(line) < len(k) + 130
    assert main(["inspect", "--full", str(path)]) == 0
    full = capsys.readouterr().out.splitlines()
    assert all(f"  {k} = {meta[k]}" in full for k in long_keys)


def test_inspect_missing_or_broken_file_is_an_error_not_a_traceback(tmp_path):
    proc = _cli("inspect", str(tmp_path / "nope.safetensors"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and "nope.safetensors" in proc.stderr
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    proc = _cli("inspect", str(broken))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and "broken.safetensors" in proc.stderr


@pytest.mark.slow
def test_demo_creates_epoch_files_and_prints_tags(tmp_path):
    proc = _cli("demo", "--epochs", "1", "--out", str(tmp_path), "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list(tmp_path.glob("run-*"))
    assert len(runs) == 1
    lora_dir = runs[0] / "models" / "Lora"
    files = sorted(p.name for p in lora_dir.glob("*.safetensors"))  # and the hidden training state
    assert files == ["demo_ohwx.safetensors"]
    for name in files:
        assert f"<lora:{Path(name).stem}:1>" in proc.stdout
    cfg = TrainConfig.load(runs[0] / "config.toml")
    assert cfg.max_train_epochs == 1 and Path(cfg.output_dir) == lora_dir
    with safe_open(lora_dir / files[0], "pt") as f:
        assert f.metadata()["ss_epoch"] == "1"


def test_train_in_a_fresh_process_with_scikit_learn_installed(tiny_sd, demo_data, tmp_path):
    """transformers imports scikit-learn (and through it scipy) when they are installed, as on most ML
    machines: a fresh ``lora_trainer train`` must import diffusers and transformers as they are. It once hid
    scipy from the import system to start faster, and died before the first step on such a machine."""
    pytest.importorskip("sklearn")
    pytest.importorskip("scipy.sparse")
    from lora_trainer.model.tiny import save_diffusers_folder

    model = save_diffusers_folder(tiny_sd, tmp_path / "tiny-model")
    out = tmp_path / "Lora"
    proc = _cli(
        "train", "--model", str(model), "--data", str(demo_data), "--output", str(out), "--name", "fresh",
        "--device", "cpu", "--quiet", "--set", "resolution=64", "--set", "network_dim=4", "--set", "max_train_steps=1",
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "fresh.safetensors").is_file()
