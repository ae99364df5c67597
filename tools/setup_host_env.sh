#!/usr/bin/env bash
# A Python environment with a WebUI's own package pins, for running our adapter and core tests the
# way users run them: .venv-a1111 (A1111 1.10.1: torch 2.1.2, transformers 4.30.2, no diffusers) or
# .venv-forge (Forge main: torch 2.3.1, transformers 4.46.1, diffusers 0.31.0). The pins are read off
# the hosts' requirements_versions.txt and modules/launch_utils.py (torch). PyPI's torch wheels of those
# versions are CUDA builds (with their nvidia-* packages, about 2.5 GB) that run on a CPU; pip's cache
# keeps them for the next run. A1111 has no diffusers: the tests build their fake A1111 from tiny
# diffusers models, so the oldest diffusers we support (0.28) stands in, used by the tests only.
# lora_trainer itself is put on the path, not installed: in a WebUI we never change what the host has.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:?usage: $0 a1111|forge}"
common="pytest==8.3.5 omegaconf==2.2.3 einops==0.4.1 tqdm==4.66.1"
case "$which" in
  a1111) torch="torch==2.1.2"
         pins="transformers==4.30.2 accelerate==0.21.0 safetensors==0.4.2 Pillow==9.5.0 numpy==1.26.2
               gradio==3.41.2 gradio_client==0.5.0 fastapi==0.94.0 starlette==0.26.1 httpx==0.24.1
               pydantic==1.10.27 anyio==3.7.1 huggingface_hub==0.25.2
               diffusers==0.28.2" ;;
  forge) torch="torch==2.3.1"
         pins="transformers==4.46.1 accelerate==0.31.0 diffusers==0.31.0 peft==0.13.2 safetensors==0.4.2
               Pillow==9.5.0 numpy==1.26.2 gradio==4.40.0 fastapi==0.104.1 starlette==0.27.0 httpx==0.24.1
               pydantic==2.8.2 huggingface_hub==0.26.2" ;;
  *) echo "usage: $0 a1111|forge" >&2; exit 2 ;;
esac
venv=".venv-$which"
# the venv is made anew only when its torch is not the host's (the big download); pip keeps the rest in step
if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${torch##*==}')" 2>/dev/null; then
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade "pip<25" >/dev/null
    "$venv/bin/python" -m pip install -q "$torch"
fi
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q $torch $pins $common
# the ldm UNet A1111 holds (its own pins are ancient, so no deps)
"$venv/bin/python" -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5"
site=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
pwd > "$site/lora_trainer_checkout.pth"
