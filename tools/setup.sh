#!/usr/bin/env bash
# Create .venv (if missing) and install lora_trainer with the given extras. torch first:
# a bare "torch" requirement would pull the CUDA build and several GB of packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-standalone}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[${extras}]"
