"""Benchmark training on the tiny SDXL-architecture model (``builtin:tiny-sdxl``).

Config: tiny SDXL (two text encoders of widths 32 and 64, ``text_time`` UNet), batch 1, LoRA rank 4,
64 px, AdamW, latents cached, both text encoders trained, 20 steps, no intermediate saves.

Prints, for each run (a fresh process each, so imports and model building are counted):

* first step: wall seconds from process start to the end of the first optimizer step;
* seconds per step after warm-up (the first ``--warmup`` steps left out), wall and CPU;
* peak resident memory (``ru_maxrss``) of the process.

    python benchmarks/bench_sdxl.py [--steps 20] [--warmup 3] [--repeat 1]

Reference: kohya sd-scripts needs about 0.8 s per step on a comparable tiny SDXL config on this
machine (figure given with the task, not re-measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE_S_PER_STEP = 0.8

RUNNER = r"""
import time
T0 = time.time()
import json, resource, sys
out, steps, data, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
from lora_trainer.config import TrainConfig
from lora_trainer.hosts.standalone import BUILTIN_TINY_SDXL, StandaloneHost
from lora_trainer.train.events import EventBus, StepEvent
from lora_trainer.train.loop import train
from lora_trainer.train.runtime import Runtime
import torch

cfg = TrainConfig(
    pretrained_model=BUILTIN_TINY_SDXL, train_data_dir=data, output_dir=outdir, output_name="bench",
    resolution=64, network_dim=4, network_alpha=4.0, train_batch_size=1, max_train_steps=steps,
    save_every_n_epochs=0, lr_scheduler="constant", unet_lr=1e-4, text_encoder_lr=5e-5,
    grid_after_training=False, seed=1,
)
t_load = time.time()
bundle = StandaloneHost().model_bundle(cfg, Runtime(torch.device("cpu"), "no"))
t_loaded = time.time()
wall, cpu = [], []
bus = EventBus(lambda e: (wall.append(time.time()), cpu.append(time.process_time())) if isinstance(e, StepEvent) else None)
result = train(cfg, bundle, bus, overwrite=True)
json.dump({"t0": T0, "load_s": t_loaded - t_load, "wall": wall, "cpu": cpu, "steps": result.steps,
           "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, open(out, "w"))
"""


def run_once(steps: int, data: Path, work: Path, threads: int | None = None) -> dict:
    out = work / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    # passive OpenMP waits, as `lora_trainer demo` sets: spinning threads on a shared (loaded) machine make
    # each tiny op wait for a busy core (measured here: 12 s/step spinning vs 0.05 s/step on one thread)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    subprocess.run([sys.executable, "-c", RUNNER, str(out), str(steps), str(data), str(work / "out")], check=True, env=env)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the training process (default: torch's choice)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from lora_trainer.demo import make_demo_dataset

    with tempfile.TemporaryDirectory(prefix="bench_sdxl_") as tmp:
        tmp = Path(tmp)
        data = make_demo_dataset(tmp / "data", images=4, size=64, repeats=5)
        rows = []
        for i in range(args.repeat):
            work = tmp / f"run{i}"
            work.mkdir()
            r = run_once(args.steps, data, work, args.threads)
            w, c = r["wall"], r["cpu"]
            k = min(args.warmup, len(w) - 2)
            per_wall = (w[-1] - w[k]) / (len(w) - 1 - k)
            per_cpu = (c[-1] - c[k]) / (len(c) - 1 - k)
            row = {
                "steps": r["steps"],
                "first_step_s": w[0] - r["t0"],
                "model_build_s": r["load_s"],
                "s_per_step": per_wall,
                "cpu_s_per_step": per_cpu,
                "peak_rss_mib": r["peak_rss_kib"] / 1024,
            }
            rows.append(row)
            print(
                f"run {i + 1}: {row['steps']} steps, first step {row['first_step_s']:.2f} s after start "
                f"(model built in {row['model_build_s']:.2f} s), {row['s_per_step']:.3f} s/step after {k + 1} warm-up steps "
                f"({row['cpu_s_per_step']:.3f} CPU s/step), peak RSS {row['peak_rss_mib']:.0f} MiB"
            )
        if len(rows) > 1:
            med = statistics.median(r["s_per_step"] for r in rows)
            print(f"median s/step: {med:.3f}")
        print(f"reference (kohya sd-scripts, comparable tiny SDXL, this machine): about {REFERENCE_S_PER_STEP} s/step")
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
