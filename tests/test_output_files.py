"""Nothing lost or replaced: saves never replace another run's file, a killed save leaves no
half file and its temp file is removed at the next start, files get the folder's usual mode, and
an unwritable or full folder is one line naming the folder and what to do."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.errors import ConfigError
from lora_trainer.files import TEMP_SUFFIX, remove_stale_temp_files, write_file
from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.network.save import save_lora_file, serialize_lora
from lora_trainer.train import output
from lora_trainer.train.events import EventBus, Message, StopControl
from lora_trainer.train.loop import preflight, train
from lora_trainer.train.state import STATE_FOLDER  # the resume states live beside the LoRA files

REPO = Path(__file__).resolve().parents[1]


def _tensors(seed: int, n: int = 4096) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_unet_x.lora_down.weight": torch.randn(4, n, generator=g), "lora_unet_x.alpha": torch.tensor(4.0)}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != STATE_FOLDER)


# ------------------------------------------------------------------ exclusive creation


def test_concurrent_saves_of_one_name_one_wins_intact(tmp_path):
    path = tmp_path / "same.safetensors"
    n = 8
    start = threading.Barrier(n)
    outcome: dict[int, str] = {}

    def save(i: int) -> None:
        start.wait()
        try:
            save_lora_file(path, _tensors(i), {"ss_seed": str(i)})
            outcome[i] = "saved"
        except FileExistsError:
            outcome[i] = "exists"

    threads = [threading.Thread(target=save, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcome.items() if o == "saved"]
    assert len(winners) == 1 and len(outcome) == n
    assert path.read_bytes() == serialize_lora(_tensors(winners[0]), {"ss_seed": str(winners[0])})
    assert _hidden(tmp_path) == []  # the losers' temp files are gone


def test_replace_is_explicit(tmp_path):
    path = write_file(tmp_path / "a.bin", b"one")
    with pytest.raises(FileExistsError):
        write_file(path, b"two")
    assert path.read_bytes() == b"one"
    write_file(path, b"three", replace=True)
    assert path.read_bytes() == b"three"


def test_a_file_another_run_wrote_since_preflight_is_kept(tiny_sd, tiny_config):
    """Run B passes preflight, run A then saves the same name: B reports it and keeps A's file."""
    tiny_config.max_train_epochs = 1
    scan_b = preflight(tiny_config)
    a = train(tiny_config, make_sd_bundle(tiny_sd))
    stamp = a.files[-1].read_bytes()
    lines: list[str] = []
    stop = StopControl()

    def on_event(ev) -> None:
        if isinstance(ev, Message) and ev.level == "error":
            lines.append(ev.text)
            stop.stop()  # the user gives the unsaved LoRA up

    b = train(tiny_config, make_sd_bundle(tiny_sd), EventBus(on_event), stop, scan=scan_b)
    assert a.files[-1].read_bytes() == stamp
    assert b.files == [] and b.network is not None
    assert "could not save" in lines[0] and "t.safetensors" in lines[0] and "appeared meanwhile" in lines[0]
    assert all("\n" not in line for line in lines)
    assert _hidden(Path(tiny_config.output_dir)) == []


# ------------------------------------------------------------------ killed saves

_SAVER = """
import sys
from pathlib import Path
from lora_trainer.files import write_file
data = Path(sys.argv[1]).read_bytes()
folder = Path(sys.argv[2])
print("ready", flush=True)
i = 0
while True:
    i += 1
    write_file(folder / f"x-{i:06d}-{sys.argv[3]}.safetensors", data)
"""


def test_killed_saves_leave_complete_files_and_no_temp_after_the_next_start(tmp_path, tiny_config):
    data = serialize_lora(_tensors(0, n=2_000_000), {"ss_seed": "0"})  # 32 MB: most time is spent writing
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    folder = Path(tiny_config.output_dir)
    folder.mkdir(parents=True)
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    temps_seen: set[str] = set()
    for attempt in range(20):
        p = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(src), str(folder), str(attempt)], stdout=subprocess.PIPE, env=env, cwd=REPO
        )
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        temps_seen |= {t.name for t in folder.glob(f".*{TEMP_SUFFIX}")}
    saved = sorted(folder.glob("*.safetensors"))
    for f in saved:
        assert f.read_bytes() == data, f.name  # every visible file is whole
        load_file(f)
    assert temps_seen, "no kill landed in a save: the cleanup below was not tested"
    preflight(tiny_config)  # the next start in that folder
    assert _hidden(folder) == [], f"{len(temps_seen)} temp files seen after kills"


def test_cleanup_removes_only_our_abandoned_temp_files(tmp_path):
    ours = tmp_path / f".a.safetensors.0badc0de{TEMP_SUFFIX}"
    ours.write_bytes(b"half")
    theirs = tmp_path / ".a.safetensors.tmp"  # another program's temp file: not ours to remove
    theirs.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [ours]
    assert theirs.exists() and not ours.exists()


def test_cleanup_leaves_a_temp_file_a_live_save_is_writing(tmp_path, monkeypatch):
    """Two runs in one folder: the second's start must not delete the first's save in progress."""
    import lora_trainer.files as files

    writing, go_on = threading.Event(), threading.Event()
    real = files._write_all

    def slow_write(fd, data):
        writing.set()
        go_on.wait(10)
        real(fd, data)

    monkeypatch.setattr(files, "_write_all", slow_write)
    t = threading.Thread(target=write_file, args=(tmp_path / "a.bin", b"data"))
    t.start()
    assert writing.wait(10)
    assert remove_stale_temp_files(tmp_path) == []
    go_on.set()
    t.join()
    assert (tmp_path / "a.bin").read_bytes() == b"data" and _hidden(tmp_path) == []


