"""Which layers a LoRA trains, and their kohya names.

Targets are found by walking the module tree for the container classes kohya sd-scripts uses
(``Transformer2DModel`` for Standard LoRA, ResNet blocks and samplers for LoCon, CLIP attention
and MLP for the text encoder). The LDM classes the hosts hold are the same containers under
other names, so one walk serves both; the module path is passed through ``name_map`` so that a
host's LDM path becomes the path the file format uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

# diffusers names, then the LDM (A1111/Forge, sgm) names of the same containers
UNET_ATTENTION_CONTAINERS = frozenset({"Transformer2DModel", "SpatialTransformer"})
UNET_CONV_CONTAINERS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample"})
TEXT_CONTAINERS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"})


@dataclass
class Target:
    """One layer to wrap: ``lora_name`` is the kohya key stem (``lora_unet_..``)."""

    lora_name: str
    module: nn.Module
    is_conv3x3: bool


def is_linear(module: nn.Module) -> bool:
    """True for torch's Linear and for host Linear classes that are not subclasses of it (Forge)."""
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Linear" and w is not None and getattr(w, "ndim", 0) == 2


def conv_kind(module: nn.Module) -> str | None:
    """'1x1', 'kxk' or None."""
    if not isinstance(module, nn.Conv2d):
        return None
    return "1x1" if tuple(module.kernel_size) == (1, 1) else "kxk"


def find_targets(
    root: nn.Module,
    prefix: str,
    containers: frozenset[str],
    conv_containers: frozenset[str] = frozenset(),
    name_map: Callable[[str], str] | None = None,
) -> list[Target]:
    """Collect Linear and 1x1-conv layers inside ``containers`` (and inside ``conv_containers``,
    which also contribute kxk convs marked ``is_conv3x3``). Each layer appears once."""
    seen: set[int] = set()
    out: list[Target] = []
    for cname, container in root.named_modules():
        cls = type(container).__name__
        in_attn = cls in containers
        in_conv = cls in conv_containers
        if not (in_attn or in_conv):
            continue
        for child_name, child in container.named_modules():
            if child is container or id(child) in seen:
                continue
            kind = conv_kind(child)
            lin = is_linear(child)
            if not (lin or kind == "1x1" or (in_conv and kind == "kxk")):
                continue
            full = f"{cname}.{child_name}" if cname else child_name
            mapped = name_map(full) if name_map else full
            seen.add(id(child))
            out.append(Target(f"{prefix}_{mapped.replace('.', '_')}", child, kind == "kxk"))
    return out
