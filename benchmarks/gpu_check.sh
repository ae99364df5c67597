#!/usr/bin/env bash
# The one prepared check for a session lent a GPU: tests/test_cuda.py, then benchmarks/bench_gpu.sh, inside a
# total time bound (default 470 s, so that a device run with timeout_s 540 ends on its own).
# $OUT receives five files (the device tool brings back at most eight): summary.txt, cuda_tests.log,
# bench_summary.txt, bench_results.json, bench_logs.txt (the bench's setup log and one log per run, joined).
# Env: GPU_CHECK_BUDGET_S (total, default 470; TINY: 1500), TESTS_TIMEOUT_S (default 120), PYTHON (python3),
# GPU_BENCH_DIR (default .gpu-bench), SKIP_BENCH=1, TINY=1 (the bench's tiny CPU models: proves the wiring).
# Wheels in .whl/ (e.g. stable-diffusion-sdkit, for the A1111 tests' ldm modules) are installed for the tests.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
START=$(date +%s)
export OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
export PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BENCH_DIR=${GPU_BENCH_DIR:-$ROOT/.gpu-bench}
export BENCH_SITE=${BENCH_SITE:-/tmp/site_bench}
EXTRA_SITE=/tmp/site_gpu_check
if [ "${TINY:-0}" != "0" ]; then BUDGET=${GPU_CHECK_BUDGET_S:-1500}; else BUDGET=${GPU_CHECK_BUDGET_S:-470}; fi
TESTS_TIMEOUT=${TESTS_TIMEOUT_S:-120}
TESTS_RC=1
BENCH_OUT=$(mktemp -d /tmp/gpu_check_bench.XXXXXX)

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$OUT/summary.txt"; }

install_wheels() {
  # The GPU machine has transformers 5 and no diffusers. The bench carries versions inside our supported ranges;
  # installed where (and as) its run_all.sh installs them, so that the bench then finds them done.
  if [ -f "$BENCH_SITE/.complete" ]; then return 0; fi
  if [ ! -d "$BENCH_DIR/whl" ]; then say "no $BENCH_DIR/whl: the tests use the machine's own packages"; return 0; fi
  rm -rf "$BENCH_SITE"
  timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$BENCH_SITE" "$BENCH_DIR"/whl/*.whl >>"$OUT/cuda_tests.log" 2>&1 && touch "$BENCH_SITE/.complete" \
    || say "WARNING: installing the bench's wheels failed (see cuda_tests.log)"
}

install_extra_wheels() {
  # Packages the GPU machine lacks and only some tests need (ldm for the A1111 tests, xformers): optional.
  compgen -G "$ROOT/.whl/*.whl" >/dev/null || return 0
  timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
    --target "$EXTRA_SITE" "$ROOT"/.whl/*.whl >>"$OUT/cuda_tests.log" 2>&1 \
    || say "WARNING: installing .whl/*.whl failed (see cuda_tests.log)"
}

run_tests() {
  local rc
  PYTHONPATH="$EXTRA_SITE:$BENCH_SITE${PYTHONPATH:+:$PYTHONPATH}" timeout -k 5 "$TESTS_TIMEOUT" \
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py "tests/test_loop.py::test_gradient_checkpointing_same_losses_and_really_on[cuda-0.0001]" >>"$OUT/cuda_tests.log" 2>&1
  rc=$?
  TESTS_RC=$rc
  say "tests/test_cuda.py: exit $rc$([ $rc -eq 124 ] && echo ' (timed out)'); $(grep -E '(passed|failed|skipped|error)' "$OUT/cuda_tests.log" | tail -1)"
  grep -E '^(SKIPPED|FAILED|ERROR)' "$OUT/cuda_tests.log" | cut -c1-300 | tee -a "$OUT/summary.txt"
}

run_bench() {
  # What is left of the total, less a margin for the bench's own setup and table
  local left=$(( BUDGET - $(elapsed) - 30 ))
  if [ "${SKIP_BENCH:-0}" != "0" ]; then say "bench: skipped (SKIP_BENCH)"; return 0; fi
  if [ "$left" -lt 120 ]; then say "bench: skipped, only ${left}s left of ${BUDGET}s"; return 0; fi
  say "bench: budget ${left}s -> $BENCH_OUT"
  OUT=$BENCH_OUT BENCH_BUDGET_S=$left timeout -k 5 $(( left + 25 )) bash "$ROOT/benchmarks/bench_gpu.sh" \
    >"$BENCH_OUT/console.log" 2>&1
  say "bench: exit $?"
}

collect_bench() {
  # One log file instead of six: the device tool brings back at most eight files
  [ -f "$BENCH_OUT/summary.txt" ] && cp "$BENCH_OUT/summary.txt" "$OUT/bench_summary.txt"
  [ -f "$BENCH_OUT/results.json" ] && cp "$BENCH_OUT/results.json" "$OUT/bench_results.json"
  for f in "$BENCH_OUT"/console.log "$BENCH_OUT"/setup.log "$BENCH_OUT"/[A-D]_*.log; do
    [ -f "$f" ] && { echo "===== $(basename "$f")"; cat "$f"; }
  done >"$OUT/bench_logs.txt"
}

: >"$OUT/summary.txt"
: >"$OUT/cuda_tests.log"
say "gpu_check: TINY=${TINY:-0} budget ${BUDGET}s python $(command -v "$PYTHON") checkout $(git rev-parse --short HEAD 2>/dev/null)"
if [ ! -f "$BENCH_DIR/run_all.sh" ]; then
  say "no GPU bench at $BENCH_DIR: cp -r ../shared/gpu-bench .gpu-bench and carry it (see benchmarks/README.md)"
fi
install_wheels
install_extra_wheels
run_tests
[ -f "$BENCH_DIR/run_all.sh" ] && run_bench
collect_bench
if [ -f "$OUT/bench_summary.txt" ]; then cat "$OUT/bench_summary.txt" >>"$OUT/summary.txt"; fi
say "gpu_check: end"
echo "==== $OUT/summary.txt"
cat "$OUT/summary.txt"
# non-zero when the tests failed or the bench could not run; the bench's own failures are in its table
[ "$TESTS_RC" -eq 0 ] || exit "$TESTS_RC"
[ -f "$BENCH_DIR/run_all.sh" ] || exit 2
