"""Load a training image: EXIF orientation, any mode to RGB, resize and centre-crop to a square.

torch is imported only inside :func:`image_to_tensor`.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError, DatasetError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_HEX_RE = re.compile(r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS")


def parse_color(value: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` (or ``"#rgb"``, with or without ``#``) to an ``(r, g, b)`` tuple of 0-255."""
    m = _HEX_RE.match(str(value).strip())
    if not m:
        raise ConfigError("alpha_background", value, "a colour as #rrggbb, e.g. #ffffff")
    digits = m.group(1)
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    r, g, b = (int(digits[i : i + 2], 16) for i in (0, 2, 4))
    return r, g, b


def _to_uint8_from_array(arr: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map a single-channel numeric array to uint8.

    ``full_scale`` is the value that maps to 255 (65535 for 16-bit); ``None`` means "guess":
    [0, 1] floats are scaled by 255, values within [0, 255] are kept, anything else is
    stretched from its minimum to its maximum.
    """
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if full_scale is not None and a.size and a.min() >= 0 and a.max() <= full_scale:
        scaled = a * (255.0 / full_scale)
    elif full_scale is None and a.size and a.min() >= 0 and a.max() <= 1.0:
        scaled = a * 255.0
    elif full_scale is None and a.size and a.min() >= 0 and a.max() <= 255.0:
        scaled = a
    else:
        lo = float(a.min()) if a.size else 0.0
        hi = float(a.max()) if a.size else 0.0
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:  # use the embedded profile when Pillow has LittleCMS; the plain formula is a fallback
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # noqa: BLE001 - a broken profile must not stop training
            return img.convert("RGB")
    return img.convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels are composed over ``background``."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(img)
        full_scale = 65535.0
        grey = _to_uint8_from_array(arr, full_scale)
        img = Image.fromarray(grey, mode="L")
        mode = "L"
    elif mode == "F":
        grey = _to_uint8_from_array(np.asarray(img), None)
        img = Image.fromarray(grey, mode="L")
        mode = "L"
    elif mode == "1":
        img = img.convert("L")
        mode = "L"
    elif mode == "CMYK":
        return _cmyk_to_rgb(img)

    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def resize_and_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize (LANCZOS) so the short side is ``resolution``, then crop the centre square."""
    if resolution < 1:
        raise ValueError(f"resolution must be at least 1, got {resolution}")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw = max(resolution, round(w * scale))
        nh = max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        left = (nw - resolution) // 2
        top = (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def load_image(
    path: str | Path,
    resolution: int,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Open ``path`` and return an RGB ``resolution`` x ``resolution`` image ready for training."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            img = im
            try:
                img = ImageOps.exif_transpose(im) or im
            except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
                img = im
            img = to_rgb(img, background)
            img.load()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise DatasetError(
            path,
            f"the image cannot be read ({str(e) or type(e).__name__})",
            "Re-export it from an image editor (or re-download it), or delete it",
        ) from None
    return resize_and_crop(img, resolution)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image to a float32 tensor of shape (3, H, W) with values in [-1, 1]."""
    import torch

    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8, copy=True)
    t = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32)
    return (t / 127.5 - 1.0).contiguous()
