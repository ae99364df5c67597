"""The tiny world's pretrained models: their configs and where they are shipped.

``tools/make_tiny_world.py`` builds them from these configs:

* SD1.5 architecture, ``lora_trainer/assets/tiny_world/``: a diffusers folder and, inside it, the
  same weights as an A1111-layout single file (``tiny_world.safetensors``);
* its SDXL-architecture twin (``--arch sdxl``), ``lora_trainer/assets/tiny_world_sdxl/``: two text
  encoders, size conditioning, the SD1.5 world's VAE with SDXL's scaling factor; a diffusers SDXL
  folder and an SGM-layout single file (``tiny_world_sdxl.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.sd import DiffusersSD
from ..model.sdxl import SDXL_VAE_SCALING, DiffusersSDXL

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_world"
SINGLE_FILE_NAME = "tiny_world.safetensors"
SDXL_ASSET_DIR = ASSET_DIR.parent / "tiny_world_sdxl"
SDXL_SINGLE_FILE_NAME = "tiny_world_sdxl.safetensors"
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



# The SDXL twin: SDXL's classes and conditioning (two text encoders of different widths, the
# context is both penultimate hidden states concatenated, the second encoder's pooled projection
# and the size/crop ``time_ids`` go into the additional embedding; linear projections in the
# transformers), the same 8x8 latents, two levels and one transformer layer per block as the SD1.5
# world (SDXL has no attention on its highest-resolution level and deeper transformers lower down;
# at 8x8 latents both levels keep attention, and one layer keeps the files and the build small).
WORLD_TE1 = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}
WORLD_TE2 = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "gelu",
}
WORLD_SDXL_TIME_EMBED = 8
WORLD_SDXL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [4, 4],
    "cross_attention_dim": WORLD_TE1["hidden_size"] + WORLD_TE2["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": WORLD_SDXL_TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * WORLD_SDXL_TIME_EMBED + WORLD_TE2["projection_dim"],
    "norm_num_groups": 16,
}
# the SD1.5 world's VAE, its latents rescaled exactly so that SDXL's factor gives the same scaled latents
WORLD_SDXL_VAE = {**WORLD_VAE, "scaling_factor": SDXL_VAE_SCALING}


def single_file(folder: str | Path = ASSET_DIR) -> Path:
    return Path(folder) / SINGLE_FILE_NAME


def sdxl_single_file(folder: str | Path = SDXL_ASSET_DIR) -> Path:
    return Path(folder) / SDXL_SINGLE_FILE_NAME


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


def load_tiny_world_sdxl(folder: str | Path = SDXL_ASSET_DIR, single: bool = False) -> DiffusersSDXL:
    """The shipped SDXL twin in float32, through the same loader as any SDXL checkpoint: the
    diffusers folder, or with ``single=True`` the SGM-layout file with the folder as its config dir."""
    from ..errors import ModelLoadError
    from ..model.loading import load_sd

    folder = Path(folder)
    if not (folder / "unet").is_dir():
        raise ModelLoadError(f"{folder}: the tiny world's SDXL twin is not there (build it with tools/make_tiny_world.py --arch sdxl)")
    parts = load_sd(sdxl_single_file(folder), config_dir=folder) if single else load_sd(folder)
    for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        m.to(torch.float32).eval()
    return parts


def has_tiny_world_sdxl(folder: str | Path = SDXL_ASSET_DIR) -> bool:
    return (Path(folder) / "unet").is_dir() and (Path(folder) / "text_encoder_2").is_dir()
