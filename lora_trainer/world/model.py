"""The tiny world's pretrained SD1.5-architecture model: its configs and where it is shipped.

``tools/make_tiny_world.py`` builds it from these configs; the files under
``lora_trainer/assets/tiny_world/`` are a diffusers folder and, inside it, the same weights as an
A1111-layout single file (``tiny_world.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.sd import DiffusersSD

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_world"
SINGLE_FILE_NAME = "tiny_world.safetensors"
RESOLUTION = 64

# SD1.5's classes and block types, narrower and shallower: a UNet on 8x8 latents.
WORLD_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
# SD's VAE shape: 4 down blocks (8x downsampling), 4 latent channels, a mid block with attention.
WORLD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": RESOLUTION,
    "scaling_factor": 0.18215,
}
WORLD_CLIP = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 64,
}


def single_file(folder: str | Path = ASSET_DIR) -> Path:
    return Path(folder) / SINGLE_FILE_NAME


def load_tiny_world(folder: str | Path = ASSET_DIR, single: bool = False) -> DiffusersSD:
    """The shipped model in float32, through the same loader as any SD1.5 checkpoint
    (``load_sd``): the diffusers folder, or with ``single=True`` the A1111-layout file with the
    folder as its config dir."""
    from ..model.loading import load_sd

    folder = Path(folder)
    parts = load_sd(single_file(folder), config_dir=folder) if single else load_sd(folder)
    for m in (parts.unet, parts.vae, parts.text_encoder):
        m.to(torch.float32).eval()
    return parts
