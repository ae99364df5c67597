"""A dataset report: what is in a folder of training images, and what will hurt training.

Image count, sizes and aspect ratios, images below the training resolution, near-duplicates
(a 64-bit average hash), blurry images (variance of a Laplacian), missing captions, unusual
modes (CMYK, 16-bit, transparency) and, when OpenCV is installed, faces per image. Only reads:
no file is written, renamed or touched. Does not import torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .images import to_rgb

BLUR_THRESHOLD = 60.0
"""Laplacian variance (grey 0-255, image scaled to 512 px on its long side) under which an image counts as blurry."""
DUPLICATE_DISTANCE = 4
"""Average hashes (64 bits) at most this many bits apart are near-duplicates."""
_ANALYSIS_SIDE = 512
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")

HEADERS = ["file", "size", "aspect", "mode", "caption", "sharpness", "faces", "issues"]


def average_hash(img: Image.Image, hash_size: int = 8) -> int:
    """A ``hash_size**2``-bit average hash: grey thumbnail, each pixel above the mean is a 1 bit."""
    small = img.convert("L").resize((hash_size, hash_size), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float64)
    bits = (arr > arr.mean()).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def laplacian_variance(img: Image.Image, max_side: int = _ANALYSIS_SIDE) -> float:
    """Sharpness: the variance of the 4-neighbour Laplacian of the grey image at ``max_side`` px.

    Scaling first makes the value comparable between a phone photo and a small crop.
    """
    grey = img.convert("L")
    if max(grey.size) > max_side:
        s = max_side / max(grey.size)
        grey = grey.resize((max(3, round(grey.width * s)), max(3, round(grey.height * s))), Image.Resampling.BOX)
    a = np.asarray(grey, dtype=np.float64)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4.0 * a[1:-1, 1:-1]
    return float(lap.var())


@dataclass
class ImageInfo:
    path: Path
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    caption: Path | None = None
    sharpness: float | None = None
    ahash: int | None = None
    faces: int | None = None
    issues: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def aspect(self) -> float:
        return self.width / self.height if self.height else 0.0


@dataclass
class DatasetReport:
    root: Path | None
    resolution: int
    images: list[ImageInfo]
    duplicates: list[tuple[Path, Path, int]]
    faces_checked: bool
    caption_extension: str
    blur_threshold: float

    # ---- selections
    def below_resolution(self) -> list[ImageInfo]:
        return [i for i in self.images if i.error is None and min(i.width, i.height) < self.resolution]

    def blurry(self) -> list[ImageInfo]:
        return [i for i in self.images if i.sharpness is not None and i.sharpness < self.blur_threshold]

    def missing_captions(self) -> list[ImageInfo]:
        return [i for i in self.images if i.error is None and i.caption is None]

    def unreadable(self) -> list[ImageInfo]:
        return [i for i in self.images if i.error is not None]

    def unusual_modes(self) -> list[ImageInfo]:
        return [i for i in self.images if any(s.startswith("mode:") for s in i.issues)]

    # ---- views
    def summary(self) -> str:
        ok = [i for i in self.images if i.error is None]
        lines = [f"{len(self.images)} images" + (f" in {self.root}" if self.root else "")]
        if ok:
            ws, hs = [i.width for i in ok], [i.height for i in ok]
            square = sum(0.9 <= i.aspect <= 1.1 for i in ok)
            portrait = sum(i.aspect < 0.9 for i in ok)
            lines.append(
                f"sizes: {min(ws)}-{max(ws)} x {min(hs)}-{max(hs)} px; aspect: {square} square, {portrait} portrait, "
                f"{len(ok) - square - portrait} landscape"
            )
        for label, items in (
            (f"below {self.resolution} px on the short side (will be enlarged)", self.below_resolution()),
            (f"blurry (sharpness under {self.blur_threshold:g})", self.blurry()),
            (f"without a {self.caption_extension} caption", self.missing_captions()),
            ("in an unusual mode (converted when training)", self.unusual_modes()),
            ("unreadable", self.unreadable()),
        ):
            if items:
                names = ", ".join(i.path.name for i in items[:8]) + (" ..." if len(items) > 8 else "")
                lines.append(f"{len(items)} {label}: {names}")
        if self.duplicates:
            pairs = "; ".join(f"{a.name} ~ {b.name}" for a, b, _ in self.duplicates[:8])
            lines.append(f"{len(self.duplicates)} near-duplicate pairs: {pairs}" + (" ..." if len(self.duplicates) > 8 else ""))
        if self.faces_checked:
            no_face = [i for i in ok if i.faces == 0]
            several = [i for i in ok if (i.faces or 0) > 1]
            lines.append(f"faces: {len(ok) - len(no_face) - len(several)} with one, {len(no_face)} with none, {len(several)} with several")
        else:
            lines.append("faces: not checked (install opencv-python-headless<5)")
        return "\n".join(lines)

    def rows(self) -> list[list[Any]]:
        """One row per image for a table (columns: :data:`HEADERS`)."""
        out = []
        for i in self.images:
            rel = str(i.path.relative_to(self.root)) if self.root and i.path.is_relative_to(self.root) else str(i.path)
            out.append(
                [
                    rel,
                    f"{i.width}x{i.height}" if i.error is None else "-",
                    round(i.aspect, 2),
                    i.mode,
                    "yes" if i.caption else "no",
                    "-" if i.sharpness is None else round(i.sharpness, 1),
                    "-" if i.faces is None else i.faces,
                    "; ".join(i.issues),
                ]
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root) if self.root else None,
            "resolution": self.resolution,
            "images": [
                {
                    "path": str(i.path),
                    "width": i.width,
                    "height": i.height,
                    "mode": i.mode,
                    "format": i.format,
                    "caption": str(i.caption) if i.caption else None,
                    "sharpness": i.sharpness,
                    "faces": i.faces,
                    "issues": i.issues,
                    "error": i.error,
                }
                for i in self.images
            ],
            "duplicates": [[str(a), str(b), d] for a, b, d in self.duplicates],
            "summary": self.summary(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _mode_issue(im: Image.Image) -> str | None:
    mode = im.mode
    if mode == "CMYK":
        return "mode: CMYK"
    if mode in _SIXTEEN_BIT:
        return "mode: 16-bit"
    if mode == "F":
        return "mode: 32-bit float"
    if mode == "1":
        return "mode: 1-bit"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        try:
            alpha = im.convert("RGBA").getchannel("A")
            if alpha.getextrema()[0] < 255:
                return "mode: transparency (composed over alpha_background)"
        except Exception:  # noqa: BLE001
            return None
    return None


def _inspect(path: Path, resolution: int, cap_ext: str, faces: bool, blur_threshold: float) -> ImageInfo:
    info = ImageInfo(path=path)
    cap = path.with_name(path.stem + cap_ext)
    info.caption = cap if cap.is_file() else None
    try:
        with Image.open(path) as im:
            info.format = im.format or ""
            info.mode = im.mode
            if im.format == "JPEG":
                im.draft("RGB", (2 * _ANALYSIS_SIDE, 2 * _ANALYSIS_SIDE))  # decode smaller: we analyse at 512 px
            im.load()
            issue = _mode_issue(im)
            try:
                upright = ImageOps.exif_transpose(im) or im
            except Exception:  # noqa: BLE001
                upright = im
            rgb = to_rgb(upright)
            if max(rgb.size) > _ANALYSIS_SIDE:
                rgb = rgb.copy()
                rgb.thumbnail((_ANALYSIS_SIDE, _ANALYSIS_SIDE), Image.Resampling.BOX)
        # the size as trained: the header's, turned by the EXIF orientation
        with Image.open(path) as im2:
            w, h = im2.size
            try:
                orient = im2.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001
                orient = 1
        info.width, info.height = (h, w) if orient in (5, 6, 7, 8) else (w, h)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types
        info.error = str(e) or type(e).__name__
        info.issues.append(f"unreadable: {info.error}")
        return info
    if issue:
        info.issues.append(issue)
    if min(info.width, info.height) < resolution:
        info.issues.append(f"below {resolution} px")
    a = info.aspect
    if a > 2.0 or a < 0.5:
        info.issues.append("extreme aspect ratio (a square crop loses much)")
    info.sharpness = laplacian_variance(rgb)
    if info.sharpness < blur_threshold:
        info.issues.append(f"blurry (sharpness {info.sharpness:.0f})")
    info.ahash = average_hash(rgb)
    if info.caption is None:
        info.issues.append("no caption")
    if faces:
        from .faces import detect_faces

        n = len(detect_faces(rgb))
        info.faces = n
        if n == 0:
            info.issues.append("no face found")
        elif n > 1:
            info.issues.append(f"{n} faces")
    return info


def dataset_report(
    source: str | Path | Iterable[str | Path],
    resolution: int = 512,
    caption_extension: str = ".txt",
    faces: bool | None = None,
    blur_threshold: float = BLUR_THRESHOLD,
    duplicate_distance: int = DUPLICATE_DISTANCE,
    recursive: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetReport:
    """Inspect a folder (sub-folders too, so a raw folder and a kohya ``img/`` folder both work) or a list of images.

    ``faces``: count faces (needs OpenCV); ``None`` counts them when OpenCV is installed.
    """
    from .layout import IMAGE_EXTENSIONS
    from .prepare import CONVERTIBLE_EXTENSIONS

    if isinstance(source, (str, Path)):
        root: Path | None = Path(source).expanduser()
        if not root.is_dir():
            from ..errors import DatasetError

            raise DatasetError(root, "no such folder", "Give the folder that holds the images")
        exts = IMAGE_EXTENSIONS + CONVERTIBLE_EXTENSIONS
        it = root.rglob("*") if recursive else root.iterdir()
        paths = sorted(
            (p for p in it if p.is_file() and p.suffix.lower() in exts and not any(part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: str(p).lower(),
        )
    else:
        root = None
        paths = [Path(p) for p in source]
    if faces is None:
        from .faces import faces_available

        faces = faces_available()
    elif faces:
        from .faces import _cascade

        _cascade()  # MissingPackageError now, not per image
    cap_ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    infos = []
    for n, p in enumerate(paths):
        infos.append(_inspect(p, resolution, cap_ext, faces, blur_threshold))
        if progress is not None:
            progress(n + 1, len(paths))
    dups: list[tuple[Path, Path, int]] = []
    hashed = [i for i in infos if i.ahash is not None]
    for x in range(len(hashed)):
        for y in range(x + 1, len(hashed)):
            d = hamming(hashed[x].ahash, hashed[y].ahash)  # type: ignore[arg-type]
            if d <= duplicate_distance:
                dups.append((hashed[x].path, hashed[y].path, d))
                hashed[y].issues.append(f"near-duplicate of {hashed[x].path.name}")
    return DatasetReport(
        root=root,
        resolution=resolution,
        images=infos,
        duplicates=dups,
        faces_checked=bool(faces),
        caption_extension=cap_ext,
        blur_threshold=blur_threshold,
    )
