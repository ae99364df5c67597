"""Validation loss: the same noise and timesteps every epoch, so epochs can be compared.

Measured on held-out images when ``validation_split`` > 0 and the dataset is large enough,
otherwise on (a fixed subset of) the training images. What it says: how well each epoch's LoRA
predicts the noise on these images, with the randomness of training removed. What it does not
say: whether the pictures look like the subject; a lower value on training images can also mean
the LoRA memorises them. Use it with the grid, not instead of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .noise import add_noise, target_for

MAX_IMAGES = 16
TIMESTEPS = (100, 300, 500, 700, 900)
MIN_IMAGES_FOR_SPLIT = 4


def choose_validation(n_images: int, split: float, seed: int) -> tuple[list[int], bool]:
    """(image indices, held out?). Held out only when ``split`` > 0 and at least
    MIN_IMAGES_FOR_SPLIT images remain for training."""
    if split > 0 and n_images >= MIN_IMAGES_FOR_SPLIT + 1:
        k = min(max(1, round(n_images * split)), n_images - MIN_IMAGES_FOR_SPLIT, MAX_IMAGES)
        perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed + 4242)).tolist()
        return sorted(perm[:k]), True
    if n_images <= MAX_IMAGES:
        return list(range(n_images)), False
    step = n_images / MAX_IMAGES
    return sorted({int(i * step) for i in range(MAX_IMAGES)}), False


class Validator:
    def __init__(
        self,
        bundle,
        latents_of: Callable[[list[int]], torch.Tensor],
        captions: list[str],
        indices: list[int],
        seed: int,
        autocast: Callable,
        batch_size: int = 4,
    ):
        self.bundle = bundle
        self.latents_of = latents_of
        self.captions = captions
        self.indices = indices
        self.autocast = autocast
        self.batch_size = batch_size
        n_t = len(bundle.alphas_cumprod)
        self.timesteps = [min(t, n_t - 1) for t in TIMESTEPS]
        self.seed = seed

    @torch.no_grad()
    def __call__(self) -> float:
        b = self.bundle
        total, count = 0.0, 0
        gen = torch.Generator().manual_seed(self.seed + 99991)
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start : start + self.batch_size]
            x0 = self.latents_of(idx).to(b.device).float()
            caps = [self.captions[i] for i in idx]
            with self.autocast():
                cond = b.encode_text(caps)
            for t_val in self.timesteps:
                noise = torch.randn(x0.shape, generator=gen).to(b.device)
                t = torch.full((x0.shape[0],), t_val, dtype=torch.long, device=b.device)
                x_t = add_noise(x0, noise, t, b.alphas_cumprod)
                target = target_for(b.prediction_type, x0, noise, t, b.alphas_cumprod)
                with self.autocast():
                    pred = b.predict(x_t.to(b.dtype), t, cond)
                total += F.mse_loss(pred.float(), target.float(), reduction="sum").item() / x0[0].numel()
                count += x0.shape[0]
        return total / max(count, 1)
