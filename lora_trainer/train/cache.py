"""Latent cache: every image encoded once, in memory or in ``.npz`` files beside the images.

A disk entry is used only when its key matches: the image's bytes (sha256), the resolution,
the alpha background and the VAE's fingerprint. Anything else is re-encoded and rewritten.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..dataset import DatasetScan, image_to_tensor, load_image
from ..errors import NotEnoughSpace
from ..files import free_disk, write_file

CACHE_SUFFIX = ".lora_trainer.npz"


def cache_path(image: Path) -> Path:
    return image.with_name(image.stem + CACHE_SUFFIX)


def cache_key(
    image: Path, resolution: int, background: tuple[int, int, int], vae_id: str, geometry: tuple | None = None
) -> str:
    h = hashlib.sha256(image.read_bytes()).hexdigest()
    key = f"v1|{h}|{resolution}|{background}|{vae_id}"
    if geometry is not None:  # a bucketed crop: keyed by its bucket size and crop offsets
        oh, ow, top, left, th, tw = geometry
        key += f"|bucket {tw}x{th} crop {left},{top}"
    return key


def _load(p: Path, resolution: int, background: tuple[int, int, int], geometry: tuple | None):
    if geometry is None:
        return load_image(p, resolution, background)
    from ..dataset.buckets import load_cropped

    return load_cropped(p, geometry, background)


def encode_batch(
    encode: Callable,
    paths: list[Path],
    resolution: int,
    background: tuple[int, int, int],
    geometries: list[tuple] | None = None,
) -> torch.Tensor:
    """Latents of ``paths``, encoded one image at a time: batched convolutions round differently from
    single ones, and an image's latent must not depend on its batch neighbours (a cached run and an
    uncached one, or two batch sizes, must give the same file). ``geometries`` (bucketed training):
    the crop of each image, see :mod:`lora_trainer.dataset.buckets`; all of one batch share a size."""
    geoms = geometries or [None] * len(paths)
    return torch.cat(
        [
            encode(image_to_tensor(_load(p, resolution, background, g)).unsqueeze(0), None).float().cpu()
            for p, g in zip(paths, geoms)
        ]
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
    geometries: list[tuple] | None = None,
) -> list[torch.Tensor]:
    """One latent per path, in order (of each image's bucket size when ``geometries`` are given)."""
    out: list[torch.Tensor | None] = [None] * len(paths)
    todo: list[int] = []
    keys: dict[int, str] = {}
    for i, p in enumerate(paths):
        if to_disk:
            keys[i] = cache_key(p, resolution, background, vae_id, geometries[i] if geometries else None)
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
        lat = [
            encode_batch(encode, [paths[i]], resolution, background, [geometries[i]] if geometries else None)[0]
            for i in idx
        ]
        for j, i in enumerate(idx):
            out[i] = lat[j].clone()
            if to_disk:
                _write_npz(cache_path(paths[i]), out[i], keys[i])
        done += len(idx)
        if progress:
            progress(done, len(paths))
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- will it fit

_LATENT_CHANNELS = 4  # the VAEs of SD1, SD2 and SDXL
_VAE_FACTOR = 8  # one latent pixel per 8 x 8 image pixels
_FLOAT_BYTES = 4  # latents are kept as float32 (see encode_batch)
_NPZ_OVERHEAD = 1024  # per .npz file: zip headers and the cache key


def latent_bytes(resolution: int) -> int:
    """The largest latent of one image: 4 x H/8 x W/8 floats. A bucket's area is at most
    ``resolution``\\ :sup:`2`, so the square bounds every bucket."""
    side = resolution // _VAE_FACTOR
    return _LATENT_CHANNELS * side * side * _FLOAT_BYTES


def available_memory() -> int | None:
    """Bytes of RAM that new allocations can take without swapping, or None where it cannot be read."""
    try:
        import psutil  # optional; the WebUIs install it

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel counts in KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_latent_cache_fits(cfg, scan: DatasetScan) -> None:
    """Refuse, before the model loads, a latent cache the machine cannot hold. The cache keeps one
    latent per image (repeats share it) in RAM, also with ``cache_latents_to_disk`` (the files are
    written and then kept in memory too, see :func:`build_latent_cache`)."""
    if not (cfg.cache_latents or cfg.cache_latents_to_disk):
        return
    side = cfg.resolution // _VAE_FACTOR
    what = (
        f"Caching the latents of {scan.num_images} images at resolution {cfg.resolution} "
        f"({_LATENT_CHANNELS} x {side} x {side} floats each)"
    )
    need = scan.num_images * latent_bytes(cfg.resolution)
    free = available_memory()
    if free is not None and need > free:
        raise NotEnoughSpace(
            f"{what} needs up to {_size(need)} of RAM, but {_size(free)} is available. Lower resolution, "
            "train on fewer images, or set cache_latents and cache_latents_to_disk to false (each image is "
            "then encoded at every step: slower, but no cache)"
        )
    if cfg.cache_latents_to_disk:
        _check_disk_cache_fits(scan, cfg.resolution, what)


def _check_disk_cache_fits(scan: DatasetScan, resolution: int, what: str) -> None:
    """The .npz files go beside the images; those there already are rewritten in place or reused."""
    todo = [e.path for e in scan.entries() if not cache_path(e.path).is_file()]
    need = len(todo) * (latent_bytes(resolution) + _NPZ_OVERHEAD)
    free = free_disk(scan.root)
    if need > free:
        raise NotEnoughSpace(
            f"{what} writes up to {_size(need)} of .npz files beside the images in {scan.root}, but that disk "
            f"has {_size(free)} free. Free space there, lower resolution, or set cache_latents_to_disk to false "
            "(the cache is then kept in RAM only)"
        )


def _write_npz(path: Path, latents: torch.Tensor, key: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, latents=latents.numpy(), key=np.array(key))
    write_file(path, buf.getvalue(), replace=True)  # a cache: a stale or foreign one is replaced


# --------------------------------------------------------------------------- text-encoder outputs


def check_text_encoder_cache(cfg) -> None:
    """The text-encoder output cache holds one encoding per caption: it is wrong whenever a caption's
    encoding changes during training. Refuse those combinations before anything is loaded."""
    if not getattr(cfg, "cache_text_encoder_outputs", False):
        return
    from ..errors import ConfigError

    reasons = []
    if cfg.train_text_encoder:
        reasons.append("train_text_encoder is on (the encoders' LoRA changes their outputs every step)")
    if cfg.shuffle_caption:
        reasons.append("shuffle_caption is on (the caption changes every step)")
    if cfg.caption_dropout_rate > 0:
        reasons.append("caption_dropout_rate is above 0")
    if cfg.caption_tag_dropout_rate > 0:
        reasons.append("caption_tag_dropout_rate is above 0")
    if reasons:
        raise ConfigError(
            "cache_text_encoder_outputs",
            True,
            "off, or train_text_encoder, shuffle_caption and caption dropout off: cached captions cannot change, but "
            + "; ".join(reasons),
        )


@torch.no_grad()
def build_text_encoder_cache(encode_text: Callable, captions: list[str]) -> dict[str, object]:
    """One ``encode_text`` output per distinct caption (batch of one), computed once without grad."""
    out: dict[str, object] = {}
    for c in captions:
        if c not in out:
            cond = encode_text([c])
            out[c] = cond.detach() if hasattr(cond, "detach") else cond
    return out
