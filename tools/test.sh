#!/usr/bin/env bash
# Set up (first run only) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh "standalone,test,optimizers"
. .venv/bin/activate
# stable-diffusion-sdkit ships the `ldm` UNet A1111 holds; its own pins are ancient, so no deps
python -c "import ldm.modules.diffusionmodules.openaimodel" 2>/dev/null \
    || python -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5"
ruff check .
python -m pytest -q "$@"
