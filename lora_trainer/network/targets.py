"""Which layers a LoRA trains, and their kohya names.

Targets are found by walking the module tree for the container classes kohya sd-scripts uses
(``Transformer2DModel`` for Standard LoRA, ResNet blocks and samplers for LoCon, CLIP attention
and MLP for the text encoder). The LDM classes the hosts hold are the same containers under
other names, so one walk serves both; the module path is passed through ``name_map`` so that a
host's LDM path becomes the path the file format uses.

OpenCLIP text towers (SDXL's second encoder and SD2's encoder as the WebUIs hold them) compute
q, k and v with one fused ``in_proj`` inside ``torch.nn.MultiheadAttention``: there is no q/k/v
layer to find. :func:`openclip_text_targets` gives them as :class:`FusedProjection` targets under the
Hugging Face names the file format uses (separate ``q_proj``/``k_proj``/``v_proj``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# diffusers names, then the LDM (A1111/Forge, sgm) names of the same containers
UNET_ATTENTION_CONTAINERS = frozenset({"Transformer2DModel", "SpatialTransformer"})
UNET_CONV_CONTAINERS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample"})
TEXT_CONTAINERS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"})


class FusedProjection:
    """The q, k, v or out projection of a ``torch.nn.MultiheadAttention`` with a fused ``in_proj``.

    Not a module: the attention passes its weights straight to ``F.multi_head_attention_forward``
    (``out_proj.forward`` is never called either), so a LoRA here cannot be a forward hook; the LoRA
    module adds its weight delta to the weights the attention passes instead (see ``network.lora``).
    ``weight`` is the part of the host's weight this projection is (a view, for shapes)."""

    PARTS = ("q", "k", "v", "out")

    def __init__(self, attention: nn.MultiheadAttention, part: str):
        if part not in self.PARTS:
            raise ValueError(f"part must be one of {self.PARTS}, got {part!r}")
        if not isinstance(attention, nn.MultiheadAttention) or not attention._qkv_same_embed_dim:
            raise TypeError("a FusedProjection needs a torch.nn.MultiheadAttention with a fused in_proj_weight")
        self.attention = attention
        self.part = part

    @property
    def weight(self) -> torch.Tensor:
        if self.part == "out":
            return self.attention.out_proj.weight
        d = self.attention.embed_dim
        i = self.PARTS.index(self.part)
        return self.attention.in_proj_weight[i * d : (i + 1) * d]

    def __repr__(self) -> str:
        return f"FusedProjection({self.part})"


@dataclass
class Target:
    """One layer to wrap: ``lora_name`` is the kohya key stem (``lora_unet_..``). ``module`` is a
    Linear/Conv2d layer, or a :class:`FusedProjection` inside an attention module."""

    lora_name: str
    module: nn.Module | FusedProjection
    is_conv3x3: bool


def is_linear(module: nn.Module) -> bool:
    """True for torch's Linear and for host Linear classes that are not subclasses of it (Forge)."""
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Linear" and w is not None and getattr(w, "ndim", 0) == 2


def conv_kind(module: nn.Module) -> str | None:
    """'1x1', 'kxk' or None."""
    if not isinstance(module, nn.Conv2d):
        return None
    return "1x1" if tuple(module.kernel_size) == (1, 1) else "kxk"


def find_targets(
    root: nn.Module,
    prefix: str,
    containers: frozenset[str],
    conv_containers: frozenset[str] = frozenset(),
    name_map: Callable[[str], str] | None = None,
) -> list[Target]:
    """Collect Linear and 1x1-conv layers inside ``containers`` (and inside ``conv_containers``,
    which also contribute kxk convs marked ``is_conv3x3``). Each layer appears once."""
    seen: set[int] = set()
    out: list[Target] = []
    for cname, container in root.named_modules():
        cls = type(container).__name__
        in_attn = cls in containers
        in_conv = cls in conv_containers
        if not (in_attn or in_conv):
            continue
        for child_name, child in container.named_modules():
            if child is container or id(child) in seen:
                continue
            kind = conv_kind(child)
            lin = is_linear(child)
            if not (lin or kind == "1x1" or (in_conv and kind == "kxk")):
                continue
            full = f"{cname}.{child_name}" if cname else child_name
            mapped = name_map(full) if name_map else full
            seen.add(id(child))
            out.append(Target(f"{prefix}_{mapped.replace('.', '_')}", child, kind == "kxk"))
    return out


def openclip_text_targets(clip_model: nn.Module, prefix: str, num_layers: int | None = None) -> list[Target]:
    """Targets of an OpenCLIP text tower (``clip_model.transformer.resblocks``: ``attn`` a
    ``torch.nn.MultiheadAttention`` with a fused ``in_proj``, ``mlp.c_fc`` and ``mlp.c_proj``), named as
    the same layers of a Hugging Face ``CLIPTextModel``: ``<prefix>_text_model_encoder_layers_N_`` +
    ``self_attn_q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``, ``mlp_fc1``, ``mlp_fc2``. Those are the
    names kohya writes for SDXL's second encoder (``lora_te2``) and SD2's (``lora_te``), and the names the
    WebUIs map back onto OpenCLIP. ``num_layers``: only the first N blocks (the ones a penultimate-layer
    encoder runs)."""
    blocks = getattr(getattr(clip_model, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(clip_model).__name__} is not an OpenCLIP model (no transformer.resblocks)")
    out: list[Target] = []
    for i, block in enumerate(blocks):
        if num_layers is not None and i >= num_layers:
            break
        attn = getattr(block, "attn", None)
        mlp = getattr(block, "mlp", None)
        if not isinstance(attn, nn.MultiheadAttention) or mlp is None:
            raise TypeError(f"OpenCLIP block {i} ({type(block).__name__}) has no MultiheadAttention 'attn' and 'mlp'")
        stem = f"{prefix}_text_model_encoder_layers_{i}_"
        for part in ("k", "v", "q", "out"):  # the order of CLIPAttention's layers: the same LoRA init draws
            out.append(Target(f"{stem}self_attn_{part}_proj", FusedProjection(attn, part), False))
        for child, hf in (("c_fc", "fc1"), ("c_proj", "fc2")):
            layer = getattr(mlp, child, None)
            if layer is None or not is_linear(layer):
                raise TypeError(f"OpenCLIP block {i}: mlp.{child} is not a Linear layer")
            out.append(Target(f"{stem}mlp_{hf}", layer, False))
    return out
