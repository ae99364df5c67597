"""Module-name and state-dict conversion between diffusers and LDM ("ldm"/"sgm") layouts.

AUTOMATIC1111 / Forge keep Stable Diffusion in memory with the original LDM module names
(``input_blocks.1.1.transformer_blocks.0.attn1.to_q``), while diffusers (and the
diffusers-flavoured LoRA formats for SD1.x/2.x) use ``down_blocks.0.attentions.0...``.
This module derives the name correspondence *structurally* from a diffusers
``UNet2DConditionModel`` / ``AutoencoderKL`` config dict, following the same rules as
diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` and
``scripts/convert_diffusers_to_original_stable_diffusion.py``.

Only pure Python and torch are used: neither diffusers nor ldm is imported, so this works
on hosts that have only one of the two.

Module mappings contain every module that *directly* owns parameters (Linear, Conv2d,
GroupNorm, LayerNorm, Embedding), i.e. exactly the prefixes of all parameter keys.
Parameter keys (``<module>.weight``, ``<module>.lora_down.weight``, ...) are renamed by
longest-module-prefix match, see :func:`rename_key` / :func:`convert_unet_state_dict`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "LDM_UNET_PREFIX",
    "LDM_VAE_PREFIX",
    "LDM_TEXT_ENCODER_PREFIX",
    "unet_ldm_to_diffusers_names",
    "unet_diffusers_to_ldm_names",
    "unet_config_from_ldm_state_dict",
    "webui_fixed_ldm_path",
    "webui_stride_fits",
    "kohya_unet_name_map",
    "kohya_unet_stems",
    "rename_key",
    "convert_unet_state_dict",
    "vae_diffusers_to_ldm_names",
    "vae_ldm_to_diffusers_names",
    "vae_diffusers_to_ldm_state_dict",
    "vae_ldm_to_diffusers_state_dict",
    "text_encoder_to_ldm_state_dict",
    "text_encoder_from_ldm_state_dict",
    "to_a1111_checkpoint",
]

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

Unmapped = Literal["error", "keep", "drop"]

# ResBlock (LDM openaimodel) -> ResnetBlock2D (diffusers), relative to the block.
_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)
_UNET_RESNET_SHORTCUT = ("skip_connection", "conv_shortcut")

# Inside a SpatialTransformer / Transformer2DModel both libraries use the same names.
_TRANSFORMER_OUTER = ("norm", "proj_in", "proj_out")
_TRANSFORMER_BLOCK = (
    "norm1",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "norm2",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "norm3",
    "ff.net.0.proj",
    "ff.net.2",
)

# VAE ResnetBlock (diffusers name, LDM name) and attention block.
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_VAE_RESNET_SHORTCUT = ("conv_shortcut", "nin_shortcut")
_VAE_ATTN = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
_VAE_ATTN_LINEAR_SUFFIXES = tuple(f".{d}.weight" for d, _ in _VAE_ATTN[1:])
_VAE_ATTN_CONV_SUFFIXES = tuple(f".{ldm}.weight" for _, ldm in _VAE_ATTN[1:])


# --------------------------------------------------------------------------- helpers


def _per_level(value: Any, n: int, name: str) -> list[Any]:
    """Expand an int (or per-level sequence) config value to a list of length ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries, expected {n}")
        return list(value)
    return [value] * n


def _per_layer(value: Any, j: int) -> int:
    """``transformer_layers_per_block`` entries may be an int or a per-layer sequence."""
    if isinstance(value, (list, tuple)):
        return int(value[j])
    return int(value)


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def _add(pairs: dict[str, str], ldm: str, diffusers: str) -> None:
    if ldm in pairs:
        raise ValueError(f"conflicting config: LDM module {ldm!r} would be mapped twice")
    pairs[ldm] = diffusers


def _unet_resnet(pairs: dict[str, str], ldm: str, diff: str, in_ch: int, out_ch: int) -> None:
    for ldm_sub, diff_sub in _UNET_RESNET:
        _add(pairs, f"{ldm}.{ldm_sub}", f"{diff}.{diff_sub}")
    if in_ch != out_ch:
        _add(pairs, f"{ldm}.{_UNET_RESNET_SHORTCUT[0]}", f"{diff}.{_UNET_RESNET_SHORTCUT[1]}")


