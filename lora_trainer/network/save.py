"""Writing LoRA files: kohya metadata hashes and atomic placement.

A host may scan ``models/Lora`` at any moment, so a file is written under a temporary name
in the same folder and renamed into place; a reader sees either no file or the whole file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as st_save

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def addnet_hash_safetensors(data: bytes) -> str:
    """sha256 of everything after the safetensors header (what A1111 shows as the LoRA hash)."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n :]).hexdigest()


def addnet_hash_legacy(data: bytes) -> str:
    """First 8 hex digits of sha256 of the 64 KiB at offset 1 MiB (sd-webui-additional-networks)."""
    b = io.BytesIO(data)
    b.seek(0x100000)
    return hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def serialize_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Bytes of the safetensors file, with ``sshs_model_hash`` / ``sshs_legacy_hash`` computed
    as kohya does: over the file written with only the ``ss_*`` metadata."""
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    probe = st_save(tensors, ss_only)
    meta = dict(metadata)
    meta["sshs_model_hash"] = addnet_hash_safetensors(probe)
    meta["sshs_legacy_hash"] = addnet_hash_legacy(probe)
    return st_save(tensors, meta)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    return atomic_write_bytes(path, serialize_lora(tensors, metadata))


def json_meta(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)
