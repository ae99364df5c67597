#!/usr/bin/env bash
# .venv-readme-ui: a fresh environment made by the `pip install` lines of the README's "The training tab,
# standalone" section, run as written (torch first, then this package with the `ui` extra), plus the two
# test tools (pytest, playwright), which must not change any version those lines installed.
# Made again only when those lines or pyproject.toml change; pip's cache makes a remake quick.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-readme-ui
# the section's first bash block; its `pip install` lines without their trailing comments
lines=$(awk '/^### The training tab, standalone/ {in_section = 1; next}
             in_section && /^##/ {exit}
             in_section && /^```bash/ {in_block = 1; next}
             in_block && /^```/ {exit}
             in_block && /^pip install / {print}' README.md | sed -E 's/[[:space:]]+#.*$//')
if [ -z "$lines" ]; then
    echo "no 'pip install' line in the README's standalone tab section" >&2
    exit 1
fi
stamp=$(printf '%s\n' "$lines" | cat - pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$venv/.readme-stamp" ] && [ "$(cat "$venv/.readme-stamp")" = "$stamp" ] \
        && "$venv/bin/python" -c "import gradio, pytest, playwright" 2>/dev/null; then
    echo "$venv is up to date with the README's lines"
else
    rm -rf "$venv"
    python3 -m venv "$venv"
    while IFS= read -r line; do
        echo "+ $line"
        # as a user types it, with the environment activated (pip's notes about absent local indexes left out)
        if ! (. "$venv/bin/activate" && eval "$line") > "$venv/install.log" 2>&1; then
            grep -v "^WARNING: Location" "$venv/install.log" >&2
            echo "failed as written in README.md: $line" >&2
            exit 1
        fi
    done <<< "$lines"
    "$venv/bin/python" -c "import torch, gradio, lora_trainer" \
        || { echo "the README's lines did not give an environment that imports torch, gradio and lora_trainer" >&2; exit 1; }
    before=$("$venv/bin/python" -m pip freeze --exclude-editable)
    "$venv/bin/python" -m pip install -q pytest playwright > "$venv/install.log" 2>&1 \
        || { grep -v "^WARNING: Location" "$venv/install.log" >&2; exit 1; }
    changed=$(comm -23 <(printf '%s\n' "$before" | sort) <("$venv/bin/python" -m pip freeze --exclude-editable | sort))
    if [ -n "$changed" ]; then
        echo "installing pytest and playwright changed what the README's lines installed:" >&2
        printf '%s\n' "$changed" >&2
        exit 1
    fi
    echo "$stamp" > "$venv/.readme-stamp"
fi
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version
print("stack:", ", ".join(f"{n} {version(n)}" for n in ("torch", "gradio", "gradio_client", "pydantic", "fastapi",
                                                          "starlette", "huggingface_hub", "httpx")))
EOF