def _unet_transformer(pairs: dict[str, str], ldm: str, diff: str, depth: int) -> None:
    for sub in _TRANSFORMER_OUTER:
        _add(pairs, f"{ldm}.{sub}", f"{diff}.{sub}")
    for t in range(depth):
        for sub in _TRANSFORMER_BLOCK:
            _add(pairs, f"{ldm}.transformer_blocks.{t}.{sub}", f"{diff}.transformer_blocks.{t}.{sub}")


def _invert(mapping: Mapping[str, str]) -> dict[str, str]:
    inverse = {v: k for k, v in mapping.items()}
    if len(inverse) != len(mapping):
        raise ValueError("mapping is not injective")
    return inverse


# --------------------------------------------------------------------------- UNet


def unet_ldm_to_diffusers_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Map every parameter-owning LDM UNet module path to its diffusers module path.

    ``config`` is a diffusers ``UNet2DConditionModel`` config (``unet.config`` or the
    ``config.json`` dict).  Supported: SD1.x / SD2.x (and structurally SDXL-like) UNets made
    of ``CrossAttnDownBlock2D``/``DownBlock2D``, ``CrossAttnUpBlock2D``/``UpBlock2D`` and a
    ``UNetMidBlock2DCrossAttn``.  ``layers_per_block`` and ``transformer_layers_per_block``
    may be ints or per-level sequences.
    """
    boc = [int(c) for c in config["block_out_channels"]]
    n = len(boc)
    down_types = list(config.get("down_block_types") or ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up_types = list(config.get("up_block_types") or ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    if len(down_types) != n or len(up_types) != n:
        raise ValueError("down_block_types / up_block_types must have one entry per block_out_channels entry")
    for t in down_types + up_types:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
            raise ValueError(f"unsupported UNet block type {t!r}")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unsupported mid_block_type {mid_type!r}")
    if config.get("resnet_time_scale_shift", "default") != "default":
        raise ValueError("only resnet_time_scale_shift='default' is supported")

    lpb = [int(v) for v in _per_level(config.get("layers_per_block", 2), n, "layers_per_block")]
    tlpb = _per_level(config.get("transformer_layers_per_block", 1) or 1, n, "transformer_layers_per_block")
    rev_tlpb_cfg = config.get("reverse_transformer_layers_per_block")
    rev_tlpb = list(rev_tlpb_cfg) if rev_tlpb_cfg is not None else list(reversed(tlpb))
    rev_lpb = list(reversed(lpb))

    pairs: dict[str, str] = {}
    _add(pairs, "time_embed.0", "time_embedding.linear_1")
    _add(pairs, "time_embed.2", "time_embedding.linear_2")

    # class / additional embeddings (label_emb in LDM/SGM)
    if config.get("class_embed_type") in ("timestep", "projection"):
        _add(pairs, "label_emb.0.0", "class_embedding.linear_1")
        _add(pairs, "label_emb.0.2", "class_embedding.linear_2")
    elif config.get("class_embed_type") is not None:
        raise ValueError(f"unsupported class_embed_type {config.get('class_embed_type')!r}")
    if config.get("addition_embed_type") == "text_time":
        _add(pairs, "label_emb.0.0", "add_embedding.linear_1")
        _add(pairs, "label_emb.0.2", "add_embedding.linear_2")
    elif config.get("addition_embed_type") is not None:
        raise ValueError(f"unsupported addition_embed_type {config.get('addition_embed_type')!r}")
    if config.get("num_class_embeds") is not None and config.get("class_embed_type") is None:
        _add(pairs, "label_emb", "class_embedding")

    _add(pairs, "input_blocks.0.0", "conv_in")

    # down path: input_blocks.1.. ; track channels like LDM does (for the skip convs)
    ch = boc[0]
    skip_chans = [ch]
    k = 1
    for level in range(n):
        out_ch = boc[level]
        for j in range(lpb[level]):
            ldm = f"input_blocks.{k}"
            _unet_resnet(pairs, f"{ldm}.0", f"down_blocks.{level}.resnets.{j}", ch, out_ch)
            ch = out_ch
            if _has_attention(down_types[level]):
                depth = _per_layer(tlpb[level], j)
                _unet_transformer(pairs, f"{ldm}.1", f"down_blocks.{level}.attentions.{j}", depth)
            skip_chans.append(ch)
            k += 1
        if level != n - 1:  # diffusers: add_downsample = not is_final_block
            _add(pairs, f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            skip_chans.append(ch)
            k += 1

    # middle block: ResBlock, SpatialTransformer, ResBlock
    _unet_resnet(pairs, "middle_block.0", "mid_block.resnets.0", ch, ch)
    _unet_transformer(pairs, "middle_block.1", "mid_block.attentions.0", _per_layer(tlpb[-1], 0))
    _unet_resnet(pairs, "middle_block.2", "mid_block.resnets.1", ch, ch)

    # up path: output_blocks.0.. ; up_blocks[i] is LDM level n-1-i
    k = 0
    for i in range(n):
        level = n - 1 - i
        out_ch = boc[level]
        attn = _has_attention(up_types[i])
        for j in range(rev_lpb[i] + 1):
            ldm = f"output_blocks.{k}"
            in_ch = ch + skip_chans.pop()
            _unet_resnet(pairs, f"{ldm}.0", f"up_blocks.{i}.resnets.{j}", in_ch, out_ch)
            ch = out_ch
            if attn:
                depth = _per_layer(rev_tlpb[i], j)
                _unet_transformer(pairs, f"{ldm}.1", f"up_blocks.{i}.attentions.{j}", depth)
            if i != n - 1 and j == rev_lpb[i]:  # diffusers: add_upsample = not is_final_block
                _add(pairs, f"{ldm}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
            k += 1

    _add(pairs, "out.0", "conv_norm_out")
    _add(pairs, "out.2", "conv_out")
    return pairs


def unet_diffusers_to_ldm_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Inverse of :func:`unet_ldm_to_diffusers_names` (diffusers module path -> LDM module path)."""
    return _invert(unet_ldm_to_diffusers_names(config))