# ------------------------------------------------------------------ permissions


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_get_the_folders_usual_mode(tmp_path, umask, mode):
    from PIL import Image

    from lora_trainer.grid import GridSpec, save_grid
    from lora_trainer.train.cache import _write_npz

    old = os.umask(umask)
    try:
        lora = save_lora_file(tmp_path / "a.safetensors", _tensors(0, 8), {})
        grid = save_grid(Image.new("RGB", (8, 8)), tmp_path / "a_grid.png", GridSpec(files=[str(lora)], weights=[1.0], seeds=[1]))
        cache = tmp_path / "img.lora_trainer.npz"
        _write_npz(cache, torch.zeros(4, 2, 2), "key")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (lora, grid, cache)} == {
        p.name: oct(mode) for p in (lora, grid, cache)
    }


# ------------------------------------------------------------------ unwritable or full folder


def test_output_folder_under_a_file_fails_in_preflight(tiny_config, tmp_path):
    (tmp_path / "afile").write_text("x")
    tiny_config.output_dir = str(tmp_path / "afile" / "Lora")
    with pytest.raises(ConfigError) as e:
        preflight(tiny_config)
    msg = str(e.value)
    assert "output_dir" in msg and tiny_config.output_dir in msg and "choose another output folder" in msg
    assert "\n" not in msg


def test_read_only_folder_fails_in_preflight(tiny_config):
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0555 folder; the read-only case is simulated in the test below")
    folder = Path(tiny_config.output_dir)
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="no permission"):
            preflight(tiny_config)
    finally:
        folder.chmod(0o755)


def test_read_only_file_system_fails_in_preflight(tiny_config, monkeypatch):
    def erofs(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(output, "check_writable", erofs)
    with pytest.raises(ConfigError, match="read-only file system.*choose a writable output folder") as e:
        preflight(tiny_config)
    assert tiny_config.output_dir in str(e.value)


def test_full_disk_fails_in_preflight(tiny_config, monkeypatch):
    monkeypatch.setattr(output, "free_disk", lambda path: 1000)
    tiny_config.network_dim = 32
    with pytest.raises(ConfigError, match="free space there or choose another output folder") as e:
        preflight(tiny_config)
    # 2 epochs, a file each, SD1.5-sized at dim 32: 72 MB at least
    assert "at least 72 MB free" in str(e.value) and tiny_config.output_dir in str(e.value)


def _failing_writes(monkeypatch, failures: int) -> list[int]:
    """The first ``failures`` writes of file contents fail as on a full disk."""
    import lora_trainer.files as files

    calls = [0]
    real = files._write_all

    def write_all(fd, data):
        calls[0] += 1
        if calls[0] <= failures:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(files, "_write_all", write_all)
    return calls


def test_disk_full_at_save_time_keeps_the_lora_and_saves_it_when_space_is_back(tiny_sd, tiny_config, monkeypatch):
    from lora_trainer.job import FAILED, TrainingJob

    monkeypatch.setattr(output, "SAVE_RETRY_SECONDS", 0.05)
    _failing_writes(monkeypatch, 3)  # epoch 1's file, then the final file twice
    folder = Path(tiny_config.output_dir)
    job = TrainingJob(lambda cfg, bus, stop: train(cfg, make_sd_bundle(tiny_sd), bus, stop))
    job.start(tiny_config)
    status = job.wait(120)
    assert status.state != FAILED, status.error
    errors = [m for m in status.messages if m.startswith("error: ")]
    assert len(errors) == 2  # the epoch file, and the final one once however often it is retried
    assert "t-000001.safetensors: the disk is full. Free space there" in errors[0]
    assert "the next save, or Stop and save, writes it again" in errors[0]
    assert "t.safetensors: the disk is full" in errors[1] and "tried again every 0.05 s" in errors[1]
    assert sorted(p.name for p in folder.iterdir() if p.name != STATE_FOLDER) == ["t.safetensors"]  # no half file, no temp file
    assert load_file(folder / "t.safetensors")


def test_disk_full_for_good_then_stop_gives_the_lora_up_without_a_traceback(tiny_sd, tiny_config, monkeypatch):
    monkeypatch.setattr(output, "SAVE_RETRY_SECONDS", 0.05)
    _failing_writes(monkeypatch, 10**9)
    tiny_config.max_train_epochs = 1
    stop = StopControl()
    lines: list[str] = []

    def on_event(ev) -> None:
        if isinstance(ev, Message) and ev.level == "error":
            lines.append(ev.text)
            if len(lines) == 1:
                threading.Timer(0.3, stop.stop).start()  # a few retries, then the user presses Stop

    result = train(tiny_config, make_sd_bundle(tiny_sd), EventBus(on_event), stop)
    assert result.files == [] and result.network is not None
    assert lines == [lines[0], "t.safetensors was not saved: stopped"]
    assert _hidden(Path(tiny_config.output_dir)) == [] and not list(Path(tiny_config.output_dir).iterdir())
