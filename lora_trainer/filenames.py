"""The rule for a name the user picks that becomes part of a file or folder name.

Most WebUI users run Windows, so a name must be valid there even when training runs on Linux: a
LoRA trained on a Linux box is copied to a Windows one, and a name Windows refuses would fail there
late, or (``con``, ``nul``) silently open a device. One rule for every such name: ``output_name``
(config), the ``<repeats>_<name>`` folder the prepare tools write. Does not import torch.
"""

from __future__ import annotations

MAX_COMPONENT_BYTES = 255
"""Longest file or folder name (one path component) in UTF-8 bytes: ext4, btrfs and APFS allow 255
bytes, NTFS 255 UTF-16 units. UTF-8 never takes fewer bytes than UTF-16 takes units, so a name that
fits in 255 UTF-8 bytes fits everywhere."""

_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{dev}{n}" for dev in ("COM", "LPT") for n in range(1, 10)}
_FORBIDDEN = set('<>:"/\\|?*')


def name_problem(name: str, extra_bytes: int = 0) -> str | None:
    """What makes ``name`` unusable as (part of) a file name on Windows, Linux or macOS, or None.

    ``extra_bytes``: how many bytes the longest name built from it adds (``-000001.safetensors`` ...),
    so the whole stays within :data:`MAX_COMPONENT_BYTES`."""
    if not name or name in (".", ".."):
        return "a non-empty name that is not '.' or '..'"
    bad = sorted({c for c in name if c in _FORBIDDEN or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return f"a name without folder separators, control characters or any of < > : \" / \\ | ? * (it holds {shown})"
    if name[-1] in ". ":
        return "a name that does not end with a dot or a space (Windows drops them, so the file would get another name)"
    # Windows reserves these device names whatever the case and whatever follows the first dot
    if name.split(".")[0].rstrip(" ").upper() in _RESERVED:
        return "a name that is not a Windows device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9, also with an extension)"
    limit = MAX_COMPONENT_BYTES - extra_bytes
    size = len(name.encode("utf-8"))
    if size > limit:
        return f"a name of at most {limit} bytes (UTF-8; it has {size}) so every file written from it fits in {MAX_COMPONENT_BYTES}"
    return None
