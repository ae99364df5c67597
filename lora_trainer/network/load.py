"""Reading a kohya LoRA file back onto a model's targets (standalone generation, resume, tests)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from .lora import LoRAModule, LoRANetwork
from .targets import Target


def network_from_file(
    path: str | Path, targets: list[Target], aliases: Mapping[str, str] | None = None
) -> tuple[LoRANetwork, list[str]]:
    """A LoRANetwork with the file's weights, ranks and alphas on the matching ``targets``.

    ``aliases`` maps other names a file may give a layer to the target's ``lora_name`` (an SD1/SD2
    UNet layer is named by its diffusers or its LDM path: ``ldm_names.kohya_unet_stems``); the
    modules take the target's name. Returns the network and the file's module names that matched
    no target (a LoRA for another model type); a caller decides whether that is an error."""
    sd = load_file(str(path))
    by_name = {t.lora_name: t for t in targets}
    aliases = aliases or {}
    stems = sorted({k.split(".", 1)[0] for k in sd})
    modules, unmatched, taken = [], [], set()
    for stem in stems:
        t = by_name.get(stem) or by_name.get(aliases.get(stem, ""))
        down = sd.get(f"{stem}.lora_down.weight")
        if t is None or down is None or t.lora_name in taken:
            unmatched.append(stem)
            continue
        taken.add(t.lora_name)
        rank = down.shape[0]
        alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else float(rank)
        m = LoRAModule(t.lora_name, t.module, rank, alpha)
        with torch.no_grad():
            m.lora_down.weight.copy_(down.to(m.lora_down.weight.dtype))
            m.lora_up.weight.copy_(sd[f"{stem}.lora_up.weight"].to(m.lora_up.weight.dtype))
        modules.append(m)
    return LoRANetwork(modules), unmatched
