"""ModelBundle: the only thing the training loop sees of a model.

A host adapter (A1111, Forge) or the standalone loader fills one in. What differs between
model families (SD1, SD2, SDXL) and between hosts lives behind these callables; the loop does
not branch on either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..network.targets import Target

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class ModelBundle:
    family: str
    """``sd1``, ``sd2`` or ``sdxl``."""
    prediction_type: str
    """``epsilon`` or ``v_prediction``."""
    alphas_cumprod: torch.Tensor
    """Cumulative alpha products of the model's own noise schedule, float32 on CPU."""
    encode_images: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
    """Pixels (B,3,H,W) in [-1, 1] to scaled latents (B,4,H/8,W/8). Runs without grad."""
    encode_text: Callable[[list[str]], Any]
    """Captions to the UNet's conditioning; keeps grad when text-encoder LoRAs train."""
    predict: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    """``unet(x_t, t, cond)``: the model output (noise or v)."""
    unet_targets: Callable[[bool], list[Target]]
    """LoRA targets of the UNet; the flag asks for LoCon's kxk convs too."""
    text_encoder_targets: Callable[[], list[Target]]
    device: torch.device
    dtype: torch.dtype
    """dtype of the frozen base weights."""
    trainable_roots: list[nn.Module] = field(default_factory=list)
    """Modules whose base weights must stay frozen (UNet, text encoders)."""
    model_name: str = ""
    model_hash: str | None = None
    vae_name: str = ""
    vae_id: str = ""
    """Changes whenever the VAE's weights change: part of the latent cache key."""
    default_resolution: int = 512
    enable_gradient_checkpointing: Callable[[bool], None] = lambda on: None
    set_attention: Callable[[str], None] = lambda kind: None
    release: Callable[[], None] = lambda: None
    """Called when training ends, to give back what the bundle took (hooks, placement)."""
    condition: Callable[[Any, list[tuple[int, ...]] | None], Any] = lambda cond, sizes: cond
    """Adds per-image size conditioning to ``encode_text``'s output. ``sizes``: one
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` per image, in pixels. SDXL turns
    them into ``time_ids``; SD1/SD2 ignore them (the default)."""
    concat_conditions: Callable[[list[Any]], Any] = torch.cat
    """Joins ``encode_text`` outputs of sub-batches into one (text-encoder output cache)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")

    @property
    def base_model_version(self) -> str:
        """``ss_base_model_version`` as kohya writes it."""
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        if self.family == "sd2":
            return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"
        return "sd_v1"

    @property
    def modelspec_architecture(self) -> str:
        if self.family == "sdxl":
            return "stable-diffusion-xl-v1-base/lora"
        if self.family == "sd2":
            return (
                "stable-diffusion-v2-768-v/lora" if self.prediction_type == "v_prediction" else "stable-diffusion-v2-512/lora"
            )
        return "stable-diffusion-v1/lora"