# --------------------------------------------------------------------------- kohya UNet names (SD1/SD2)
#
# kohya names an SD1/SD2 UNet layer by its diffusers path. The WebUIs do not read those names through
# the model's layout: A1111 turns them into LDM paths with SD1.5's block counts fixed in its arithmetic,
# so on a UNet of another layout some names match no layer or a neighbouring one (Forge derives its
# table from the loaded UNet's config). Both hosts also accept ``lora_unet_`` + the LDM path
# itself (A1111 by its fallback that swaps ``lora_unet`` for ``diffusion_model``; Forge's key map lists
# every UNet weight that way), which is right for any layout. So: diffusers names where the fixed
# arithmetic lands every layer where it belongs, LDM names elsewhere.

_WEBUI_RESNET_PARTS = {
    diff: ldm.replace(".", "_") for ldm, diff in _UNET_RESNET + (_UNET_RESNET_SHORTCUT,) if not diff.startswith("norm")
}
_FIXED_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)")
_FIXED_MID = re.compile(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)")
_FIXED_SAMPLER = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv")
_NORM = re.compile(r"(^|\.)norm\d*$")


def webui_fixed_ldm_path(diffusers_path: str) -> str | None:
    """The LDM module path A1111's Lora extension reads a diffusers-style SD1/SD2 UNet name as,
    whatever the UNet's layout; ``None`` for a path outside that scheme. Its arithmetic, in words:
    every down level is three input blocks (two ResBlocks and a downsampler, the first level from
    block 1), every up level three output blocks, the upsampler last in its level's last block, at
    position 1 in the first up level (SD1.5 has no attention there) and 2 elsewhere; the middle block
    is ResBlock, attention, ResBlock. A ResBlock's ``conv1``, ``conv2``, ``time_emb_proj`` and
    ``conv_shortcut`` get their LDM names, any other part of a path is kept as it is. Those parts come
    out with "_" (``in_layers_2``): the host compares names with "_" for ".", so compare the result
    with an LDM path after ``.replace(".", "_")`` on both."""
    if m := _FIXED_BLOCK.fullmatch(diffusers_path):
        side, level, kind, j, rest = m.groups()
        down = side == "down_blocks"
        block = (1 if down else 0) + 3 * int(level) + int(j)
        rest = _WEBUI_RESNET_PARTS.get(rest, rest) if kind == "resnets" else rest
        return f"{'input' if down else 'output'}_blocks.{block}.{int(kind == 'attentions')}.{rest}"
    if m := _FIXED_MID.fullmatch(diffusers_path):
        kind, j, rest = m.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(j)}.{_WEBUI_RESNET_PARTS.get(rest, rest)}"
    if m := _FIXED_SAMPLER.fullmatch(diffusers_path):
        side, level, _ = m.groups()
        if side == "down_blocks":
            return f"input_blocks.{3 + 3 * int(level)}.0.op"
        return f"output_blocks.{2 + 3 * int(level)}.{2 if int(level) > 0 else 1}.conv"
    if diffusers_path == "conv_in":
        return "input_blocks.0.0"
    if diffusers_path == "conv_out":
        return "out.2"
    if m := re.fullmatch(r"time_embedding\.linear_(\d+)", diffusers_path):
        return f"time_embed.{2 * int(m.group(1)) - 2}"
    return None


