"""LoRA targets on an LDM UNet (what A1111 and Forge hold), named as the file format wants.

For SD1.x/SD2.x the kohya key of a UNet layer is its *diffusers* path where the WebUIs' fixed SD1.5
arithmetic reads that name back onto the right layer, and its LDM path on other layouts (see
:func:`ldm_names.kohya_unet_name_map`, the one rule every SD1/SD2 bundle uses). The diffusers path
comes from the mapping of :mod:`ldm_names` (derived from the UNet's structure and tested against
diffusers' own converter). No diffusers import: hosts may lack it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..network.targets import UNET_ATTENTION_CONTAINERS, UNET_CONV_CONTAINERS, Target, find_targets
from .ldm_names import kohya_unet_name_map, unet_config_from_ldm_state_dict


def ldm_unet_config(ldm_unet: nn.Module) -> dict:
    """The structural diffusers config of an LDM ``UNetModel``, read from its weights' shapes."""
    return unet_config_from_ldm_state_dict(dict(ldm_unet.state_dict(keep_vars=True)))


def ldm_unet_lora_targets(ldm_unet: nn.Module, include_conv: bool, config: dict | None = None) -> list[Target]:
    """Targets of an SD1/SD2 LDM ``UNetModel`` with kohya names (diffusers-style on SD1/SD2's own
    layout, LDM-style on others: :func:`ldm_names.kohya_unet_name_map`)."""
    return find_targets(
        ldm_unet,
        "lora_unet",
        UNET_ATTENTION_CONTAINERS,
        UNET_CONV_CONTAINERS if include_conv else frozenset(),
        name_map=kohya_unet_name_map(config if config is not None else ldm_unet_config(ldm_unet), "ldm"),
    )


def ldm_unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's top-level blocks (LDM layout): the units activation checkpointing wraps."""
    blocks: list[nn.Module] = []
    for name in ("input_blocks", "middle_block", "output_blocks"):
        part = getattr(unet, name, None)
        if isinstance(part, nn.ModuleList):
            blocks.extend(part)
        elif isinstance(part, nn.Module):
            blocks.append(part)
    return blocks


def _checkpointed(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def checkpoint_ldm_unet_blocks(unet: nn.Module) -> Callable[[], None]:
    """Activation checkpointing for a host's LDM UNet, whose own switch cannot serve us (ldm's
    CheckpointFunction differentiates only a block's own inputs and weights, not our hooked LoRA;
    Forge's raises NotImplementedError): each top-level block's ``forward`` is replaced, on the
    instance only, by a non-reentrant checkpoint of itself. Blocks that already have an instance
    ``forward`` are left alone. Returns a function that puts the original ``forward`` back."""
    wrapped: list[nn.Module] = []
    for block in ldm_unet_blocks(unet):
        if "forward" in vars(block):
            continue
        block.forward = functools.partial(_checkpointed, block.forward)
        wrapped.append(block)

    def undo() -> None:
        while wrapped:
            vars(wrapped.pop()).pop("forward", None)

    return undo
