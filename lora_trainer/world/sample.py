"""A small deterministic DDIM sampler with classifier-free guidance, independent of diffusers pipelines.

It samples SD1/SD2 parts (one text encoder) and SDXL parts (two text encoders: the penultimate hidden
states of both concatenated as the context, the second one's pooled projection as ``text_embeds``,
and size conditioning ``time_ids`` of original size = target size = the picture's, crop (0, 0), as
diffusers' SDXL pipeline does by default).

It calls the UNet, text encoder and VAE modules directly, so a LoRANetwork attached to them (by
forward hooks) acts at whatever multiplier it is set to. Image ``i`` of a call starts from noise
seeded with ``seed + i`` alone: the same seed gives the same starting noise whatever the batch size,
the other prompts, or the LoRA weight (which is what makes an epochs x weights grid comparable), and
the same call gives the same pictures.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model.sd import DiffusersSD, alphas_cumprod_from_config
from ..model.sdxl import DiffusersSDXL, SDXLCond, encode_sdxl_text, time_ids_from_sizes


def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """``trailing`` spacing: the first step is the last training timestep (pure noise), e.g. 999, 949, ... 49."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be in 1..{train_steps}, got {steps}")
    return [int(round(t)) - 1 for t in np.arange(train_steps, 0, -train_steps / steps)]


class Sampler:
    """DDIM (eta = 0) with classifier-free guidance over a UNet, text encoder(s), tokenizer(s) and VAE.

    With ``text_encoder_2`` and ``tokenizer_2`` (SDXL), the UNet gets SDXL's conditioning."""

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        resolution: int | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
    ):
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 go together (SDXL)")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.alphas_cumprod = alphas_cumprod.to(torch.float64).cpu()
        self.prediction_type = prediction_type
        self.resolution = resolution or int(unet.config.sample_size) * 8
        self.scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
        max_len = int(getattr(tokenizer, "model_max_length", 77))
        self.max_length = max_len if max_len <= 1000 else int(text_encoder.config.max_position_embeddings)

    @classmethod
    def from_parts(cls, parts: DiffusersSD | DiffusersSDXL, resolution: int | None = None) -> Sampler:
        """SD1/SD2 parts (``DiffusersSD``) or SDXL parts (``DiffusersSDXL``: two text encoders)."""
        return cls(
            parts.unet,
            parts.vae,
            parts.text_encoder,
            parts.tokenizer,
            alphas_cumprod_from_config(parts.scheduler_config),
            parts.scheduler_config.get("prediction_type", "epsilon"),
            resolution,
            getattr(parts, "text_encoder_2", None),
            getattr(parts, "tokenizer_2", None),
        )

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    # ------------------------------------------------------------------ pieces
    def _device_dtype(self, module: nn.Module) -> tuple[torch.device, torch.dtype]:
        p = next(module.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor | SDXLCond:
        """The UNet's context (B, 77, width); for SDXL an ``SDXLCond`` (context and pooled embedding)."""
        device, _ = self._device_dtype(self.text_encoder)
        if self.sdxl:
            return encode_sdxl_text(self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2, list(prompts), device)
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.text_encoder(ids)[0]

    def _unet_kwargs(self, cond: torch.Tensor | SDXLCond, dtype: torch.dtype) -> dict:
        """``encoder_hidden_states`` (and SDXL's ``added_cond_kwargs``) for a batch of ``cond``."""
        if not self.sdxl:
            return {"encoder_hidden_states": cond.to(dtype)}
        n, r = cond.hidden.shape[0], self.resolution
        tids = time_ids_from_sizes([(r, r, 0, 0, r, r)] * n).to(cond.hidden.device, dtype)
        return {
            "encoder_hidden_states": cond.hidden.to(dtype),
            "added_cond_kwargs": {"text_embeds": cond.pooled.to(dtype), "time_ids": tids},
        }

    def initial_noise(self, n: int, seed: int) -> torch.Tensor:
        side = self.resolution // 8
        return torch.stack(
            [
                torch.randn((4, side, side), generator=torch.Generator().manual_seed(seed + i), dtype=torch.float32)
                for i in range(n)
            ]
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents to uint8 pictures (N, H, W, 3)."""
        device, dtype = self._device_dtype(self.vae)
        x = self.vae.decode(latents.to(device, dtype) / self.scaling).sample.float()
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def latents(
        self,
        prompts: Sequence[str],
        seed: int = 0,
        steps: int = 20,
        guidance: float = 5.0,
        negative: str = "",
    ) -> torch.Tensor:
        """DDIM from noise seeded ``seed + i`` for prompt ``i``; returns scaled latents (N, 4, h, w)."""
        device, dtype = self._device_dtype(self.unet)
        n = len(prompts)
        x = self.initial_noise(n, seed).to(device, torch.float32)
        cond = self.encode_prompts(list(prompts))
        guided = guidance != 1.0
        if guided:
            uncond = self.encode_prompts([negative] * n)
            cond = SDXLCond.cat([uncond, cond]) if self.sdxl else torch.cat([uncond, cond])
        kwargs = self._unet_kwargs(cond, dtype)
        ac = self.alphas_cumprod
        ts = ddim_timesteps(steps, len(ac))
        for i, t in enumerate(ts):
            a = float(ac[t])
            a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            x_in = torch.cat([x, x]) if guided else x
            t_in = torch.full((x_in.shape[0],), t, device=device, dtype=torch.long)
            out = self.unet(x_in.to(dtype), t_in, **kwargs).sample.float()
            if guided:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            if self.prediction_type == "v_prediction":
                x0 = a**0.5 * x - (1 - a) ** 0.5 * out
                eps = (1 - a) ** 0.5 * x + a**0.5 * out
            else:
                eps = out
                x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x

    def images(
        self,
        prompts: Sequence[str],
        seed: int = 0,
        steps: int = 20,
        guidance: float = 5.0,
        negative: str = "",
        batch_size: int = 32,
    ) -> np.ndarray:
        """Pictures (N, H, W, 3) uint8 for ``prompts``; picture ``i`` is seeded ``seed + i``."""
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            lat = self.latents(chunk, seed + start, steps, guidance, negative)
            out.append(self.decode(lat))
        if not out:
            return np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        return np.concatenate(out)


@contextmanager
def lora_weight(network: Any | None, weight: float) -> Iterator[None]:
    """Apply ``network`` (a LoRANetwork) at ``weight`` for the block; restore its hooks and multiplier after.

    ``None`` applies nothing: the model as it is."""
    if network is None:
        yield
        return
    was_attached = network.attached
    before = [m.multiplier for m in network.loras]
    network.set_multiplier(weight)
    if not was_attached:
        network.attach()
    try:
        yield
    finally:
        if not was_attached:
            network.detach()
        for m, w in zip(network.loras, before):
            m.multiplier = w


def save_grid(images: np.ndarray, path: str, columns: int = 8, scale: int = 2) -> None:
    """Write pictures (N, H, W, 3) as one PNG grid (for looking at a run)."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
