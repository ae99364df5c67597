"""Square crops for training: around the largest face, centred, or padded; enlarged only when too small.

Face detection uses OpenCV's bundled Haar cascade (``opencv-python-headless<5``: 5.x ships no
cascade files). It is optional: without cv2 :func:`detect_faces` raises
:class:`~lora_trainer.errors.MissingPackageError`, and :func:`crop_images` can still centre-crop
or pad. Sources are only read. Inside a WebUI the host's upscalers (ESRGAN ...) can be passed as
``upscaler``; the default enlarges with Pillow's LANCZOS. Does not import torch.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DatasetError, LoraTrainerError, MissingPackageError
from .images import parse_color, to_rgb

Box = tuple[int, int, int, int]  # x, y, width, height
Upscaler = Callable[[Image.Image, float], Image.Image]
"""``upscaler(image, scale) -> image`` about ``scale`` times larger (A1111's ``upscaler.scaler.upscale`` shape)."""

CASCADE_FILE = "haarcascade_frontalface_default.xml"
_DETECT_MAX_SIDE = 1024
CROP_MODES = ("face", "center", "pad")


def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingPackageError("cv2", "Face detection", "'opencv-python-headless>=4.8,<5'") from None
    return cv2


def faces_available() -> bool:
    """True when OpenCV and its bundled Haar cascade are there."""
    try:
        _cascade()
    except LoraTrainerError:
        return False
    return True


@lru_cache(maxsize=1)
def _cascade():
    cv2 = _cv2()
    base = getattr(getattr(cv2, "data", None), "haarcascades", "") or ""
    path = os.path.join(base, CASCADE_FILE)
    if not os.path.isfile(path):
        raise LoraTrainerError(
            f"OpenCV {cv2.__version__} has no bundled face cascade ({CASCADE_FILE}); OpenCV 5 ships none. "
            "Install it with: pip install 'opencv-python-headless>=4.8,<5'"
        )
    clf = cv2.CascadeClassifier(path)
    if clf.empty():
        raise LoraTrainerError(f"{path}: OpenCV cannot read this face cascade. Reinstall opencv-python-headless<5")
    return clf


def detect_faces(img: Image.Image, min_face_fraction: float = 0.05) -> list[Box]:
    """Frontal faces as ``(x, y, w, h)`` in ``img``'s pixels, largest first.

    Faces smaller than ``min_face_fraction`` of the short side are ignored (Haar cascades see
    faces in textures; tiny ones are mostly those). Large images are searched at 1024 px.
    """
    cv2 = _cv2()
    clf = _cascade()
    grey = img.convert("L")
    scale = 1.0
    if max(grey.size) > _DETECT_MAX_SIDE:
        scale = _DETECT_MAX_SIDE / max(grey.size)
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.Resampling.BILINEAR)
    arr = cv2.equalizeHist(np.asarray(grey, dtype=np.uint8))
    min_side = max(20, int(min(arr.shape) * min_face_fraction))
    found = clf.detectMultiScale(arr, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    boxes = [tuple(int(round(v / scale)) for v in b) for b in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)  # type: ignore[return-value]


def open_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open an image upright (EXIF orientation applied) as RGB; DatasetError when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            try:
                img = ImageOps.exif_transpose(im) or im
            except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
                img = im
            out = to_rgb(img, background)
            out.load()
            return out
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError ...
        raise DatasetError(path, f"the image cannot be read ({str(e) or type(e).__name__})", "Re-export it or leave it out") from None


def _color(color: str | tuple[int, int, int]) -> tuple[int, int, int]:
    return parse_color(color) if isinstance(color, str) else tuple(int(c) for c in color)  # type: ignore[return-value]


def pad_to_square(img: Image.Image, color: str | tuple[int, int, int] = "#ffffff") -> Image.Image:
    """The whole image centred on a square canvas of ``color`` (nothing cut off)."""
    w, h = img.size
    side = max(w, h)
    if w == h:
        return img.copy()
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    canvas = Image.new("RGB", (side, side), _color(color))
    canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return canvas


def center_square_crop(img: Image.Image) -> Image.Image:
    """The centre square of side ``min(width, height)``."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def fit_square(img: Image.Image, size: int, upscaler: Upscaler | None = None) -> tuple[Image.Image, bool]:
    """Resize a square image to ``size`` x ``size``; returns ``(image, enlarged)``.

    Larger images are reduced with LANCZOS. Smaller ones are enlarged, with ``upscaler`` when
    given (its result is then brought to the exact size with LANCZOS), else with LANCZOS.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    if img.width != img.height:
        raise ValueError(f"fit_square needs a square image, got {img.width}x{img.height}")
    if img.width == size:
        return img, False
    if img.width > size:
        return img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0), False
    out = img
    if upscaler is not None:
        out = upscaler(img, size / img.width)
        if out.mode != "RGB":
            out = out.convert("RGB")
    if out.size != (size, size):
        out = out.resize((size, size), Image.Resampling.LANCZOS)
    return out, True


