#!/usr/bin/env bash
# Set up (first run only) and run the test suite in phases: the core in .venv; the training tab under
# gradio 3.41.2 (A1111) and 4.40.0 (Forge), with a real browser when Debian's chromium is there, and in a
# fresh environment made by the README's standalone-tab install lines (readme-ui); the core loop and the
# adapters under the A1111 and Forge package pins. Every phase runs whatever an earlier one
# did; each prints its summary, and the script fails at the end if any phase failed.
# Arguments go to the core phase's pytest. LORA_TRAINER_PHASES=core,gradio3 runs only the named phases.
set -uo pipefail
cd "$(dirname "$0")/.."
# passive OpenMP waits: spinning threads make small CPU models several times slower on a busy machine
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
selected="${LORA_TRAINER_PHASES:-lint,core,gradio3,gradio4,readme-ui,a1111,forge}"
# every phase but readme-ui (its own environment, from the README) uses .venv, directly or through a .pth file
if [ "$selected" != readme-ui ]; then
    bash tools/setup.sh "standalone,test,optimizers" || { echo "setup of .venv failed" >&2; exit 1; }
    # stable-diffusion-sdkit ships the `ldm` UNet A1111 holds; its own pins are ancient, so no deps
    .venv/bin/python -c "import ldm.modules.diffusionmodules.openaimodel" 2>/dev/null \
        || .venv/bin/python -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5"
fi
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "note: could not install chromium; the browser test will be skipped"
fi

TAB_TESTS="tests/test_ui.py tests/test_prepare.py tests/test_api.py tests/test_guard.py tests/test_grid.py tests/test_webui_register.py tests/test_browser.py"
# under a host's pins: what its users run (the loop, mixed precision, the adapter on the host's module classes)
A1111_TESTS="tests/test_precision.py tests/test_loop.py tests/test_host_a1111.py tests/test_host_a1111_grid_button.py tests/test_ldm_lora.py tests/test_ldm_names.py tests/test_lora_files.py"
# Forge ships diffusers and the newer transformers: the whole suite but the multi-process launches (the
# phase core runs them) and the browser (phase gradio4 opens the same page under the same gradio)
FORGE_TESTS="tests --ignore=tests/test_multiprocess.py --ignore=tests/test_browser.py"

phase_lint()    { .venv/bin/ruff check .; }
phase_core()    { .venv/bin/python -m pytest -q "$@"; }
phase_gradio3() { bash tools/setup_gradio.sh 3 && .venv-gr3/bin/python -m pytest -q $TAB_TESTS; }
phase_gradio4() { bash tools/setup_gradio.sh 4 && .venv-gr4/bin/python -m pytest -q $TAB_TESTS; }
phase_a1111()   { bash tools/setup_host_env.sh a1111 && .venv-a1111/bin/python -m pytest -q $A1111_TESTS; }
phase_forge()   { bash tools/setup_host_env.sh forge && .venv-forge/bin/python -m pytest -q $FORGE_TESTS; }
# the README's standalone-tab install, as written, in a fresh environment: the tab, its REST routes, a real page load
phase_readme_ui() {
    bash tools/setup_readme_ui.sh && .venv-readme-ui/bin/python -c "import gradio" \
        && .venv-readme-ui/bin/python -m pytest -q $TAB_TESTS tests/test_ui_stack.py
}

results=()
failed=0
for name in lint core gradio3 gradio4 readme-ui a1111 forge; do
    case ",$selected," in *",$name,"*) ;; *) continue ;; esac
    echo "== phase $name =="
    log=$(mktemp)
    start=$SECONDS
    if [ "$name" = core ]; then phase_core "$@" 2>&1 | tee "$log"; else "phase_${name//-/_}" 2>&1 | tee "$log"; fi
    rc=${PIPESTATUS[0]}
    # pytest's closing line ("12 passed, 1 skipped in 3.2s"), or the phase's last line when it stopped earlier
    last=$(grep -E '^=*\s*[0-9]+ (passed|failed|errors?|skipped)|no tests ran' "$log" | tail -n 1 | tr -d '=')
    [ -n "$last" ] || last=$(tail -n 1 "$log")
    rm -f "$log"
    if [ "$rc" = 0 ]; then status=ok; else status="FAILED (exit $rc)"; failed=$((failed + 1)); fi
    results+=("$(printf '%-9s %-18s %5ss  %s' "$name" "$status" "$((SECONDS - start))" "$last")")
done
echo "== summary =="
printf '%s\n' "${results[@]}"
echo "phases: $(( ${#results[@]} - failed )) passed, $failed failed"
[ "$failed" = 0 ]
