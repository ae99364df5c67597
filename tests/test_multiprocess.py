"""Training in several processes: the Runtime, gradient averaging, and a real two-process CPU launch.

Notes on launching several CPU processes with accelerate (1.x): ``accelerate launch --cpu
--num_processes 2`` starts ONE process (its "simple launcher"; several CPU processes need
``--mpirun_hostfile`` and an MPI install) and sets neither RANK nor WORLD_SIZE. What starts N
local processes with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set is
``--multi_gpu`` (it runs ``torch.distributed.run``), which works on a machine without GPUs;
``--device cpu`` keeps the trainer on the CPU (gloo) where GPUs exist.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.train.runtime import Runtime
from lora_trainer.train.state import STATE_FOLDER  # the resume states live beside the LoRA files

REPO = Path(__file__).resolve().parents[1]
# A hang (e.g. ranks disagreeing on the number of all-reduces) must fail, not block CI. On an idle 2-core
# machine a launch takes 30-60 s; busy (CI's other work, a second job) it has taken over 240 s, which once
# failed a correct run. The limits are for hangs only, so they are generous; the spawned workers also set
# a gloo collective timeout, which reports a real hang as an error from inside the process.
LAUNCH_TIMEOUT = 900  # seconds
SPAWN_TIMEOUT = 600
COLLECTIVE_TIMEOUT = timedelta(seconds=180)


# ---------------------------------------------------------------- single process, no launcher


def test_from_env_without_launcher_is_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    rt = Runtime.from_env("no", "cpu")
    assert (rt.rank, rt.world_size, rt.is_main) == (0, 1, True)
    assert rt.device == torch.device("cpu")
    assert rt.weight_dtype == torch.float32
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    assert list(rt.shard([3, 1, 2])) == [3, 1, 2]
    # one process: averaging gradients is a no-op (and needs no process group)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    rt.all_reduce_grads([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_fp16_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError):
        Runtime("cpu", "fp16")
    with pytest.raises(ConfigError):
        Runtime(torch.device("cpu"), "fp16")
    assert Runtime("cpu", "bf16").weight_dtype == torch.bfloat16


@pytest.mark.parametrize("n,world", [(8, 2), (7, 2), (3, 2), (1, 3), (10, 4)])
def test_shard_gives_every_process_the_same_count(n, world):
    """Unequal shares would make one process skip an all-reduce the others wait for (a hang)."""
    items = list(range(n))
    shares = [list(Runtime("cpu", rank=r, world_size=world).shard(items)) for r in range(world)]
    assert {len(s) for s in shares} == {math.ceil(n / world)}
    assert set().union(*shares) == set(items)


# ---------------------------------------------------------------- spawned gloo process groups


def _init_group(store: str, rank: int, world: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


def _all_reduce_worker(rank: int, world: int, store: str, out: str) -> None:
    _init_group(store, rank, world)
    try:
        rt = Runtime(torch.device("cpu"), "no", rank, world)
        a = torch.nn.Parameter(torch.zeros(2, 3))
        b = torch.nn.Parameter(torch.zeros(4))
        c = torch.nn.Parameter(torch.zeros(5))  # no gradient (e.g. frozen this step): must be left alone
        a.grad = torch.arange(6.0).reshape(2, 3) * (rank + 1)
        b.grad = torch.full((4,), 10.0 * rank)
        rt.all_reduce_grads([a, b, c])
        torch.save({"a": a.grad, "b": b.grad, "c": c.grad}, out)
        rt.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _train_worker(rank: int, world: int, store: str, out: str, data: str, lora_dir: str, tok: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    _init_group(store, rank, world)  # from_env joins an existing group instead of creating one
    try:
        from lora_trainer.config import TrainConfig
        from lora_trainer.hosts.standalone import StandaloneHost
        from lora_trainer.model.tiny import build_tiny_sd
        from lora_trainer.train.loop import train

        rt = Runtime.from_env("no", "cpu")
        assert (rt.rank, rt.world_size) == (rank, world)
        cfg = TrainConfig(
            train_data_dir=data,
            output_dir=lora_dir,
            output_name="spawned",
            resolution=64,
            network_dim=4,
            network_alpha=2.0,
            max_train_epochs=2,
            save_every_n_epochs=0,
            unet_lr=1e-3,
            text_encoder_lr=1e-3,
            lr_scheduler="constant",
            seed=3,
        )
        bundle = StandaloneHost(build_tiny_sd(seed=0, tokenizer_dir=f"{tok}{rank}")).model_bundle(cfg, rt)
        result = train(cfg, bundle, runtime=rt)
        torch.save(
            {
                "state": result.network.kohya_state_dict(),
                "files": [str(p) for p in result.files],
                "steps": result.steps,
                "losses": result.losses,
            },
            out,
        )
    finally:
        torch.distributed.destroy_process_group()


def _spawn(fn, world: int, args_for_rank, timeout: float) -> None:
    """Start ``world`` spawned processes, wait at most ``timeout`` s; kill them all on a hang."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=fn, args=(r, world, *args_for_rank(r)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join(5)
    assert not hung, f"{len(hung)} of {world} processes still running after {timeout} s (collective hang?)"
    assert [p.exitcode for p in procs] == [0] * world, f"exit codes {[p.exitcode for p in procs]}"


