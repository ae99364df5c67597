"""LoRA and LoCon modules attached to a model by forward hooks.

Why hooks and not peft: the hosts' module objects must stay where they are (A1111 patches
``Linear.forward`` globally, Forge's ``Linear`` is not ``torch.nn.Linear`` and its model patcher
holds references to the layers), and removing the LoRA must leave the model bit-identical. peft
replaces each target layer with a wrapper module and cannot wrap a non-``torch.nn.Linear``
layer. A forward hook adds ``up(down(x)) * alpha / rank * multiplier`` to the layer's output
without touching its weights or its place in the tree; removing the hook restores the model.

A fused ``torch.nn.MultiheadAttention`` (OpenCLIP) has no q/k/v layers to hook: the LoRAs of its
projections (:class:`~.targets.FusedProjection`) are applied by :class:`FusedAttentionLoRA`, an
instance ``forward`` that passes ``in_proj_weight + cat(dq, dk, dv)`` and ``out_proj.weight + dout`` to
``F.multi_head_attention_forward``; deleting that instance attribute restores the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .targets import FusedProjection, Target


class LoRAModule(nn.Module):
    """One low-rank adapter for a Linear, 1x1 conv or kxk conv layer (kohya layout)."""

    def __init__(self, lora_name: str, org: nn.Module, rank: int, alpha: float | None):
        super().__init__()
        self.lora_name = lora_name
        weight = org.weight
        if weight.ndim == 2:
            out_f, in_f = weight.shape
            self.lora_down = nn.Linear(in_f, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_f, bias=False)
        elif weight.ndim == 4:
            out_ch, in_ch = weight.shape[:2]
            if getattr(org, "groups", 1) != 1:
                raise ValueError(f"{lora_name}: grouped convolutions are not supported")
            self.lora_down = nn.Conv2d(
                in_ch, rank, org.kernel_size, org.stride, org.padding, dilation=org.dilation, bias=False
            )
            self.lora_up = nn.Conv2d(rank, out_ch, 1, 1, bias=False)
        else:
            raise ValueError(f"{lora_name}: cannot adapt a weight of shape {tuple(weight.shape)}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        if alpha is None or alpha == 0:
            alpha = rank
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)
        self.scale = float(alpha) / rank
        self.multiplier = 1.0
        self.enabled = True
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._org_ref = [org]  # a list so the host layer is not registered as our child

    @property
    def org_module(self) -> nn.Module:
        return self._org_ref[0]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.lora_down.weight.dtype
        return self.lora_up(self.lora_down(x.to(dt))) * (self.multiplier * self.scale)

    def weight_delta(self) -> torch.Tensor:
        """``up @ down * alpha / rank * multiplier``: the change of a Linear layer's weight."""
        if self.lora_down.weight.ndim != 2:
            raise ValueError(f"{self.lora_name}: only a Linear LoRA has a weight delta here")
        return (self.lora_up.weight @ self.lora_down.weight) * (self.multiplier * self.scale)

    @property
    def active(self) -> bool:
        return self.enabled and self.multiplier != 0

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled or self.multiplier == 0:
            return None
        return output + self.delta(inputs[0]).to(output.dtype)

    def attach(self) -> None:
        if self._handle is None:
            org = self.org_module
            if isinstance(org, FusedProjection):
                self._handle = FusedAttentionLoRA.add(org, self)
            else:
                self._handle = org.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class FusedAttentionLoRA:
    """The LoRAs of one ``torch.nn.MultiheadAttention``'s fused q/k/v (and out) projections.

    While any of them is attached, the attention's *instance* ``forward`` is this object's
    :meth:`forward`: the same computation as ``nn.MultiheadAttention.forward``'s general path, with
    ``in_proj_weight + cat(dq, dk, dv)`` and ``out_proj.weight + dout`` (each ``d = up @ down * scale``)
    passed to ``F.multi_head_attention_forward`` in place of the weights. The host's parameters are
    never written; the class (and any global patch a host put on it) is untouched; removing the last
    LoRA deletes the instance attribute. A weight delta equals the hook's ``up(down(x))`` on the
    separate q/k/v layers of the same weights, so the files carry separate q/k/v keys."""

    def __init__(self, attention: nn.MultiheadAttention):
        self.attention = attention
        self.loras: dict[str, LoRAModule] = {}

    @classmethod
    def add(cls, projection: FusedProjection, lora: LoRAModule) -> _FusedHandle:
        attention = projection.attention
        current = attention.__dict__.get("forward")
        owner = getattr(current, "__self__", None)
        if isinstance(owner, cls) and owner.attention is attention:
            patch = owner
        elif current is not None:
            raise RuntimeError(
                f"{lora.lora_name}: the attention module already has an instance forward ({current!r}); "
                "its fused q/k/v cannot take a LoRA"
            )
        else:
            patch = cls(attention)
            attention.forward = patch.forward  # an instance attribute: shadows the class's forward
        if projection.part in patch.loras:
            raise RuntimeError(f"{lora.lora_name}: {projection.part} of this attention already has a LoRA")
        patch.loras[projection.part] = lora
        return _FusedHandle(patch, projection.part)

    def remove(self, part: str) -> None:
        self.loras.pop(part, None)
        if not self.loras and getattr(self.attention.__dict__.get("forward"), "__self__", None) is self:
            del self.attention.__dict__["forward"]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        mha = self.attention
        live = {part: m for part, m in self.loras.items() if m.active}
        if not live:
            return type(mha).forward(
                mha, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        w_in = mha.in_proj_weight
        if any(p in live for p in ("q", "k", "v")):
            d = mha.embed_dim
            parts = []
            for i, p in enumerate(("q", "k", "v")):
                if p in live:
                    parts.append(live[p].weight_delta().to(w_in.dtype))
                else:
                    parts.append(torch.zeros_like(w_in[i * d : (i + 1) * d]))
            w_in = w_in + torch.cat(parts)
        w_out = mha.out_proj.weight
        if "out" in live:
            w_out = w_out + live["out"].weight_delta().to(w_out.dtype)

        is_batched = query.dim() == 3
        if mha.batch_first and is_batched:  # as nn.MultiheadAttention: keep query/key/value identity
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            mha.embed_dim,
            mha.num_heads,
            w_in,
            mha.in_proj_bias,
            mha.bias_k,
            mha.bias_v,
            mha.add_zero_attn,
            mha.dropout,
            w_out,
            mha.out_proj.bias,
            training=mha.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if mha.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights


class _FusedHandle:
    """``remove()`` like a hook handle."""

    def __init__(self, patch: FusedAttentionLoRA, part: str):
        self.patch = patch
        self.part = part

    def remove(self) -> None:
        self.patch.remove(self.part)


class LoRANetwork(nn.Module):
    """All adapters of one training run. Holds the trainable parameters; the model is not a child."""

    def __init__(self, modules: Iterable[LoRAModule]):
        super().__init__()
        self.loras = nn.ModuleList(modules)
        names = [m.lora_name for m in self.loras]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate LoRA names: {sorted(dup)[:5]}")

    @classmethod
    def create(
        cls,
        targets: Iterable[Target],
        network_dim: int,
        network_alpha: float,
        conv_dim: int | None = None,
        conv_alpha: float | None = None,
    ) -> LoRANetwork:
        mods = []
        for t in targets:
            if t.is_conv3x3:
                if not conv_dim:
                    continue
                mods.append(LoRAModule(t.lora_name, t.module, conv_dim, conv_alpha))
            else:
                mods.append(LoRAModule(t.lora_name, t.module, network_dim, network_alpha))
        return cls(mods)

    def attach(self) -> None:
        for m in self.loras:
            m.attach()

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it computed before."""
        for m in self.loras:
            m.detach()

    @property
    def attached(self) -> bool:
        return any(m._handle is not None for m in self.loras)

    def set_multiplier(self, value: float) -> None:
        for m in self.loras:
            m.multiplier = value

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        """One optimizer group for the UNet adapters and one for the text-encoder adapters."""
        unet = [p for m in self.loras if m.lora_name.startswith("lora_unet_") for p in m.parameters()]
        te = [p for m in self.loras if m.lora_name.startswith("lora_te") for p in m.parameters()]
        groups = []
        if unet:
            groups.append({"params": unet, "lr": unet_lr, "name": "unet"})
        if te:
            groups.append({"params": te, "lr": text_encoder_lr, "name": "text_encoder"})
        return groups

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``<lora_name>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` on CPU, contiguous."""
        sd: dict[str, torch.Tensor] = {}
        for m in self.loras:
            for key, t in (
                ("lora_down.weight", m.lora_down.weight),
                ("lora_up.weight", m.lora_up.weight),
                ("alpha", m.alpha),
            ):
                v = t.detach().to("cpu")
                if dtype is not None:
                    v = v.to(dtype)
                sd[f"{m.lora_name}.{key}"] = v.contiguous().clone()
        return sd

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load weights written by :meth:`kohya_state_dict` (for resume and tests); strict."""
        expected = set(self.kohya_state_dict())
        missing = sorted(expected - set(sd))
        extra = sorted(set(sd) - expected)
        if missing or extra:
            raise KeyError(f"LoRA keys do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for m in self.loras:
                m.lora_down.weight.copy_(sd[f"{m.lora_name}.lora_down.weight"])
                m.lora_up.weight.copy_(sd[f"{m.lora_name}.lora_up.weight"])
                alpha = float(sd[f"{m.lora_name}.alpha"])
                m.alpha.fill_(alpha)
                m.scale = alpha / m.rank
