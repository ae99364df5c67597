#!/usr/bin/env bash
# A gradio environment as a WebUI has it: .venv-gr3 (A1111 1.10: gradio 3.41.2) or .venv-gr4
# (Forge: gradio 4.40.0), each with the companion pins the host ships. Everything else (torch,
# diffusers, lora_trainer) comes from .venv through a .pth file placed after the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
which="$1"
case "$which" in
  3) pins="gradio==3.41.2 gradio_client==0.5.0 fastapi==0.94.0 starlette==0.26.1 httpx==0.24.1 pydantic==1.10.27 anyio==3.7.1 Pillow==9.5.0 numpy==1.26.2 huggingface_hub==0.36.2" ;;
  4) pins="gradio==4.40.0 fastapi==0.104.1 starlette==0.27.0 httpx==0.24.1 pydantic==2.8.2 huggingface_hub==0.36.2" ;;
  *) echo "usage: $0 3|4" >&2; exit 2 ;;
esac
venv=".venv-gr$which"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import gradio" 2>/dev/null; then
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q $pins
fi
main_site=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
own_site=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
echo "$main_site" > "$own_site/zz_lora_trainer_main_venv.pth"