def enlarge_to(img: Image.Image, min_side: int, upscaler: Upscaler | None = None) -> tuple[Image.Image, bool]:
    """Enlarge so the short side is at least ``min_side``; an image already that large is returned as is."""
    w, h = img.size
    if min(w, h) >= min_side:
        return img, False
    scale = min_side / min(w, h)
    target = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
    out = upscaler(img, scale) if upscaler is not None else img
    if out.size != target:
        out = out.resize(target, Image.Resampling.LANCZOS)
    return out, True


@dataclass
class CropResult:
    """One square crop: the image and how it was made."""

    image: Image.Image
    crop_box: tuple[int, int, int, int]  # left, top, right, bottom in the source image
    face: Box | None = None
    faces: int = 0
    fell_back: bool = False
    enlarged: bool = False
    margin: float | None = None  # achieved margin around the face (smaller than asked when the image is too small)


def face_crop_box(width: int, height: int, face: Box, margin: float) -> tuple[tuple[int, int, int, int], float]:
    """The square ``(left, top, right, bottom)`` around ``face`` and the margin it achieves.

    The side is ``face_size x (1 + 2 x margin)`` (``face_size`` = the larger side of the face box):
    ``margin`` is the room left on each side of the face, in face sizes (about 0.3: the head only;
    about 1.5: head and shoulders). The square is centred on the face, moved inside the image where
    it sticks out, and made smaller when the image cannot hold it.
    """
    if margin < 0:
        raise ValueError(f"margin must not be negative, got {margin}")
    x, y, w, h = face
    face_size = max(w, h)
    side = int(round(face_size * (1 + 2 * margin)))
    side = max(face_size, min(side, width, height))
    cx, cy = x + w / 2.0, y + h / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    left = min(max(0, left), width - side)
    top = min(max(0, top), height - side)
    achieved = (side / face_size - 1) / 2
    return (left, top, left + side, top + side), achieved


def face_square_crop(
    img: Image.Image,
    margin: float = 0.5,
    size: int = 512,
    *,
    upscaler: Upscaler | None = None,
    face: Box | None = None,
) -> CropResult:
    """A ``size`` x ``size`` RGB crop around the largest face (see :func:`face_crop_box` for ``margin``).

    Without a face it falls back to the centre square (``fell_back`` is then True). Enlarges only a
    crop smaller than ``size`` (``enlarged``), with ``upscaler`` when given.
    """
    rgb = img if img.mode == "RGB" else to_rgb(img)
    faces = [face] if face is not None else detect_faces(rgb)
    if faces:
        box, achieved = face_crop_box(rgb.width, rgb.height, faces[0], margin)
        square = rgb.crop(box)
        out, enlarged = fit_square(square, size, upscaler)
        return CropResult(out, box, faces[0], len(faces), False, enlarged, achieved)
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    out, enlarged = fit_square(rgb.crop(box), size, upscaler)
    return CropResult(out, box, None, 0, True, enlarged, None)


