"""A tiny SD1.5-architecture model built from configs (no download): for tests, the demo and benchmarks.

Same classes and layer names as SD1.5 (UNet2DConditionModel with cross-attention blocks,
AutoencoderKL with 8x downsampling and 4 latent channels, CLIPTextModel, CLIP BPE tokenizer),
only narrower and shallower.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .sd import DiffusersSD

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
SD_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
# Words that get a single token each; everything else is spelled out letter by letter.
TINY_WORDS = (
    "a an the of on in with and photo picture portrait face woman man person girl boy "
    "red green blue yellow white black orange purple pink grey brown "
    "circle square triangle star cross ring heart shape background "
    "small large big tiny left right top bottom centre center smiling hair eyes "
    "ohwx sks zwx"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-to-printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(folder: str | Path, words: tuple[str, ...] = TINY_WORDS) -> Path:
    """Write vocab.json / merges.txt of a CLIP BPE tokenizer: every byte, plus whole-word tokens for ``words``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in words:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            merge = f"{a} {b}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(a + b, len(vocab))
            symbols = [a + b] + symbols[2:]
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}),
        encoding="utf-8",
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        ),
        encoding="utf-8",
    )
    return folder


def build_tiny_sd(seed: int = 0, tokenizer_dir: str | Path | None = None) -> DiffusersSD:
    """Randomly initialised tiny SD1.5-architecture components, reproducible from ``seed``."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if tokenizer_dir is None:
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="lora_trainer_tok_"))
    write_tiny_tokenizer(tokenizer_dir)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    te = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY_CLIP)
    )
    return DiffusersSD(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, scheduler_config=dict(SD_SCHEDULER), name=f"tiny-sd15-seed{seed}")


def save_diffusers_folder(parts: DiffusersSD, folder: str | Path) -> Path:
    """Save as a diffusers folder (model_index.json + one sub-folder per component)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts.unet.save_pretrained(folder / "unet", safe_serialization=True)
    parts.vae.save_pretrained(folder / "vae", safe_serialization=True)
    parts.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts.scheduler_config, indent=1))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.36.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder
