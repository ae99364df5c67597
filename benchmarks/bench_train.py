"""Benchmark ``python -m lora_trainer train`` on the tiny SD1.5-architecture model.

Measures, per run, in a fresh Python process that runs the real command line:

* time to first step: wall seconds from launching the process to the end of the first optimizer
  step (imports, model loading, latent caching and the first step included);
* steady-state seconds per step, leaving out the first ``--warmup`` steps;
* peak resident memory (``ru_maxrss``) of the training process.

Config: tiny SD1.5 model saved as a diffusers folder, batch 1, LoRA rank 4, 64 px, AdamW,
latents cached, text encoder trained (the defaults), no intermediate saves.

    python benchmarks/bench_train.py [--steps 20] [--repeat 3] [--importtime]

See benchmarks/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# kohya sd-scripts (train_network.py) on this machine, comparable config: tiny SD1.5, batch 1, rank 4,
# 64 px, AdamW, cache_latents. Figures given with the task, not re-measured by this script.
REFERENCE = {"first_step_s": 4.5, "s_per_step": 0.09, "peak_rss_mib": None}

# The training process. It runs the real CLI (lora_trainer.cli.main) and only listens: it wraps
# lora_trainer.train.loop.train to subscribe a timing listener to the event bus and keep the
# TrainResult, and StandaloneHost.model_bundle to time model loading. Results go to a JSON file.
RUNNER = r"""
import time
T_INTERP = time.time()
import json, os, resource, sys
out_path, argv = sys.argv[1], sys.argv[2:]

HIDE = set(filter(None, os.environ.get("LORA_BENCH_HIDE", "").split(",")))
if HIDE:  # --hide: make installed packages look absent (what a minimal install would import)
    import importlib.util

    class _Hider:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in HIDE:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the benchmark)", name=name)
            return None

    _find_spec = importlib.util.find_spec

    def _hidden_find_spec(name, package=None):
        return None if name.split(".")[0] in HIDE else _find_spec(name, package)

    importlib.util.find_spec = _hidden_find_spec
    sys.meta_path.insert(0, _Hider)
marks = {"interpreter": T_INTERP}
step_times, step_cpu = [], []

import lora_trainer.train.loop as loop
import lora_trainer.hosts.standalone as standalone
from lora_trainer.train.events import CachingProgress, StepEvent, TrainingStarted

marks["lora_trainer_imported"] = time.time()
_train, _bundle = loop.train, standalone.StandaloneHost.model_bundle

def model_bundle(self, *a, **k):
    marks["model_load_start"] = time.time()
    try:
        return _bundle(self, *a, **k)
    finally:
        marks["model_loaded"] = time.time()

def listener(ev):
    now = time.time()
    if isinstance(ev, TrainingStarted):
        marks["training_started"] = now
    elif isinstance(ev, CachingProgress) and ev.done == ev.total:
        marks["latents_cached"] = now
    elif isinstance(ev, StepEvent):
        step_times.append(now)
        step_cpu.append(time.process_time())  # CPU seconds of all threads: robust to other load

def train(cfg, bundle, events=None, *a, **k):
    if events is not None:
        events.subscribe(listener)
    result = _train(cfg, bundle, events, *a, **k)
    marks["first_step"] = result.first_step_at
    marks["train_returned"] = time.time()
    marks["steps"] = result.steps
    return result

loop.train = train
standalone.StandaloneHost.model_bundle = model_bundle

