"""A tiny SDXL-architecture model built from configs (no download): for tests and benchmarks.

Same classes and layer names as SDXL base (UNet2DConditionModel with ``text_time`` additional
embeddings and deeper transformers on the lower level, AutoencoderKL, CLIPTextModel as the first
text encoder, CLIPTextModelWithProjection as the second), only narrower and shallower. The two
encoders have different widths: diffusers' single-file loader tells them apart by width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .sdxl import DiffusersSDXL
from .tiny import TINY_VAE, write_tiny_tokenizer

TE1_WIDTH = 32
TE2_WIDTH = 64
TE2_PROJECTION = 32
TIME_EMBED = 8

TINY_SDXL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": TE1_WIDTH + TE2_WIDTH,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED + TE2_PROJECTION,
    "norm_num_groups": 8,
}
TINY_SDXL_VAE = {**TINY_VAE, "scaling_factor": 0.13025}
TINY_TE1 = {
    "hidden_size": TE1_WIDTH,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": TE1_WIDTH,
    "hidden_act": "quick_gelu",
}
TINY_TE2 = {
    "hidden_size": TE2_WIDTH,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": TE2_PROJECTION,
    "hidden_act": "gelu",
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def build_tiny_sdxl(seed: int = 0, tokenizer_dir: str | Path | None = None) -> DiffusersSDXL:
    """Randomly initialised tiny SDXL-architecture components, reproducible from ``seed``."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if tokenizer_dir is None:
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="lora_trainer_tok_"))
    write_tiny_tokenizer(tokenizer_dir)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    tok2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    vae = AutoencoderKL(**TINY_SDXL_VAE)
    te1 = CLIPTextModel(CLIPTextConfig(**ids, **TINY_TE1))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **TINY_TE2))
    return DiffusersSDXL(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler_config=dict(SDXL_SCHEDULER),
        name=f"tiny-sdxl-seed{seed}",
    )


def save_sdxl_diffusers_folder(parts: DiffusersSDXL, folder: str | Path) -> Path:
    """Save as a diffusers SDXL folder (model_index.json + one sub-folder per component)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts.unet.save_pretrained(folder / "unet", safe_serialization=True)
    parts.vae.save_pretrained(folder / "vae", safe_serialization=True)
    parts.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    parts.text_encoder_2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    parts.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts.scheduler_config, indent=1))
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.36.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "force_zeros_for_empty_prompt": True,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def save_sdxl_single_file(parts: DiffusersSDXL, path: str | Path) -> Path:
    """Write an SGM-layout single-file checkpoint (what A1111/Forge/ComfyUI load)."""
    from safetensors.torch import save_file

    from .sdxl import to_sgm_checkpoint

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = to_sgm_checkpoint(parts)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    return path
