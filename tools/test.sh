#!/usr/bin/env bash
# Set up (first run only) and run the test suite: the core in .venv, then the training tab under
# gradio 3.41.2 (A1111) and 4.40.0 (Forge), with a real browser when Debian's chromium is there.
set -euo pipefail
cd "$(dirname "$0")/.."
# passive OpenMP waits: spinning threads make small CPU models several times slower on a busy machine
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bash tools/setup.sh "standalone,test,optimizers"
. .venv/bin/activate
# stable-diffusion-sdkit ships the `ldm` UNet A1111 holds; its own pins are ancient, so no deps
python -c "import ldm.modules.diffusionmodules.openaimodel" 2>/dev/null \
    || python -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5"
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "note: could not install chromium; the browser test will be skipped"
fi
ruff check .
echo "== core (no gradio) =="
python -m pytest -q "$@"
deactivate
for g in 3 4; do
    echo "== training tab under gradio $g =="
    bash tools/setup_gradio.sh "$g"
    ".venv-gr$g/bin/python" -m pytest -q tests/test_ui.py tests/test_prepare.py tests/test_api.py tests/test_grid.py tests/test_webui_register.py tests/test_browser.py
done
