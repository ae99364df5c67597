"""lora_trainer: train LoRAs for Stable Diffusion inside A1111 / Forge, or standalone."""

__version__ = "0.1.0"
