"""Latent cache: every image encoded once, in memory or in ``.npz`` files beside the images.

A disk entry is used only when its key matches: the image's bytes (sha256), the resolution,
the alpha background and the VAE's fingerprint. Anything else is re-encoded and rewritten.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..dataset import image_to_tensor, load_image

CACHE_SUFFIX = ".lora_trainer.npz"


def cache_path(image: Path) -> Path:
    return image.with_name(image.stem + CACHE_SUFFIX)


def cache_key(image: Path, resolution: int, background: tuple[int, int, int], vae_id: str) -> str:
    h = hashlib.sha256(image.read_bytes()).hexdigest()
    return f"v1|{h}|{resolution}|{background}|{vae_id}"


def encode_batch(
    encode: Callable, paths: list[Path], resolution: int, background: tuple[int, int, int]
) -> torch.Tensor:
    """Latents of ``paths``, encoded one image at a time: batched convolutions round differently from
    single ones, and an image's latent must not depend on its batch neighbours (a cached run and an
    uncached one, or two batch sizes, must give the same file)."""
    return torch.cat(
        [encode(image_to_tensor(load_image(p, resolution, background)).unsqueeze(0), None).float().cpu() for p in paths]
    )


def build_latent_cache(
    encode: Callable,
    paths: list[Path],
    resolution: int,
    background: tuple[int, int, int],
    vae_id: str,
    to_disk: bool,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 4,
) -> list[torch.Tensor]:
    """One latent per path, in order."""
    out: list[torch.Tensor | None] = [None] * len(paths)
    todo: list[int] = []
    keys: dict[int, str] = {}
    for i, p in enumerate(paths):
        if to_disk:
            keys[i] = cache_key(p, resolution, background, vae_id)
            cp = cache_path(p)
            if cp.is_file():
                try:
                    with np.load(cp, allow_pickle=False) as z:
                        if str(z["key"]) == keys[i]:
                            out[i] = torch.from_numpy(z["latents"].copy())
                except (OSError, ValueError, KeyError):
                    pass  # unreadable or foreign cache file: re-encode and replace it
        if out[i] is None:
            todo.append(i)
    done = len(paths) - len(todo)
    if progress:
        progress(done, len(paths))
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        lat = encode_batch(encode, [paths[i] for i in idx], resolution, background)
        for j, i in enumerate(idx):
            out[i] = lat[j].clone()
            if to_disk:
                _write_npz(cache_path(paths[i]), out[i], keys[i])
        done += len(idx)
        if progress:
            progress(done, len(paths))
    return out  # type: ignore[return-value]


def _write_npz(path: Path, latents: torch.Tensor, key: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, latents=latents.numpy(), key=np.array(key))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
