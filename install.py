"""Run by A1111 / Forge while preparing the environment (cwd = WebUI root, in a subprocess).

Installs only what is missing and never a different version of anything the host already has:
no version pins, and nothing at all for packages the host ships (torch, torchvision, xformers,
transformers, diffusers, accelerate, safetensors, gradio, Pillow, numpy, peft). Optional
optimizers (bitsandbytes, prodigyopt, dadaptation, lion-pytorch) are left to the user: the
tab says which to install when one is chosen.
"""

from __future__ import annotations

import importlib.util
import sys

# import name -> pip name; none of these is a package the hosts pin
REQUIRED = {"tqdm": "tqdm"}
if sys.version_info < (3, 11):
    REQUIRED["tomli"] = "tomli"

NEVER_TOUCH = {
    "torch", "torchvision", "xformers", "transformers", "diffusers", "accelerate",
    "safetensors", "gradio", "Pillow", "numpy", "peft", "bitsandbytes",
}


def missing(requirements: dict[str, str]) -> list[str]:
    return [pip for module, pip in requirements.items() if importlib.util.find_spec(module) is None]


def main() -> None:
    todo = missing(REQUIRED)
    if not todo:
        return
    try:
        import launch  # the host's helper: uses the host's pip and index settings

        for pkg in todo:
            if pkg in NEVER_TOUCH:
                print(f"[lora_trainer] {pkg} is missing from this WebUI; it is the host's to install, skipping")
                continue
            launch.run_pip(f"install {pkg}", f"{pkg} for lora_trainer")
    except ImportError:  # run outside a WebUI
        import subprocess

        subprocess.check_call([sys.executable, "-m", "pip", "install", *[p for p in todo if p not in NEVER_TOUCH]])


if __name__ == "__main__":
    main()