def _lora_layers(diffusers_to_ldm: Mapping[str, str]) -> dict[str, str]:
    """The part of a UNet mapping a Standard or LoCon LoRA may train: every layer inside the down,
    middle and up blocks but the norms (attention projections, feed-forwards, ResBlock convs and
    their time projections, shortcuts, resamplers)."""
    return {
        d: ldm
        for d, ldm in diffusers_to_ldm.items()
        if d.startswith(("down_blocks.", "mid_block.", "up_blocks.")) and not _NORM.search(d)
    }


def webui_stride_fits(config: Mapping[str, Any]) -> bool:
    """Whether A1111's fixed SD1.5 arithmetic (:func:`webui_fixed_ldm_path`) puts every layer a
    Standard or LoCon LoRA may train on this UNet where it belongs (true for SD1.x and SD2.x). Decided
    for the model, not the network type, so one model's layers have one name in every file."""
    for d, ldm in _lora_layers(unet_diffusers_to_ldm_names(config)).items():
        fixed = webui_fixed_ldm_path(d)
        if fixed is None or fixed.replace(".", "_") != ldm.replace(".", "_"):
            return False
    return True


def kohya_unet_name_map(config: Mapping[str, Any], source: Literal["diffusers", "ldm"]) -> Callable[[str], str]:
    """Module path -> the path a kohya file names it by (after ``lora_unet_``, "." to "_"), for an
    SD1/SD2 UNet given by its diffusers ``config``. ``source`` says which paths come in: a diffusers
    UNet's (standalone) or an LDM UNet's (A1111, Forge). The path out is the diffusers path where
    :func:`webui_stride_fits`, the LDM path otherwise, so a model gets the same names in every host.
    A path outside the UNet's layout raises ``KeyError``."""
    ldm_to_diffusers = unet_ldm_to_diffusers_names(config)
    use_ldm = not webui_stride_fits(config)
    if source == "diffusers":
        known: dict[str, str] = {d: (ldm if use_ldm else d) for ldm, d in ldm_to_diffusers.items()}
    elif source == "ldm":
        known = {ldm: (ldm if use_ldm else d) for ldm, d in ldm_to_diffusers.items()}
    else:
        raise ValueError(f"source must be 'diffusers' or 'ldm', got {source!r}")

    def name_map(path: str) -> str:
        try:
            return known[path]
        except KeyError:
            raise KeyError(f"UNet module {path!r} is not part of this SD1/SD2 UNet layout") from None

    return name_map


def kohya_unet_stems(config: Mapping[str, Any]) -> dict[str, str]:
    """Every ``lora_unet_`` stem a kohya file may use for a layer of this UNet, in either style
    (diffusers path or LDM path), -> the stem :func:`kohya_unet_name_map` gives that layer: a file
    written under the other rule (or by another trainer) still finds its layers."""
    name_map = kohya_unet_name_map(config, "ldm")
    out: dict[str, str] = {}
    for ldm, d in unet_ldm_to_diffusers_names(config).items():
        ours = "lora_unet_" + name_map(ldm).replace(".", "_")
        for path in (d, ldm):
            out["lora_unet_" + path.replace(".", "_")] = ours
    return out


