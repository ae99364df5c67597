"""Loading SD1.x/SD2.x/SDXL for the standalone host, offline: diffusers folders and single files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelLoadError
from .sd import DiffusersSD

if TYPE_CHECKING:  # pragma: no cover
    from .sdxl import DiffusersSDXL

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_diffusers_folder(folder: str | Path) -> DiffusersSD:
    folder = Path(folder)
    _offline()
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{folder}: not a complete diffusers SD folder (missing {', '.join(missing)}/). "
            "Point pretrained_model at a folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            "or at a single .safetensors checkpoint."
        )
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    if _is_sdxl_unet(unet):
        from transformers import CLIPTextModelWithProjection

        from .sdxl import DiffusersSDXL

        if not (folder / "text_encoder_2").is_dir() or not (folder / "tokenizer_2").is_dir():
            raise ModelLoadError(f"{folder}: an SDXL UNet without text_encoder_2/ and tokenizer_2/")
        return DiffusersSDXL(
            unet=unet,
            vae=AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", local_files_only=True),
            tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True),
            scheduler_config=sched,
            name=folder.name,
        )
    family = sd_family(unet.config)
    return DiffusersSD(
        unet=unet,
        vae=AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True),
        scheduler_config=sched,
        family=family,
        name=folder.name,
    )


def load_single_file(path: str | Path, config_dir: str | Path | None = None) -> DiffusersSD:
    """A1111-layout checkpoint. Configs and tokenizer come from ``config_dir`` (a diffusers folder
    for this model type), else from a diffusers folder next to the file with the same stem, else
    from the local Hugging Face cache; never from the network."""
    path = Path(path)
    _offline()
    if config_dir is None:
        sibling = path.with_suffix("")
        if (sibling / "model_index.json").is_file():
            config_dir = sibling
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = _is_sdxl_file(path)
    kwargs = {"local_files_only": True} if sdxl else {"local_files_only": True, "safety_checker": None, "requires_safety_checker": False}
    if config_dir is not None:
        kwargs["config"] = str(config_dir)
    try:
        pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_single_file(str(path), **kwargs)
    except Exception as e:  # diffusers raises many kinds; all mean the same to the user
        hint = (
            "Pass the folder of a diffusers model of the same type with --set model_config_dir=<folder> "
            "(configs and tokenizer are read from it; weights come from the file)."
            if config_dir is None
            else f"Check that {config_dir} is a diffusers folder of the same model type."
        )
        raise ModelLoadError(f"{path}: could not load the checkpoint offline ({type(e).__name__}: {e}). {hint}") from e
    if sdxl:
        from .sdxl import DiffusersSDXL

        return DiffusersSDXL(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer,
            tokenizer_2=pipe.tokenizer_2,
            scheduler_config=dict(pipe.scheduler.config),
            name=path.stem,
            sha256=file_sha256(path),
        )
    family = sd_family(pipe.unet.config)
    return DiffusersSD(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config),
        family=family,
        name=path.stem,
        sha256=file_sha256(path),
    )


def sd_family(unet_config) -> str:
    """``sd2`` or ``sd1`` from a UNet config: SD2's UNet has 1024-wide context (OpenCLIP-H) and linear
    projections in its transformers, SD1's 768 and 1x1 convs (tiny test models keep the latter trait)."""
    cfg = unet_config if isinstance(unet_config, dict) else dict(unet_config)
    if cfg.get("cross_attention_dim") == 1024 or cfg.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def _is_sdxl_unet(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _is_sdxl_file(path: Path) -> bool:
    """SDXL (SGM layout) by its keys: the second text encoder lives under conditioner.embedders.1."""
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    from .sdxl import is_sgm_state_dict_keys

    try:
        with safe_open(str(path), "pt") as f:
            return is_sgm_state_dict_keys(f.keys())
    except Exception:  # noqa: BLE001 - unreadable: let the SD loader report it
        return False


def load_sd(model: str | Path, config_dir: str | Path | None = None) -> DiffusersSD | DiffusersSDXL:
    p = Path(model)
    if not p.exists():
        raise ModelLoadError(f"{p}: base model not found. Set pretrained_model to a .safetensors file or a diffusers folder.")
    if p.is_dir():
        return load_diffusers_folder(p)
    if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{p}: unsupported model file type '{p.suffix}'. Use a .safetensors (or .ckpt) checkpoint.")
    return load_single_file(p, config_dir or None)