@pytest.mark.multiprocess
def test_all_reduce_grads_averages_across_two_gloo_processes(tmp_path):
    store = tmp_path / "store"
    _spawn(_all_reduce_worker, 2, lambda r: (str(store), str(tmp_path / f"grads{r}.pt")), SPAWN_TIMEOUT)
    results = [torch.load(tmp_path / f"grads{r}.pt") for r in range(2)]
    base = torch.arange(6.0).reshape(2, 3)
    for res in results:
        assert torch.equal(res["a"], base * 1.5)  # mean of 1x and 2x
        assert torch.equal(res["b"], torch.full((4,), 5.0))  # mean of 0 and 10
        assert res["c"] is None


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_identical_loras(tmp_path):
    """Same init, averaged gradients, same optimizer: every rank ends with the same LoRA, and only rank 0 saves.

    3 samples on 2 processes: the shares are padded to 2 samples each (2 steps per epoch); with
    unequal shares rank 1 would skip an all-reduce and the run would hang."""
    from lora_trainer.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", images=3, size=64, repeats=1)
    lora_dir = tmp_path / "Lora"
    _spawn(
        _train_worker,
        2,
        lambda r: (
            str(tmp_path / "store"),
            str(tmp_path / f"rank{r}.pt"),
            str(data),
            str(lora_dir),
            str(tmp_path / "tok"),
        ),
        SPAWN_TIMEOUT,
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["steps"] == r1["steps"] == 4  # ceil(3 / 2) = 2 steps per epoch x 2 epochs
    assert r0["files"] == [str(lora_dir / "spawned.safetensors")]
    assert r1["files"] == []
    assert sorted(p.name for p in lora_dir.iterdir() if p.name != STATE_FOLDER) == ["spawned.safetensors"]
    assert r0["losses"] != r1["losses"]  # each rank saw its own samples / noise...
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:  # ...yet the weights agree bit for bit
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert any(k.endswith("lora_up.weight") and r0["state"][k].abs().max() > 0 for k in r0["state"])  # it trained


# ---------------------------------------------------------------- the real command line under accelerate launch


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> dict[str, Path]:
    from lora_trainer.demo import make_demo_dataset
    from lora_trainer.model.tiny import build_tiny_sd, save_diffusers_folder

    root = tmp_path_factory.mktemp("mp")
    model = save_diffusers_folder(build_tiny_sd(seed=0, tokenizer_dir=root / "tok"), root / "tiny-sd15")
    data = make_demo_dataset(root / "data", images=4, size=64, repeats=2)
    return {"root": root, "model": model, "data": data}


def _train_args(saved_model: dict[str, Path], out: Path) -> list[str]:
    return [
        "train",
        "--model", str(saved_model["model"]),
        "--data", str(saved_model["data"]),
        "--output", str(out),
        "--name", "mp",
        "--set", "resolution=64",
        "--set", "network_dim=4",
        "--set", "max_train_epochs=1",
        "--device", "cpu",
        "--quiet",
    ]  # fmt: skip


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    return env


@pytest.mark.multiprocess
@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(saved_model):
    pytest.importorskip("accelerate")
    from safetensors import safe_open

    out = saved_model["root"] / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "lora_trainer", *_train_args(saved_model, out),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"accelerate launch did not finish in {LAUNCH_TIMEOUT} s:\n{e.stdout}\n{e.stderr}")
    log = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log

    # each process trains its half: 4 images x 2 repeats = 8 samples -> 4 steps of batch 1 per process
    assert "2 processes: each trains 4 steps per epoch" in proc.stdout, log
    # only rank 0 reports (the other processes train silently) and only rank 0 saves
    assert proc.stdout.count("finished after 4 steps") == 1, log
    assert proc.stdout.count("saved ") == 1, log
    assert sorted(p.name for p in out.iterdir() if p.name != STATE_FOLDER) == ["mp.safetensors"], log

    with safe_open(str(out / "mp.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert any(k.startswith("lora_unet_") for k in tensors)
    assert any(k.startswith("lora_te_") for k in tensors)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert any(k.endswith("lora_up.weight") and t.abs().max() > 0 for k, t in tensors.items())  # it trained
    assert meta["ss_total_batch_size"] == "2"  # batch 1 x accumulation 1 x 2 processes
    assert meta["ss_batch_size_per_device"] == "1"
    assert meta["ss_max_train_steps"] == "4"  # ceil(8 / 2)
    assert meta["ss_steps"] == "4"
    assert meta["ss_num_train_images"] == "8"


# a launched script: the real command line (lora_trainer.cli.main), which also records, per rank, the
# LoRA weights, the steps, the learning rates and the bucket batches of every epoch (whole plan, own share)
_RECORDING_DRIVER = """
import os
import sys

import torch

from lora_trainer import cli
from lora_trainer.dataset.buckets import BucketPlan
from lora_trainer.train import loop
from lora_trainer.train.events import StepEvent

out = sys.argv.pop(1)
record = {"epochs": [], "lrs": []}
epoch_batches = getattr(BucketPlan, "epoch_batches", None)  # absent: the run says why it cannot train


def recording_epoch_batches(self, order, batch_size, rank=0, world_size=1):
    mine = epoch_batches(self, order, batch_size, rank, world_size)
    full = self.batches(order, batch_size)
    record["epochs"].append({"plan": full, "mine": mine, "buckets": [self.images[b[0]].bucket for b in mine]})
    record["one_bucket_per_batch"] = all(len({self.images[i].bucket for i in b}) == 1 for b in full)
    return mine


real_train = loop.train


def recording_train(cfg, bundle, events=None, **kw):
    events.subscribe(lambda ev: record["lrs"].append(ev.lrs) if isinstance(ev, StepEvent) else None)
    result = real_train(cfg, bundle, events, **kw)
    record.update(steps=result.steps, rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]))
    torch.save({"state": result.network.kohya_state_dict(), "record": record}, out + os.environ["RANK"] + ".pt")
    return result


if epoch_batches is not None:
    BucketPlan.epoch_batches = recording_epoch_batches
loop.train = recording_train
sys.exit(cli.main(sys.argv[1:]))
"""

# mixed aspect ratios; with resolution 64 and buckets 32..128 in steps of 32 they fall into three
# buckets: 96x32 (wide, big), 32x96 (tall), 64x64 (square, wideish)
_MIXED = {"wide": (128, 64), "tall": (64, 128), "square": (64, 64), "wideish": (96, 64), "big": (200, 100)}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_with_buckets(saved_model, tmp_path):
    """Aspect-ratio buckets under a real accelerate launch: 5 images x 2 repeats in 3 buckets, batch 2
    -> 5 bucket batches per epoch (96x32: 2, 32x96: 1, 64x64: 2), shared 3 + 3 by the 2 processes with
    the last round padded by the epoch's first batch -> 3 steps per epoch, 6 steps in 2 epochs. Both
    ranks take every step (no all-reduce hang), train disjoint shares of the same plan, follow the
    cosine schedule with warm-up as one process would, and end with the same weights; rank 0 writes
    one valid file."""
    pytest.importorskip("accelerate")
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from lora_trainer.train.schedulers import build_scheduler

    sub = tmp_path / "data" / "2_ohwx ring"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in _MIXED.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(sub / f"{name}.png")
        (sub / f"{name}.txt").write_text(f"ohwx, ring, {name}")
    driver = tmp_path / "driver.py"
    driver.write_text(_RECORDING_DRIVER)
    out = tmp_path / "out"
    args = [
        "train",
        "--model", str(saved_model["model"]),
        "--data", str(tmp_path / "data"),
        "--output", str(out),
        "--name", "mpb",
        "--device", "cpu",
        "--quiet",
    ]  # fmt: skip
    sets = {
        "resolution": 64,
        "network_dim": 4,
        "max_train_epochs": 2,
        "save_every_n_epochs": 0,
        "train_batch_size": 2,
        "enable_bucket": "true",
        "min_bucket_reso": 32,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 32,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "unet_lr": 1e-3,
        "text_encoder_lr": 5e-4,
    }
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(driver), str(tmp_path / "rank"), *args,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"accelerate launch did not finish in {LAUNCH_TIMEOUT} s (a collective hang?):\n{e.stdout}\n{e.stderr}")
    log = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log

    # the printed plan, from rank 0 only
    m = re.search(r"\nbuckets: .*an epoch has (\d+) batches; 2 processes train (\d+) of them each.*: (\d+) steps per epoch, (\d+) steps", proc.stdout)
    assert m, log
    assert tuple(map(int, m.groups())) == (5, 3, 3, 6), log
    assert "(the last round padded with 1 from the start of the epoch)" in proc.stdout, log
    assert "2 processes: the 5 bucket batches of each epoch" in proc.stdout, log  # the bucket report says the rule
    assert "padded with the epoch's first batch again" in proc.stdout, log
    assert proc.stdout.count("finished after 6 steps") == 1, log
    assert proc.stdout.count("saved ") == 1, log
    assert sorted(p.name for p in out.iterdir() if p.name != STATE_FOLDER) == ["mpb.safetensors"], log

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    rec0, rec1 = r0["record"], r1["record"]
    assert (rec0["rank"], rec1["rank"], rec0["world"], rec1["world"]) == (0, 1, 2, 2)
    assert rec0["steps"] == rec1["steps"] == 6  # the total printed, on both ranks

    # the LR schedule: the same on both ranks, and what one process gets for the same 6 optimizer steps
    assert len(rec0["lrs"]) == 6 and rec0["lrs"] == rec1["lrs"]
    for group, lr in (("unet", 1e-3), ("text_encoder", 5e-4)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = build_scheduler("cosine", opt, 6, 2)
        expect = []
        for _ in range(6):
            opt.step()
            sched.step()
            expect.append(opt.param_groups[0]["lr"])
        assert [s[group] for s in rec0["lrs"]] == pytest.approx(expect), group

    # each epoch: the same plan of 5 bucket batches on both ranks, dealt out in turn, padded by its first batch
    assert len(rec0["epochs"]) == len(rec1["epochs"]) == 2
    assert rec0["one_bucket_per_batch"] and rec1["one_bucket_per_batch"]
    shapes = set()
    for e0, e1 in zip(rec0["epochs"], rec1["epochs"]):
        full = e0["plan"]
        assert e1["plan"] == full and len(full) == 5
        assert e0["mine"] == [full[0], full[2], full[4]]
        assert e1["mine"] == [full[1], full[3], full[0]]
        shapes |= set(e0["buckets"]) | set(e1["buckets"])
    assert shapes == {(96, 32), (32, 96), (64, 64)}  # every bucket trained, in batches of its own shape
    assert rec0["epochs"][0]["plan"] != rec0["epochs"][1]["plan"]  # a new order every epoch

    # the same weights on both ranks, bit for bit, and they are what rank 0 saved
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    with safe_open(str(out / "mpb.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors.keys() == r0["state"].keys()
    for k, t in tensors.items():
        assert torch.equal(t, r0["state"][k].to(t.dtype)), k
        assert torch.isfinite(t.float()).all(), k
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    assert any(k.endswith("lora_up.weight") and t.abs().max() > 0 for k, t in tensors.items())  # it trained
    assert meta["ss_enable_bucket"] == "True"
    assert (meta["ss_max_train_steps"], meta["ss_steps"], meta["ss_epoch"]) == ("6", "6", "2")
    assert meta["ss_num_batches_per_epoch"] == "3"  # per process, as kohya (len of the prepared dataloader)
    assert meta["ss_total_batch_size"] == "4"  # batch 2 x accumulation 1 x 2 processes
    info = json.loads(meta["ss_bucket_info"])
    assert sorted((tuple(b["resolution"]), b["count"]) for b in info["buckets"].values()) == [
        ((32, 96), 1),
        ((64, 64), 2),
        ((96, 32), 2),
    ]


def test_cpu_launch_that_starts_one_process_warns(saved_model, monkeypatch, capsys):
    """``accelerate launch --cpu --num_processes 2`` runs one process with MASTER_ADDR set but no
    WORLD_SIZE: the trainer says so instead of silently training alone."""
    from lora_trainer.cli import main

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    out = saved_model["root"] / "out_single"
    assert main(_train_args(saved_model, out)) == 0
    text = capsys.readouterr().out
    assert "WARNING: accelerate launch --cpu starts ONE process" in text
    assert "finished after 8 steps" in text