def unet_config_from_ldm_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Infer the structural part of a diffusers UNet config from LDM UNet parameter shapes.

    Useful inside A1111/Forge where only the LDM module exists.  ``state_dict`` maps LDM
    parameter names (optionally starting with ``prefix``, e.g. ``"model.diffusion_model."``)
    to tensors (anything with ``.shape``).  Returns ``block_out_channels``,
    ``layers_per_block``, ``down_block_types``, ``up_block_types``,
    ``transformer_layers_per_block``, ``in_channels``, ``out_channels``,
    ``cross_attention_dim`` and ``use_linear_projection`` -- enough for the name mappings
    (attention head counts cannot be read from weights and are not returned).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            shapes[key[len(prefix) :]] = tuple(value.shape)
    if "input_blocks.0.0.weight" not in shapes:
        raise ValueError("not an LDM UNet state dict (input_blocks.0.0.weight missing)")

    def block_ids(root: str) -> list[int]:
        pattern = re.compile(rf"^{root}\.(\d+)\.")
        return sorted({int(m.group(1)) for key in shapes if (m := pattern.match(key))})

    def depth_of(block: str) -> int:
        pattern = re.compile(rf"^{re.escape(block)}\.transformer_blocks\.(\d+)\.")
        return 1 + max(int(m.group(1)) for key in shapes if (m := pattern.match(key)))

    boc: list[int] = []
    lpb: list[int] = []
    down_types: list[str] = []
    depths: list[int] = []
    count = 0
    level_attn = False
    level_depth = 1
    out_ch = 0
    for k in block_ids("input_blocks")[1:]:
        if f"input_blocks.{k}.0.op.weight" in shapes:
            boc.append(out_ch)
            lpb.append(count)
            down_types.append("CrossAttnDownBlock2D" if level_attn else "DownBlock2D")
            depths.append(level_depth)
            count, level_attn, level_depth = 0, False, 1
            continue
        out_ch = shapes[f"input_blocks.{k}.0.out_layers.3.weight"][0]
        count += 1
        if f"input_blocks.{k}.1.proj_in.weight" in shapes:
            level_attn = True
            level_depth = depth_of(f"input_blocks.{k}.1")
    boc.append(out_ch)
    lpb.append(count)
    down_types.append("CrossAttnDownBlock2D" if level_attn else "DownBlock2D")
    depths.append(level_depth)

    n = len(boc)
    up_types: list[str] = []
    out_ids = block_ids("output_blocks")
    k = 0
    for i in range(n):
        attn = False
        for _ in range(lpb[n - 1 - i] + 1):
            if k not in out_ids:
                raise ValueError(f"output_blocks.{k} missing; inconsistent LDM UNet state dict")
            attn = attn or f"output_blocks.{k}.1.proj_in.weight" in shapes
            k += 1
        up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")

    # depth only matters on attention levels; report an int when those agree
    attn_depths = {d for d, t in zip(depths, down_types) if t == "CrossAttnDownBlock2D"} or {1}
    proj_in = shapes.get("middle_block.1.proj_in.weight")
    attn2_k = next((s for key, s in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    return {
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "block_out_channels": boc,
        "layers_per_block": lpb[0] if len(set(lpb)) == 1 else lpb,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "transformer_layers_per_block": attn_depths.pop() if len(attn_depths) == 1 else depths,
        "cross_attention_dim": attn2_k[1] if attn2_k is not None else None,
        "use_linear_projection": proj_in is not None and len(proj_in) == 2,
    }


def rename_key(key: str, mapping: Mapping[str, str]) -> str | None:
    """Rename ``key`` by its longest dotted prefix found in ``mapping``; ``None`` if none matches.

    Works for parameter keys (``<module>.weight``) as well as deeper keys such as
    ``<module>.lora_down.weight`` or a bare module name.
    """
    if key in mapping:
        return mapping[key]
    pos = len(key)
    while (pos := key.rfind(".", 0, pos)) > 0:
        head = key[:pos]
        if head in mapping:
            return mapping[head] + key[pos:]
    return None


def _rename_state_dict(
    sd: Mapping[str, torch.Tensor], mapping: Mapping[str, str], unmapped: Unmapped
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, value in sd.items():
        new = rename_key(key, mapping)
        if new is None:
            if unmapped == "keep":
                new = key
            elif unmapped == "drop":
                continue
            else:
                missing.append(key)
                continue
        if new in out:
            raise ValueError(f"two keys map to {new!r}")
        out[new] = value
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise KeyError(f"{len(missing)} key(s) have no mapping: {shown}")
    return out


def convert_unet_state_dict(
    sd: Mapping[str, torch.Tensor], mapping: Mapping[str, str], unmapped: Unmapped = "error"
) -> dict[str, torch.Tensor]:
    """Rename UNet state-dict keys with a module mapping (either direction).

    Use ``unet_diffusers_to_ldm_names(cfg)`` to go diffusers -> LDM and
    ``unet_ldm_to_diffusers_names(cfg)`` for LDM -> diffusers.  Tensors are not copied.
    Keys without a mapped module prefix raise ``KeyError`` (``unmapped="error"``), are kept
    unchanged (``"keep"``) or dropped (``"drop"``).
    """
    return _rename_state_dict(sd, mapping, unmapped)


# --------------------------------------------------------------------------- VAE


def _vae_resnet(pairs: dict[str, str], diff: str, ldm: str, in_ch: int, out_ch: int) -> None:
    for d, m in _VAE_RESNET:
        _add(pairs, f"{diff}.{d}", f"{ldm}.{m}")
    if in_ch != out_ch:
        _add(pairs, f"{diff}.{_VAE_RESNET_SHORTCUT[0]}", f"{ldm}.{_VAE_RESNET_SHORTCUT[1]}")


def _vae_mid(pairs: dict[str, str], part: str, ch: int, attention: bool) -> None:
    _vae_resnet(pairs, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", ch, ch)
    if attention:
        for d, m in _VAE_ATTN:
            _add(pairs, f"{part}.mid_block.attentions.0.{d}", f"{part}.mid.attn_1.{m}")
    _vae_resnet(pairs, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", ch, ch)


def vae_diffusers_to_ldm_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Map every parameter-owning diffusers ``AutoencoderKL`` module path to its LDM path."""
    boc = [int(c) for c in config["block_out_channels"]]
    n = len(boc)
    for key in ("down_block_types", "up_block_types"):
        types = config.get(key)
        if types is not None and len(types) != n:
            raise ValueError(f"{key} must have one entry per block_out_channels entry")
    lpb = int(config.get("layers_per_block", 1))
    mid_attn = bool(config.get("mid_block_add_attention", True))
    pairs: dict[str, str] = {}

    # encoder
    _add(pairs, "encoder.conv_in", "encoder.conv_in")
    in_ch = boc[0]
    for level in range(n):
        out_ch = boc[level]
        for j in range(lpb):
            _vae_resnet(
                pairs, f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", in_ch, out_ch
            )
            in_ch = out_ch
        if level != n - 1:
            _add(pairs, f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv")
    _vae_mid(pairs, "encoder", boc[-1], mid_attn)
    _add(pairs, "encoder.conv_norm_out", "encoder.norm_out")
    _add(pairs, "encoder.conv_out", "encoder.conv_out")

    # decoder: diffusers up_blocks[i] <-> LDM decoder.up[n-1-i]
    _add(pairs, "decoder.conv_in", "decoder.conv_in")
    _vae_mid(pairs, "decoder", boc[-1], mid_attn)
    in_ch = boc[-1]
    for i in range(n):
        level = n - 1 - i
        out_ch = boc[level]
        for j in range(lpb + 1):
            _vae_resnet(pairs, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", in_ch, out_ch)
            in_ch = out_ch
        if i != n - 1:
            _add(pairs, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    _add(pairs, "decoder.conv_norm_out", "decoder.norm_out")
    _add(pairs, "decoder.conv_out", "decoder.conv_out")

    if config.get("use_quant_conv", True):
        _add(pairs, "quant_conv", "quant_conv")
    if config.get("use_post_quant_conv", True):
        _add(pairs, "post_quant_conv", "post_quant_conv")
    return pairs


def vae_ldm_to_diffusers_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Inverse of :func:`vae_diffusers_to_ldm_names`."""
    return _invert(vae_diffusers_to_ldm_names(config))


def _is_mid_attn(key: str) -> bool:
    return ".mid_block.attentions." in key or ".mid.attn_1." in key


def vae_diffusers_to_ldm_state_dict(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], unmapped: Unmapped = "error"
) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``AutoencoderKL`` state dict to LDM names (no ``first_stage_model.`` prefix).

    The mid-block attention q/k/v/proj_out are 1x1 ``Conv2d`` in LDM, so the diffusers
    Linear weights ``[out, in]`` become ``[out, in, 1, 1]`` (a view, no copy).
    """
    out = _rename_state_dict(sd, vae_diffusers_to_ldm_names(config), unmapped)
    for key, value in out.items():
        if _is_mid_attn(key) and key.endswith(_VAE_ATTN_CONV_SUFFIXES) and value.ndim == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def vae_ldm_to_diffusers_state_dict(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], unmapped: Unmapped = "error"
) -> dict[str, torch.Tensor]:
    """Convert an LDM VAE state dict (no prefix) to diffusers ``AutoencoderKL`` names.

    1x1-conv attention weights ``[out, in, 1, 1]`` become Linear weights ``[out, in]``.
    """
    out = _rename_state_dict(sd, vae_ldm_to_diffusers_names(config), unmapped)
    for key, value in out.items():
        if _is_mid_attn(key) and key.endswith(_VAE_ATTN_LINEAR_SUFFIXES) and value.ndim == 4:
            out[key] = value.reshape(value.shape[0], value.shape[1])
    return out


# --------------------------------------------------------------------------- text encoder

_CLIP_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")


def text_encoder_to_ldm_state_dict(
    sd: Mapping[str, torch.Tensor], prefix: str = LDM_TEXT_ENCODER_PREFIX
) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModel`` state dict -> SD1 LDM keys ``cond_stage_model.transformer.text_model.*``.

    ``text_model.`` is kept (A1111 and transformers 4.x expect it); keys given without it
    (a bare ``CLIPTextTransformer`` state dict) get it added.  ``position_ids`` buffers are
    dropped (non-persistent in current transformers).  Other keys raise ``KeyError``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_model."):
            name = key
        elif key.startswith(_CLIP_TOP_LEVEL):
            name = "text_model." + key
        else:
            raise KeyError(f"unexpected CLIPTextModel key {key!r}")
        out[prefix + name] = value
    return out


def text_encoder_from_ldm_state_dict(
    sd: Mapping[str, torch.Tensor], prefix: str = LDM_TEXT_ENCODER_PREFIX
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`text_encoder_to_ldm_state_dict`: keep keys under ``prefix``, strip it."""
    return {
        key[len(prefix) :]: value
        for key, value in sd.items()
        if key.startswith(prefix) and not key.endswith("position_ids")
    }


# --------------------------------------------------------------------------- full checkpoint


def _prefixed(sd: Mapping[str, torch.Tensor], prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    return ((prefix + key, value) for key, value in sd.items())


def to_a1111_checkpoint(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    te_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """Assemble a single-file SD1.x checkpoint state dict in A1111/LDM layout.

    Inputs are diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` / HF ``CLIPTextModel``
    state dicts plus the UNet and VAE config dicts.  Output keys are
    ``model.diffusion_model.*``, ``first_stage_model.*`` and
    ``cond_stage_model.transformer.text_model.*``.  Tensors are not copied (the VAE
    attention weights become reshaped views); ``module.state_dict()`` inputs can be
    written with ``safetensors.torch.save_file`` directly.  No EMA or noise-schedule
    buffers are added (A1111 and diffusers do not need them).
    """
    unet_ldm = convert_unet_state_dict(unet_sd, unet_diffusers_to_ldm_names(unet_config))
    vae_ldm = vae_diffusers_to_ldm_state_dict(vae_sd, vae_config)
    out: dict[str, torch.Tensor] = {}
    parts: Sequence[Iterable[tuple[str, torch.Tensor]]] = (
        _prefixed(unet_ldm, LDM_UNET_PREFIX),
        _prefixed(vae_ldm, LDM_VAE_PREFIX),
        text_encoder_to_ldm_state_dict(te_sd).items(),
    )
    for part in parts:
        for key, value in part:
            if key in out:
                raise ValueError(f"duplicate checkpoint key {key!r}")
            out[key] = value
    return out
