"""Diffusion training maths: noising with the model's own schedule, targets and loss weights."""

from __future__ import annotations

import torch


def add_noise(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(latents.device)[t].to(latents.dtype).view(-1, 1, 1, 1)
    return ac.sqrt() * latents + (1 - ac).sqrt() * noise


def target_for(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        ac = alphas_cumprod.to(latents.device)[t].to(latents.dtype).view(-1, 1, 1, 1)
        return ac.sqrt() * noise - (1 - ac).sqrt() * latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def min_snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), as kohya applies them: min(SNR, gamma) / SNR
    for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction."""
    ac = alphas_cumprod.to(t.device)[t].float()
    snr = ac / (1 - ac)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def sample_noise(
    shape: torch.Size, generator: torch.Generator, noise_offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise drawn on the CPU generator (same numbers on any device), plus the
    per-channel offset of "noise offset" training."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_timesteps, (batch,), generator=generator)