from lora_trainer.cli import main
rc = main(argv)
marks["exit_code"] = rc
marks["step_times"] = step_times
marks["step_cpu"] = step_cpu
marks["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
marks["modules_loaded"] = sorted({m.split(".")[0] for m in sys.modules})
with open(out_path, "w") as f:
    json.dump(marks, f)
sys.exit(rc)
"""


def child_env(threads: int | None, hide: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env["LORA_BENCH_HIDE"] = hide
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("PYTHONWARNINGS", "ignore")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    return env


def prepare(work: Path, steps: int) -> tuple[Path, Path]:
    """Tiny model as a diffusers folder + a small dataset (built once, outside the timed runs)."""
    sys.path.insert(0, str(REPO))
    from lora_trainer.demo import make_demo_dataset
    from lora_trainer.model.tiny import build_tiny_sd, save_diffusers_folder

    model = work / "tiny-sd15"
    if not (model / "model_index.json").is_file():
        save_diffusers_folder(build_tiny_sd(seed=0, tokenizer_dir=work / "tok"), model)
    data = make_demo_dataset(work / "data", images=4, size=64, repeats=max(1, math.ceil(steps / 4)))
    return model, data


def train_argv(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    sets = {
        "resolution": 64,
        "network_dim": 4,
        "network_alpha": 4,
        "train_batch_size": 1,
        "optimizer": "AdamW",
        "cache_latents": "true",
        "max_train_steps": steps,
        "save_every_n_epochs": 0,
        "mixed_precision": "no",
        "seed": 42,
    }
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--name", "bench"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    return argv + ["--device", "cpu", "--quiet", "--overwrite"]


def run_once(work: Path, argv: list[str], env: dict[str, str], warmup: int, i: int) -> dict:
    out_json = work / f"run{i}.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", RUNNER, str(out_json), *argv]
    t_launch = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    t_end = time.time()
    if proc.returncode != 0 or not out_json.is_file():
        sys.exit(f"run {i} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    m = json.loads(out_json.read_text())
    st = m["step_times"]
    if len(st) <= warmup + 1:
        sys.exit(f"only {len(st)} steps: use --steps greater than --warmup + 1")
    steady = (st[-1] - st[warmup]) / (len(st) - 1 - warmup)  # the intervals after the first `warmup` steps
    sc = m["step_cpu"]
    cached = m.get("latents_cached", m["model_loaded"])
    return {
        "first_step_s": m["first_step"] - t_launch,
        "s_per_step": steady,
        "peak_rss_mib": m["peak_rss_kib"] / 1024,
        "cpu_first_step_s": sc[0],
        "cpu_s_per_step": (sc[-1] - sc[warmup]) / (len(sc) - 1 - warmup),
        "total_s": t_end - t_launch,
        # where the time to the first step goes
        "phase_startup_s": m["interpreter"] - t_launch,
        "phase_import_s": m["model_load_start"] - m["interpreter"],
        "phase_model_load_s": m["model_loaded"] - m["model_load_start"],
        "phase_setup_cache_s": cached - m["model_loaded"],
        "phase_first_step_s": m["first_step"] - cached,
        "steps": m["steps"],
        "heavy_optional_modules": [x for x in ("bitsandbytes", "peft", "triton", "scipy") if x in m["modules_loaded"]],
    }


def parse_importtime(stderr: str) -> list[tuple[int, str, int, int]]:
    """``-X importtime`` lines as (depth, module, self us, cumulative us), in the order printed
    (a module's line comes after the lines of the modules it imported)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cum_us, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((depth, name.strip(), int(self_us), int(cum_us)))
    return rows


def import_chain(rows: list[tuple[int, str, int, int]], idx: int, links: int = 4) -> str:
    """``module <- importer <- its importer ...``; "(run time)" marks an import made by a function call."""
    depth, out = rows[idx][0], []
    for d, n, _, _ in rows[idx + 1 :]:
        if d < depth:
            out.append(n)
            depth = d
            if len(out) == links:
                break
    if depth == 0 and len(out) < links:
        out.append("(run time)")
    return " <- ".join(out)


def importtime(work: Path, argv: list[str], env: dict[str, str], top: int = 12) -> None:
    """Run the command once under ``python -X importtime`` and summarise where import time goes."""
    cmd = [sys.executable, "-X", "importtime", "-c", RUNNER, str(work / "imp.json"), *argv]
    rows = parse_importtime(subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True).stderr)
    if not rows:
        print("no -X importtime output")
        return
    total = sum(c for d, _, _, c in rows if d == 0)
    print(f"\nimports (python -X importtime; it slows imports a little): {len(rows)} modules, {total / 1e6:.2f} s")
    by_root: dict[str, int] = {}
    for _, name, self_us, _ in rows:
        root = name.split(".")[0]
        by_root[root] = by_root.get(root, 0) + self_us
    print(f"  own time by top-level package (top {top}):")
    for root, us in sorted(by_root.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {root:<20} {us / 1e6:6.2f} s")
    watch = [
        "torch",
        "diffusers",
        "torch._dynamo",
        "diffusers.models.autoencoders",
        "diffusers.models.transformers",
        "diffusers.quantizers",
        "diffusers.hooks",
        "bitsandbytes",
        "peft",
        "transformers",
        "transformers.models.clip.modeling_clip",
        "accelerate",
        "scipy",
        "torchvision",
    ]
    first = {}
    for idx, (_, name, _, _) in enumerate(rows):
        first.setdefault(name, idx)
    print("  selected modules, cumulative (with what they import), first import and who imported it:")
    for name in watch:
        if name in first:
            idx = first[name]
            print(f"    {name:<40} {rows[idx][3] / 1e6:5.2f} s  <- {import_chain(rows, idx)}")
    n_diff = sum(1 for _, n, _, _ in rows if n.startswith("diffusers."))
    n_tf = sum(1 for _, n, _, _ in rows if n.startswith("transformers."))
    print(f"  {n_diff} diffusers.* and {n_tf} transformers.* modules imported")


def fmt(v: float | None, unit: str, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f} {unit}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state figure (default 3)")
    p.add_argument("--repeat", type=int, default=1, help="runs; the median of each figure is shown (default 1)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the training process (default: torch's choice)")
    p.add_argument(
        "--hide",
        default="",
        metavar="PKG,PKG",
        help="make installed packages look absent in the training process, e.g. bitsandbytes,peft "
        "(what an install without them would cost)",
    )
    p.add_argument("--importtime", action="store_true", help="also run once under python -X importtime and summarise")
    p.add_argument("--workdir", help="folder for the model, dataset and outputs (default: a temporary folder)")
    p.add_argument("--json", help="write the per-run figures and the medians to this JSON file")
    args = p.parse_args(argv)
    if args.steps <= args.warmup + 1:
        p.error("--steps must be greater than --warmup + 1")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    with tempfile.TemporaryDirectory(prefix="lora_bench_") as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model, data = prepare(work, args.steps)
        env = child_env(args.threads, args.hide)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load:.2f}; "
            f"{args.steps} steps, warm-up {args.warmup}, {args.repeat} run(s)"
            + (f"; hidden packages: {args.hide}" if args.hide else "")
        )
        runs = []
        for i in range(args.repeat):
            r = run_once(work, train_argv(model, data, work / f"out{i}", args.steps), env, args.warmup, i)
            runs.append(r)
            print(
                f"  run {i + 1}: first step {r['first_step_s']:.2f} s, {r['s_per_step']:.4f} s/step, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB, whole run {r['total_s']:.2f} s "
                f"(CPU: {r['cpu_first_step_s']:.2f} s to first step, {r['cpu_s_per_step']:.4f} s/step)",
                flush=True,
            )
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}

        print(f"\n{'':<30}{'lora_trainer':>14}{'kohya sd-scripts':>20}")
        for label, key, unit, digits in (
            ("time to first step", "first_step_s", "s", 2),
            ("steady state, per step", "s_per_step", "s", 3),
            ("peak RSS", "peak_rss_mib", "MiB", 0),
            ("CPU time to first step", "cpu_first_step_s", "s", 2),
            ("CPU time per step", "cpu_s_per_step", "s", 3),
        ):
            print(f"{label:<30}{fmt(med[key], unit, digits):>14}{fmt(REFERENCE.get(key), unit, digits):>20}")
        print("\nwhere the time to the first step goes (medians):")
        for label, key in (
            ("process and interpreter start", "phase_startup_s"),
            ("imports (torch, lora_trainer)", "phase_import_s"),
            ("model loading (diffusers + transformers imports, weights)", "phase_model_load_s"),
            ("LoRA setup + latent caching", "phase_setup_cache_s"),
            ("optimizer setup + first step", "phase_first_step_s"),
        ):
            print(f"  {label:<60}{fmt(med[key], 's'):>8}")
        heavy = runs[0]["heavy_optional_modules"]
        print(f"  optional packages the training process imported: {', '.join(heavy) or 'none'}")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "median": med, "reference": REFERENCE}, indent=1))
        if args.importtime:
            importtime(work, train_argv(model, data, work / "outimp", args.warmup + 2), env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
