"""Registers LoRA Trainer with the WebUI (AUTOMATIC1111 or Forge): the tab, its settings, its REST routes.

No logic here; it lives in the ``lora_trainer`` package (``lora_trainer/hosts/webui.py``). The extension
root goes on ``sys.path`` (appended, so it never shadows the host's modules); ``lora_trainer`` is the only
package it adds.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from modules import script_callbacks  # noqa: E402

from lora_trainer.hosts import webui  # noqa: E402

script_callbacks.on_ui_tabs(webui.on_ui_tabs)
script_callbacks.on_ui_settings(webui.on_ui_settings)
script_callbacks.on_app_started(webui.on_app_started)
