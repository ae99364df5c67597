"""SDXL as diffusers modules (the standalone host), presented as a ModelBundle.

What differs from SD1/SD2 lives here, behind the bundle's callables:

- two text encoders (CLIP-L as ``CLIPTextModel``, OpenCLIP bigG as ``CLIPTextModelWithProjection``):
  the UNet's context is both penultimate hidden states concatenated, and the second encoder's
  projected pooled output (``text_embeds``) goes into the additional embedding;
- size and crop conditioning (``time_ids``): original size, crop top-left and target size of each
  image, given through :attr:`ModelBundle.condition`;
- kohya names: ``lora_unet_`` + the SGM (LDM) module path, ``lora_te1_`` / ``lora_te2_`` + HF paths
  (separate q/k/v).

Also the SGM single-file layout (``model.diffusion_model.``, ``first_stage_model.``,
``conditioner.embedders.0.transformer.`` (HF CLIP-L) and ``conditioner.embedders.1.model.``
(OpenCLIP bigG: fused ``in_proj``, ``text_projection`` stored as ``[width, projection]``)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..network.targets import TEXT_CONTAINERS, UNET_ATTENTION_CONTAINERS, UNET_CONV_CONTAINERS, Target, find_targets
from .bundle import ModelBundle
from .ldm_names import (
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    convert_unet_state_dict,
    text_encoder_to_ldm_state_dict,
    unet_diffusers_to_ldm_names,
    vae_diffusers_to_ldm_state_dict,
)
from .sd import (
    alphas_cumprod_from_config,
    diffusers_gradient_checkpointing,
    diffusers_set_attention,
    module_fingerprint,
)

SGM_TE1_PREFIX = "conditioner.embedders.0.transformer."
SGM_TE2_PREFIX = "conditioner.embedders.1.model."
SDXL_VAE_SCALING = 0.13025

Size = tuple[int, int, int, int, int, int]
"""(original height, original width, crop top, crop left, target height, target width) in pixels."""


@dataclass
class DiffusersSDXL:
    """The parts of an SDXL pipeline the trainer needs (no pipeline object)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict
    family: str = "sdxl"
    name: str = ""
    sha256: str | None = None


@dataclass
class SDXLCond:
    """The UNet conditioning of a batch: context, pooled text embedding, and size conditioning."""

    hidden: torch.Tensor
    """(B, 77, width1 + width2): penultimate hidden states of both encoders, concatenated."""
    pooled: torch.Tensor
    """(B, projection): the second encoder's projected pooled output (``text_embeds``)."""
    time_ids: torch.Tensor | None = None
    """(B, 6), or None: then the square, uncropped size of the latents is assumed."""

    @staticmethod
    def cat(items: Sequence[SDXLCond]) -> SDXLCond:
        tids = [c.time_ids for c in items]
        return SDXLCond(
            torch.cat([c.hidden for c in items]),
            torch.cat([c.pooled for c in items]),
            None if any(t is None for t in tids) else torch.cat(tids),  # type: ignore[arg-type]
        )

    def detach(self) -> SDXLCond:
        return SDXLCond(
            self.hidden.detach(), self.pooled.detach(), None if self.time_ids is None else self.time_ids.detach()
        )


def time_ids_from_sizes(sizes: Sequence[Sequence[int]]) -> torch.Tensor:
    """diffusers' ``add_time_ids``: original_size + crops_coords_top_left + target_size, per image."""
    return torch.tensor([[float(v) for v in s] for s in sizes], dtype=torch.float32)


# --------------------------------------------------------------------------- names


def sdxl_unet_name_map(config: Mapping[str, Any]):
    """diffusers module path -> SGM module path (what kohya's SDXL keys use)."""
    mapping = unet_diffusers_to_ldm_names(config)

    def name_map(path: str) -> str:
        try:
            return mapping[path]
        except KeyError:
            raise KeyError(f"UNet module {path!r} has no SGM name; the UNet layout is not SDXL") from None

    return name_map


def sdxl_unet_targets(unet: nn.Module, include_conv: bool) -> list[Target]:
    return find_targets(
        unet,
        "lora_unet",
        UNET_ATTENTION_CONTAINERS,
        UNET_CONV_CONTAINERS if include_conv else frozenset(),
        name_map=sdxl_unet_name_map(dict(unet.config)),
    )


def sdxl_text_encoder_targets(te1: nn.Module, te2: nn.Module) -> list[Target]:
    return find_targets(te1, "lora_te1", TEXT_CONTAINERS) + find_targets(te2, "lora_te2", TEXT_CONTAINERS)


# --------------------------------------------------------------------------- SGM single file

