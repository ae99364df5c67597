#!/usr/bin/env bash
# Set up (first run only) and run the demo: a LoRA trained on a built-in tiny model, no download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh standalone
. .venv/bin/activate
lora_trainer demo "$@"
