"""Reading a kohya LoRA file back onto a model's targets (standalone generation, resume, tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from .lora import LoRAModule, LoRANetwork
from .targets import Target


def network_from_file(path: str | Path, targets: list[Target]) -> tuple[LoRANetwork, list[str]]:
    """A LoRANetwork with the file's weights, ranks and alphas on the matching ``targets``.

    Returns the network and the file's module names that matched no target (a LoRA for another
    model type); a caller decides whether that is an error."""
    sd = load_file(str(path))
    by_name = {t.lora_name: t for t in targets}
    stems = sorted({k.split(".", 1)[0] for k in sd})
    modules, unmatched = [], []
    for stem in stems:
        t = by_name.get(stem)
        down = sd.get(f"{stem}.lora_down.weight")
        if t is None or down is None:
            unmatched.append(stem)
            continue
        rank = down.shape[0]
        alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else float(rank)
        m = LoRAModule(stem, t.module, rank, alpha)
        with torch.no_grad():
            m.lora_down.weight.copy_(down.to(m.lora_down.weight.dtype))
            m.lora_up.weight.copy_(sd[f"{stem}.lora_up.weight"].to(m.lora_up.weight.dtype))
        modules.append(m)
    return LoRANetwork(modules), unmatched
