"""LoRA / LoCon math, injection by hooks, kohya state dict and atomic saving."""

from .lora import LoRAModule, LoRANetwork
from .save import SAVE_DTYPES, save_lora_file, serialize_lora
from .targets import Target, find_targets

__all__ = ["LoRAModule", "LoRANetwork", "SAVE_DTYPES", "Target", "find_targets", "save_lora_file", "serialize_lora"]
