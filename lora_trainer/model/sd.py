"""SD1.x / SD2.x as diffusers modules (the standalone host), presented as a ModelBundle."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..network.targets import (
    TEXT_CONTAINERS,
    UNET_ATTENTION_CONTAINERS,
    UNET_CONV_CONTAINERS,
    Target,
    find_targets,
)
from .bundle import ModelBundle
from .ldm_names import kohya_unet_name_map


@dataclass
class DiffusersSD:
    """The parts of an SD1/SD2 pipeline the trainer needs (no pipeline object)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict
    family: str = "sd1"
    name: str = ""
    sha256: str | None = None


def alphas_cumprod_from_config(cfg: dict) -> torch.Tensor:
    """The training noise schedule as diffusers' DDPM defines it (SD uses scaled_linear)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    start = float(cfg.get("beta_start", 0.00085))
    end = float(cfg.get("beta_end", 0.012))
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def module_fingerprint(module: nn.Module, limit_bytes: int = 64 << 20) -> str:
    """sha256 over a module's parameters (first ``limit_bytes``): a cache key that changes with the weights."""
    h = hashlib.sha256()
    used = 0
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        b = p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        take = b[: max(0, limit_bytes - used)]
        h.update(take)
        used += len(take)
    return h.hexdigest()[:16]


def make_sd_bundle(
    parts: DiffusersSD,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_skip: int = 1,
    prediction_type: str = "auto",
) -> ModelBundle:
    device = torch.device(device)
    unet, vae, te, tok = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
    for m in (unet, vae, te):
        m.eval()  # the loop freezes base weights for the run and restores the flags afterwards
    unet.to(device, dtype)
    te.to(device, dtype)
    # The VAE stays fp32 unless it is on CUDA in half precision: SD's VAE overflows in fp16.
    vae.to(device, torch.float32)
    if prediction_type == "auto":
        prediction_type = parts.scheduler_config.get("prediction_type", "epsilon")
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))

    @torch.no_grad()
    def encode_images(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = vae.encode(pixels.to(device, torch.float32)).latent_dist
        if generator is None:
            lat = dist.mean
        else:
            noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(device)
            lat = dist.mean + dist.std * noise
        return lat * scaling

    max_len = int(getattr(tok, "model_max_length", 77))
    if max_len > 1000:  # tokenizers without a configured limit
        max_len = te.config.max_position_embeddings

    def encode_text(captions: list[str]) -> torch.Tensor:
        ids = tok(captions, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
        ids = ids.to(device)
        if clip_skip <= 1:
            return te(ids)[0]
        out = te(ids, output_hidden_states=True)
        hidden = out.hidden_states[-clip_skip]
        return te.text_model.final_layer_norm(hidden)

    def predict(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, encoder_hidden_states=cond).sample

    def unet_targets(include_conv: bool) -> list[Target]:
        return sd_unet_targets(unet, include_conv)

    def text_encoder_targets() -> list[Target]:
        return find_targets(te, "lora_te", TEXT_CONTAINERS)

    def enable_gradient_checkpointing(on: bool) -> None:
        diffusers_gradient_checkpointing(unet, [te], on)

    def set_attention(kind: str) -> None:
        diffusers_set_attention(unet, device, kind)

    return ModelBundle(
        family=parts.family,
        prediction_type=prediction_type,
        alphas_cumprod=alphas_cumprod_from_config(parts.scheduler_config),
        encode_images=encode_images,
        encode_text=encode_text,
        predict=predict,
        unet_targets=unet_targets,
        text_encoder_targets=text_encoder_targets,
        device=device,
        dtype=dtype,
        trainable_roots=[unet, te],
        model_name=parts.name,
        model_hash=parts.sha256,
        vae_name=parts.name + ":vae",
        vae_id=module_fingerprint(vae),
        default_resolution=int(getattr(unet.config, "sample_size", 64)) * 8,
        enable_gradient_checkpointing=enable_gradient_checkpointing,
        set_attention=set_attention,
    )


def sd_unet_targets(unet: nn.Module, include_conv: bool) -> list[Target]:
    """Targets of an SD1/SD2 diffusers UNet with kohya names: the diffusers paths on SD1/SD2's own
    layout, the LDM paths on others (:func:`ldm_names.kohya_unet_name_map`), as a host names the same
    model's layers."""
    return find_targets(
        unet,
        "lora_unet",
        UNET_ATTENTION_CONTAINERS,
        UNET_CONV_CONTAINERS if include_conv else frozenset(),
        name_map=kohya_unet_name_map(dict(unet.config), "diffusers"),
    )


def diffusers_gradient_checkpointing(unet: nn.Module, text_encoders: list[nn.Module], on: bool) -> None:
    """Activation checkpointing for a diffusers UNet and transformers text encoders (non-reentrant:
    our hooked LoRA weights live outside the checkpointed modules). transformers checkpoints only in
    training mode; CLIP has no dropout, so train() changes nothing else in its output."""
    if on:
        unet.enable_gradient_checkpointing()
        # diffusers before 0.32 checkpoints only in training mode (Forge pins 0.31); the SD UNets' dropout
        # is 0, so train() changes nothing else in their output
        unet.train()
    else:
        unet.disable_gradient_checkpointing()
        unet.eval()
    for te in text_encoders:
        if on and hasattr(te, "gradient_checkpointing_enable"):
            _checkpoint_text_encoder(te)
            te.train()
        elif not on and hasattr(te, "gradient_checkpointing_disable"):
            te.gradient_checkpointing_disable()
            if hasattr(te, "_require_grads_hook"):
                te.disable_input_require_grads()
            te.eval()


def _checkpoint_text_encoder(te: nn.Module) -> None:
    """transformers before 4.35 (A1111 pins 4.30.2) checkpoints reentrantly and cannot be told otherwise;
    a reentrant checkpoint whose input needs no gradient gives none to the weights inside it (our LoRA's),
    so there the input embeddings are made to require grad, as transformers' own PEFT recipe does."""
    import inspect

    if "gradient_checkpointing_kwargs" in inspect.signature(te.gradient_checkpointing_enable).parameters:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        te.gradient_checkpointing_enable()
        te.enable_input_require_grads()


def diffusers_set_attention(unet: nn.Module, device: torch.device, kind: str) -> None:
    """``xformers`` (CUDA only, package needed) or torch's SDPA for a diffusers UNet."""
    if kind == "xformers":
        from ..errors import MissingPackageError

        try:
            import xformers  # noqa: F401
        except ImportError:
            raise MissingPackageError("xformers", "attention = xformers") from None
        if device.type != "cuda":
            raise MissingPackageError("a CUDA GPU", "attention = xformers (use sdpa on CPU)", "xformers")
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
