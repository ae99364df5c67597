"""Aspect-ratio buckets (kohya's ``enable_bucket``) and the geometry of every training image.

Each image is trained at a bucket: a width x height, both multiples of ``bucket_reso_steps``,
whose area is at most ``resolution``\\ :sup:`2` and whose sides lie within
``[min_bucket_reso, max_bucket_reso]``. The image is resized to *cover* its bucket (never
stretched) and centre-cropped; what the crop cuts away is reported before training, image by
image. Batches are drawn within one bucket.

With several processes (``accelerate launch``, torchrun) every process builds the same epoch plan
(:func:`epoch_order` is seeded by the seed and the epoch only, never the rank) and trains a share
of its bucket batches (:func:`shard_batches`): batch ``k`` goes to process ``k % world_size``, and
every process gets ``ceil(batches / world_size)`` of them, so all take the same number of optimizer
steps (a process with fewer would skip a gradient all-reduce the others wait for: a hang). When
the count does not divide, the last round is padded by repeating batches from the start of that
epoch's plan, as torch's ``DistributedSampler`` and accelerate's ``even_batches`` (what kohya's
sd-scripts get) do; those few batches are trained once more that epoch. The bucket report says so.

Without buckets every image is resized so its short side is ``resolution`` and centre-cropped to
a square (:func:`lora_trainer.dataset.images.resize_and_crop`); :func:`square_geometry` gives the
same numbers, for SDXL's size conditioning.

The geometry of an image is ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` in
pixels: its size after EXIF rotation, the top-left corner of the crop in the resized image, and
the bucket. SDXL turns it into ``time_ids``; SD1/SD2 ignore it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import DatasetError
from .images import to_rgb

Geometry = tuple[int, int, int, int, int, int]
_EXIF_ORIENTATION = 0x0112


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as the image is shown, i.e. after its EXIF orientation; reads the header only."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # noqa: BLE001 - broken EXIF: the stored orientation is used (as load_image does)
                orientation = 1
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds
        raise DatasetError(
            path, f"the image cannot be read ({str(e) or type(e).__name__})", "Re-export it from an image editor, or delete it"
        ) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """All (width, height) buckets: sides multiples of ``step`` within [min_reso, max_reso], area at
    most ``resolution``\\ :sup:`2`, each width with the largest height that fits (and its transpose)."""
    if step < 1 or min_reso > max_reso:
        raise ValueError(f"bad bucket settings: min {min_reso}, max {max_reso}, step {step}")
    max_area = resolution * resolution
    side = max(step, resolution // step * step)
    out: set[tuple[int, int]] = {(side, side)}
    w = max(step, math.ceil(min_reso / step) * step)
    while w <= max_reso:
        h = min(max_reso, (max_area // w) // step * step)
        if h >= min_reso and h >= step:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def choose_bucket(
    width: int, height: int, buckets: list[tuple[int, int]], resolution: int, step: int, no_upscale: bool
) -> tuple[int, int]:
    """The bucket of an image: the one whose aspect ratio is closest (in log space). With
    ``no_upscale``, an image smaller than the bucket area gets a bucket of its own size rounded down
    to ``step`` (it is never enlarged)."""
    if no_upscale and width * height <= resolution * resolution:
        bw = max(step, width // step * step)
        bh = max(step, height // step * step)
        return bw, bh
    ar = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -(b[0] * b[1])))


def cover_geometry(width: int, height: int, bw: int, bh: int) -> tuple[int, int, int, int]:
    """Resize (width, height) so it covers (bw, bh), keeping its aspect ratio; centre crop.
    Returns (resized_w, resized_h, crop_left, crop_top)."""
    scale = max(bw / width, bh / height)
    rw = max(bw, round(width * scale))
    rh = max(bh, round(height * scale))
    return rw, rh, (rw - bw) // 2, (rh - bh) // 2


def square_geometry(width: int, height: int, resolution: int) -> Geometry:
    """The geometry :func:`resize_and_crop` produces (short side to ``resolution``, centre square)."""
    if (width, height) == (resolution, resolution):
        return (height, width, 0, 0, resolution, resolution)
    scale = resolution / min(width, height)
    rw = max(resolution, round(width * scale))
    rh = max(resolution, round(height * scale))
    return (height, width, (rh - resolution) // 2, (rw - resolution) // 2, resolution, resolution)


def load_cropped(path: str | Path, geometry: Geometry, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open ``path`` (EXIF rotation, any mode to RGB) and cut the crop ``geometry`` describes."""
    path = Path(path)
    oh, ow, top, left, th, tw = geometry
    try:
        with Image.open(path) as im:
            im.load()
            try:
                img = ImageOps.exif_transpose(im) or im
            except Exception:  # noqa: BLE001
                img = im
            img = to_rgb(img, background)
            img.load()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DatasetError(
            path, f"the image cannot be read ({str(e) or type(e).__name__})", "Re-export it from an image editor, or delete it"
        ) from None
    if img.size != (ow, oh):
        raise DatasetError(path, f"the image changed while training ({img.size[0]}x{img.size[1]}, planned {ow}x{oh})", "Restart training")
    rw, rh, _, _ = cover_geometry(ow, oh, tw, th)
    if (rw, rh) != (ow, oh):
        img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    return img.crop((left, top, left + tw, top + th))


