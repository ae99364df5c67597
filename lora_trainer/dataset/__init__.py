"""Dataset folders (kohya layout), image loading, caption augmentation and step arithmetic.

Importing this package does not import torch; :func:`image_to_tensor` imports it when called.
"""

from .captions import process_caption, split_tags
from .images import image_to_tensor, load_image, parse_color, resize_and_crop, to_rgb
from .layout import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    DatasetScan,
    ImageEntry,
    Subset,
    scan_dataset,
    verify_images,
)
from .steps import describe_steps, steps_per_epoch, total_steps

__all__ = [
    "CAPTION_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "DatasetScan",
    "ImageEntry",
    "Subset",
    "describe_steps",
    "image_to_tensor",
    "load_image",
    "parse_color",
    "process_caption",
    "resize_and_crop",
    "scan_dataset",
    "split_tags",
    "steps_per_epoch",
    "to_rgb",
    "total_steps",
    "verify_images",
]