_OPENCLIP_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def openclip_from_hf_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = SGM_TE2_PREFIX) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModelWithProjection`` state dict -> OpenCLIP text-tower keys under ``prefix``.

    q/k/v are fused into ``attn.in_proj_{weight,bias}`` (q, k, v order) and ``text_projection`` is
    stored as OpenCLIP does, ``[width, projection]`` (the transpose of HF's Linear weight)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("text_model.encoder.layers."):
            rest = key[len("text_model.encoder.layers.") :]
            idx_s, sub = rest.split(".", 1)
            idx = int(idx_s)
            if sub.startswith("self_attn.") and sub.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = sub.split(".")
                qkv.setdefault((idx, kind), {})[proj[0]] = value
                continue
            for hf, oc in _OPENCLIP_LAYER:
                if sub.startswith(hf):
                    out[f"{prefix}transformer.resblocks.{idx}.{oc}{sub[len(hf):]}"] = value
                    break
            else:
                raise KeyError(f"unexpected CLIPTextModelWithProjection key {key!r}")
        else:
            raise KeyError(f"unexpected CLIPTextModelWithProjection key {key!r}")
    for (idx, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {idx}: q/k/v {kind} incomplete ({sorted(parts)})")
        out[f"{prefix}transformer.resblocks.{idx}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_sgm_checkpoint(parts: DiffusersSDXL) -> dict[str, torch.Tensor]:
    """An SGM-layout (A1111/ComfyUI/sd-scripts) state dict of the SDXL parts."""
    unet_ldm = convert_unet_state_dict(parts.unet.state_dict(), unet_diffusers_to_ldm_names(dict(parts.unet.config)))
    vae_ldm = vae_diffusers_to_ldm_state_dict(parts.vae.state_dict(), dict(parts.vae.config))
    out: dict[str, torch.Tensor] = {}
    groups = (
        ((LDM_UNET_PREFIX + k, v) for k, v in unet_ldm.items()),
        ((LDM_VAE_PREFIX + k, v) for k, v in vae_ldm.items()),
        text_encoder_to_ldm_state_dict(parts.text_encoder.state_dict(), prefix=SGM_TE1_PREFIX).items(),
        openclip_from_hf_state_dict(parts.text_encoder_2.state_dict()).items(),
    )
    for group in groups:
        for k, v in group:
            if k in out:
                raise ValueError(f"duplicate checkpoint key {k!r}")
            out[k] = v
    return out


def is_sgm_state_dict_keys(keys) -> bool:
    """True when the keys are those of an SDXL (SGM layout) checkpoint."""
    return any(k.startswith(SGM_TE2_PREFIX) for k in keys)


# --------------------------------------------------------------------------- bundle


def encode_sdxl_text(te1, te2, tok1, tok2, captions: list[str], device: torch.device) -> SDXLCond:
    """What diffusers' StableDiffusionXLPipeline.encode_prompt computes (clip_skip None)."""

    def ids(tok, enc):
        n = int(getattr(tok, "model_max_length", 77))
        if n > 1000:
            n = enc.config.max_position_embeddings
        return tok(captions, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids.to(device)

    out1 = te1(ids(tok1, te1), output_hidden_states=True)
    out2 = te2(ids(tok2, te2), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return SDXLCond(hidden, out2.text_embeds)


def make_sdxl_bundle(
    parts: DiffusersSDXL,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction_type: str = "auto",
    clip_skip: int = 1,
) -> ModelBundle:
    """``clip_skip`` is accepted and ignored: SDXL always uses the penultimate layers (as sd-scripts)."""
    device = torch.device(device)
    unet, vae = parts.unet, parts.vae
    te1, te2 = parts.text_encoder, parts.text_encoder_2
    for m in (unet, vae, te1, te2):
        m.eval()
    unet.to(device, dtype)
    te1.to(device, dtype)
    te2.to(device, dtype)
    vae.to(device, torch.float32)
    if prediction_type == "auto":
        prediction_type = parts.scheduler_config.get("prediction_type", "epsilon")
    scaling = float(getattr(vae.config, "scaling_factor", SDXL_VAE_SCALING))
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = vae.encode(pixels.to(device, torch.float32)).latent_dist
        if generator is None:
            lat = dist.mean
        else:
            noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(device)
            lat = dist.mean + dist.std * noise
        return lat * scaling

    def encode_text(captions: list[str]) -> SDXLCond:
        return encode_sdxl_text(te1, te2, parts.tokenizer, parts.tokenizer_2, captions, device)

    def condition(cond: SDXLCond, sizes: Sequence[Sequence[int]] | None) -> SDXLCond:
        if sizes is None:
            return cond
        tids = time_ids_from_sizes(sizes)
        if tids.shape[0] != cond.hidden.shape[0]:
            raise ValueError(f"{tids.shape[0]} sizes for a batch of {cond.hidden.shape[0]}")
        return SDXLCond(cond.hidden, cond.pooled, tids)

    def predict(x_t: torch.Tensor, t: torch.Tensor, cond: SDXLCond) -> torch.Tensor:
        tids = cond.time_ids
        if tids is None:
            h, w = x_t.shape[-2] * vae_factor, x_t.shape[-1] * vae_factor
            tids = time_ids_from_sizes([(h, w, 0, 0, h, w)] * x_t.shape[0])
        added = {"text_embeds": cond.pooled.to(device, dtype), "time_ids": tids.to(device, dtype)}
        return unet(x_t, t, encoder_hidden_states=cond.hidden.to(device, dtype), added_cond_kwargs=added).sample

    def enable_gradient_checkpointing(on: bool) -> None:
        diffusers_gradient_checkpointing(unet, [te1, te2], on)

    def set_attention(kind: str) -> None:
        diffusers_set_attention(unet, device, kind)

    return ModelBundle(
        family="sdxl",
        prediction_type=prediction_type,
        alphas_cumprod=alphas_cumprod_from_config(parts.scheduler_config),
        encode_images=encode_images,
        encode_text=encode_text,
        predict=predict,
        unet_targets=lambda include_conv: sdxl_unet_targets(unet, include_conv),
        text_encoder_targets=lambda: sdxl_text_encoder_targets(te1, te2),
        device=device,
        dtype=dtype,
        trainable_roots=[unet, te1, te2],
        model_name=parts.name,
        model_hash=parts.sha256,
        vae_name=parts.name + ":vae",
        vae_id=module_fingerprint(vae),
        default_resolution=int(getattr(unet.config, "sample_size", 128)) * vae_factor,
        enable_gradient_checkpointing=enable_gradient_checkpointing,
        set_attention=set_attention,
        condition=condition,
        concat_conditions=SDXLCond.cat,
    )