@dataclass
class CropReport:
    """What :func:`crop_images` wrote."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)
    fell_back: list[Path] = field(default_factory=list)  # sources without a face: centre-cropped
    enlarged: list[Path] = field(default_factory=list)  # sources whose crop was smaller than the size
    several_faces: list[Path] = field(default_factory=list)  # sources with more than one face (largest used)
    captions: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.written)} images written to {self.out_dir}"]
        for label, items in (
            ("no face found, centre-cropped instead", self.fell_back),
            ("enlarged (smaller than the target size)", self.enlarged),
            ("several faces, the largest used", self.several_faces),
        ):
            if items:
                names = ", ".join(p.name for p in items[:10]) + (" ..." if len(items) > 10 else "")
                lines.append(f"{len(items)} {label}: {names}")
        return "\n".join(lines)


def crop_images(
    sources: Iterable[str | Path] | str | Path,
    out_dir: str | Path,
    mode: str = "face",
    size: int = 512,
    margin: float = 0.5,
    color: str | tuple[int, int, int] = "#ffffff",
    *,
    upscaler: Upscaler | None = None,
    caption_extension: str = ".txt",
    copy_captions: bool = True,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CropReport:
    """Crop (``face`` / ``center``) or pad (``pad``) every image into ``out_dir`` as ``<stem>.png``.

    Same-stem captions are copied along. An existing output file is never replaced unless
    ``overwrite`` (all names are checked before the first is written). The sources are only read.
    """
    from .prepare import list_images

    if mode not in CROP_MODES:
        raise ValueError(f"mode must be one of {CROP_MODES}, got {mode!r}")
    paths = list_images(sources)
    out = Path(out_dir).expanduser()
    if not paths:
        raise DatasetError(sources if isinstance(sources, (str, Path)) else "images", "no images found", "Pick a folder with images")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    targets = [out / f"{p.stem}.png" for p in paths]
    dup = {t.name for t in targets if targets.count(t) > 1}
    if dup:
        raise DatasetError(out, f"several sources would become {', '.join(sorted(dup))}", "Rename them first")
    if not overwrite:
        existing = [t.name for t in targets if t.exists()]
        existing += [t.with_suffix(ext).name for p, t in zip(paths, targets) if copy_captions and p.with_suffix(ext).is_file() and t.with_suffix(ext).exists()]
        if existing:
            raise DatasetError(
                out,
                f"{len(existing)} output files exist already: " + ", ".join(existing[:10]) + (" ..." if len(existing) > 10 else ""),
                "Pick an empty output folder or allow overwriting; nothing was written",
            )
    if mode == "face":
        _cascade()  # fail before the first file when OpenCV is missing
    out.mkdir(parents=True, exist_ok=True)
    report = CropReport(out_dir=out)
    bg = _color(color)
    for i, (src, target) in enumerate(zip(paths, targets)):
        img = open_rgb(src, bg)
        if mode == "face":
            res = face_square_crop(img, margin, size, upscaler=upscaler)
            result, enlarged = res.image, res.enlarged
            if res.fell_back:
                report.fell_back.append(src)
            if res.faces > 1:
                report.several_faces.append(src)
        elif mode == "center":
            result, enlarged = fit_square(center_square_crop(img), size, upscaler)
        else:
            result, enlarged = fit_square(pad_to_square(img, bg), size, upscaler)
        if enlarged:
            report.enlarged.append(src)
        tmp = target.with_name(f".{target.name}.tmp")
        result.save(tmp, "PNG")
        os.replace(tmp, target)
        report.written.append(target)
        cap = src.with_suffix(ext)
        if copy_captions and cap.is_file():
            shutil.copyfile(cap, target.with_suffix(ext))
            report.captions.append(target.with_suffix(ext))
        if progress is not None:
            progress(i + 1, len(paths))
    return report
