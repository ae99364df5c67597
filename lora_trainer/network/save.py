"""Writing LoRA files: kohya metadata hashes; placed by :mod:`lora_trainer.files`.

A host may scan ``models/Lora`` at any moment, so a file is written under a temporary name
in the same folder and linked into place; a reader sees either no file or the whole file.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from ..files import write_file

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


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file with a canonical header (sorted keys, tensors in name order).

    The ``safetensors`` package writes its metadata in hash-map order, so two saves of the same
    LoRA differ in their header; this writer makes the same weights and metadata give the same
    bytes (the same seed gives the same file)."""
    header: dict[str, object] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: unsupported dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def serialize_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Bytes of the safetensors file, with ``sshs_model_hash`` / ``sshs_legacy_hash`` computed
    as kohya does: over the file written with only the ``ss_*`` metadata (the hash covers the
    tensor bytes after the header, which the metadata does not change)."""
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    probe = safetensors_bytes(tensors, ss_only)
    meta = dict(metadata)
    meta["sshs_model_hash"] = addnet_hash_safetensors(probe)
    meta["sshs_legacy_hash"] = addnet_hash_legacy(probe)
    return safetensors_bytes(tensors, meta)


def save_lora_file(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, replace: bool = False
) -> Path:
    """Write the LoRA file with :func:`lora_trainer.files.write_file`: complete or absent, and
    ``FileExistsError`` rather than replacing a file of that name unless ``replace``."""
    return write_file(path, serialize_lora(tensors, metadata), replace=replace)


def json_meta(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)
