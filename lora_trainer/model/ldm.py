"""LoRA targets on an LDM UNet (what A1111 and Forge hold), named as the file format wants.

For SD1.x/SD2.x the kohya key of a UNet layer is its *diffusers* path, so each LDM module path
is translated through the mapping of :mod:`ldm_names` (derived from the UNet's structure and
tested against diffusers' own converter). No diffusers import: hosts may lack it.
"""

from __future__ import annotations

from torch import nn

from ..network.targets import UNET_ATTENTION_CONTAINERS, UNET_CONV_CONTAINERS, Target, find_targets
from .ldm_names import unet_config_from_ldm_state_dict, unet_ldm_to_diffusers_names


def ldm_unet_lora_targets(ldm_unet: nn.Module, include_conv: bool, config: dict | None = None) -> list[Target]:
    """Targets of an SD1/SD2 LDM ``UNetModel`` with diffusers-style kohya names."""
    if config is None:
        shapes = {k: p for k, p in ldm_unet.state_dict(keep_vars=True).items()}
        config = unet_config_from_ldm_state_dict(shapes)
    mapping = unet_ldm_to_diffusers_names(config)

    def name_map(path: str) -> str:
        try:
            return mapping[path]
        except KeyError:
            raise KeyError(f"LDM UNet module {path!r} has no diffusers name; the UNet layout is not SD1/SD2") from None

    return find_targets(
        ldm_unet,
        "lora_unet",
        UNET_ATTENTION_CONTAINERS,
        UNET_CONV_CONTAINERS if include_conv else frozenset(),
        name_map=name_map,
    )
