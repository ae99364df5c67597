#!/usr/bin/env bash
# lora_trainer (this checkout) against kohya sd-scripts on full-size random-weight SD1.5 (512 px, fp16) and SDXL
# (1024 px, bf16, gradient checkpointing): the shared GPU bench, pointed at this checkout. The bench folder (its
# runner, kohya's scripts, the wheels) is third-party code carried to the GPU machine at run time and never
# committed, so it is looked up, not vendored: see benchmarks/README.md, "GPU check".
# Env: GPU_BENCH_DIR (default: .gpu-bench in the checkout), OUT (logs; default bench_out), PYTHON, TINY=1 (tiny
# models on CPU: the same code paths without a GPU), BENCH_BUDGET_S, BENCH_PARTS, LT_EXTRA (see the bench's README).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${GPU_BENCH_DIR:-$ROOT/.gpu-bench}
if [ ! -f "$BENCH_DIR/run_all.sh" ]; then
  {
    echo "bench_gpu: no GPU bench at $BENCH_DIR (run_all.sh is missing)."
    echo "  The GPU machine receives only the checkout: copy the shared bench into it under an ignored name,"
    echo "  cp -r ../shared/gpu-bench .gpu-bench   and carry .gpu-bench to the device run,"
    echo "  or point GPU_BENCH_DIR at a copy."
  } >&2
  exit 2
fi
export BENCH_PROJECT=$ROOT
export OUT=${OUT:-$ROOT/bench_out}
exec bash "$BENCH_DIR/run_all.sh"