def epoch_order(samples: list[int], seed: int, epoch: int) -> list[int]:
    """The shuffled samples (image indices, repeats included) of one epoch: the same on every
    process, since only the seed and the epoch seed it."""
    import torch  # here: importing the dataset package does not import torch

    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return [samples[i] for i in torch.randperm(len(samples), generator=gen).tolist()]


def batches_per_process(num_batches: int, world_size: int) -> int:
    """Batches each process trains per epoch when ``num_batches`` are shared by ``world_size`` processes."""
    return math.ceil(num_batches / world_size) if world_size > 1 else num_batches


def padding_batches(num_batches: int, world_size: int) -> int:
    """Batches repeated from the start of the epoch's plan so every process gets as many."""
    return batches_per_process(num_batches, world_size) * max(world_size, 1) - num_batches


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Process ``rank``'s share of one epoch's batches: every ``world_size``-th batch, starting at
    ``rank``. Every process gets ``ceil(len(batches) / world_size)``: the list is first padded with
    its own first batches (wrapping round when it is shorter than ``world_size``), so the shares
    are disjoint except for the :func:`padding_batches` of the last round."""
    if world_size <= 1:
        return list(batches)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if not batches:
        return []
    pad = padding_batches(len(batches), world_size)
    padded = list(batches) + (list(batches) * (pad // len(batches) + 1))[:pad]
    return padded[rank::world_size]


def sharing_rule(num_batches: int, world_size: int) -> str:
    """How one epoch's batches are shared by the processes, in words (the bucket report's last line)."""
    per = batches_per_process(num_batches, world_size)
    pad = padding_batches(num_batches, world_size)
    text = (
        f"{world_size} processes: the {num_batches} bucket batches of each epoch (the same plan on every process) "
        f"are dealt out in turn, batch k to process k mod {world_size}: {per} batches per process"
    )
    if pad:
        if pad == 1:
            again = "the epoch's first batch again"
        elif pad <= num_batches:
            again = f"the epoch's first {pad} batches again"
        else:
            again = f"{pad} batches repeated from the start of the epoch's plan, wrapping round"
        text += (
            f"; {num_batches} is not a multiple of {world_size}, so the last round is padded with {again} "
            "(trained once more that epoch, as a distributed sampler does)"
        )
    return text


@dataclass
class ImagePlan:
    """How one image is trained."""

    path: Path
    bucket: tuple[int, int]
    """(width, height) of the training crop."""
    geometry: Geometry
    cropped_fraction: float
    """Share of the (resized) image the crop cuts away, 0..1."""


@dataclass
class BucketPlan:
    enabled: bool
    images: list[ImagePlan]
    buckets: list[tuple[int, int]] = field(default_factory=list)
    """Every candidate bucket (empty when buckets are off)."""

    def by_bucket(self, indices: list[int] | None = None) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(len(self.images)) if indices is None else indices:
            groups[self.images[i].bucket].append(i)
        return dict(sorted(groups.items()))

    def batches(self, order: list[int], batch_size: int) -> list[list[int]]:
        """Cut ``order`` (image indices, repeats included) into batches that never mix buckets. Within a
        bucket the order is kept; batches of different buckets are interleaved in the order their
        first image appears. With one bucket this is plain chunking of ``order``."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i in order:
            groups.setdefault(self.images[i].bucket, []).append(i)
        per_bucket = [[g[j : j + batch_size] for j in range(0, len(g), batch_size)] for g in groups.values()]
        if len(per_bucket) <= 1:
            return per_bucket[0] if per_bucket else []
        # deterministic interleave: round robin over buckets, in first-seen order
        out: list[list[int]] = []
        k = 0
        while any(per_bucket):
            lst = per_bucket[k % len(per_bucket)]
            if lst:
                out.append(lst.pop(0))
            k += 1
        return out

    def epoch_batches(self, order: list[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """This process's batches of the epoch whose samples are ``order`` (the same on every
        process): :meth:`batches` of all of it, shared out by :func:`shard_batches`."""
        return shard_batches(self.batches(order, batch_size), rank, world_size)

    def num_batches(self, counts: dict[int, int], batch_size: int) -> int:
        """Batches per epoch when image ``i`` appears ``counts[i]`` times."""
        per: dict[tuple[int, int], int] = defaultdict(int)
        for i, n in counts.items():
            per[self.images[i].bucket] += n
        return sum(math.ceil(n / batch_size) for n in per.values())

    def info(self) -> dict:
        """kohya's ``ss_bucket_info``: {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}."""
        groups = self.by_bucket()
        errors = []
        for p in self.images:
            oh, ow = p.geometry[0], p.geometry[1]
            errors.append(abs(ow / oh - p.bucket[0] / p.bucket[1]))
        return {
            "buckets": {str(i): {"resolution": list(b), "count": len(v)} for i, (b, v) in enumerate(groups.items())},
            "mean_img_ar_error": sum(errors) / max(len(errors), 1),
        }

    def report(self, repeats: list[int] | None = None, world_size: int = 1, num_batches: int = 0) -> str:
        """One block per bucket listing every image, its original size and what its crop cuts away;
        with several processes, how the ``num_batches`` batches of an epoch are shared out."""
        if not self.enabled:
            return ""
        groups = self.by_bucket()
        lines = [f"aspect-ratio buckets: {len(self.images)} images in {len(groups)} buckets"]
        for (bw, bh), idx in groups.items():
            n = sum(repeats[i] for i in idx) if repeats else len(idx)
            lines.append(f"  bucket {bw}x{bh}: {len(idx)} images ({n} samples with repeats)")
            for i in idx:
                p = self.images[i]
                oh, ow = p.geometry[0], p.geometry[1]
                cut = f", crop cuts away {p.cropped_fraction:.0%}" if p.cropped_fraction >= 0.005 else ""
                lines.append(f"    {p.path.name} ({ow}x{oh}{cut})")
        if world_size > 1:
            lines.append(f"  {sharing_rule(num_batches, world_size)}")
        return "\n".join(lines)


def plan_buckets(
    paths: list[Path],
    resolution: int,
    enable_bucket: bool = False,
    min_reso: int = 256,
    max_reso: int = 1024,
    step: int = 64,
    no_upscale: bool = False,
) -> BucketPlan:
    """The bucket and crop of every image (in order). Every image gets a bucket: none is dropped."""
    buckets = make_buckets(resolution, min(min_reso, resolution), max(max_reso, resolution), step) if enable_bucket else []
    images = []
    for p in paths:
        w, h = image_size(p)
        if enable_bucket:
            bw, bh = choose_bucket(w, h, buckets, resolution, step, no_upscale)
            rw, rh, left, top = cover_geometry(w, h, bw, bh)
            geom: Geometry = (h, w, top, left, bh, bw)
        else:
            geom = square_geometry(w, h, resolution)
            bw = bh = resolution
            scale = resolution / min(w, h)
            rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        cropped = 1.0 - (bw * bh) / (rw * rh)
        images.append(ImagePlan(Path(p), (bw, bh), geom, max(0.0, cropped)))
    return BucketPlan(enable_bucket, images, buckets)


def check_bucket_config(cfg) -> None:
    """Refuse bucket settings that leave no bucket, before anything is loaded."""
    if not getattr(cfg, "enable_bucket", False):
        return
    from ..errors import ConfigError

    if cfg.min_bucket_reso > cfg.max_bucket_reso:
        raise ConfigError(
            "min_bucket_reso", cfg.min_bucket_reso, f"at most max_bucket_reso ({cfg.max_bucket_reso})"
        )
    if cfg.bucket_reso_steps > cfg.max_bucket_reso:
        raise ConfigError("bucket_reso_steps", cfg.bucket_reso_steps, f"at most max_bucket_reso ({cfg.max_bucket_reso})")
