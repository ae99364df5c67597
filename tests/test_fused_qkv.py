"""LoRA on a fused q/k/v ``torch.nn.MultiheadAttention`` (OpenCLIP, as the WebUIs hold SDXL's second
text encoder): the same numbers and gradients as our ordinary hook LoRA on a Hugging Face CLIP text
model with the same weights split into q/k/v, separate q/k/v keys, and the attention exactly as it
was once the LoRA is removed."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from lora_trainer.network import LoRANetwork
from lora_trainer.network.lora import FusedAttentionLoRA
from lora_trainer.network.targets import TEXT_CONTAINERS, FusedProjection, find_targets, openclip_text_targets

# --------------------------------------------------------------------------- an OpenCLIP-shaped text tower


class ResidualAttentionBlock(nn.Module):
    """open_clip.transformer.ResidualAttentionBlock (2.20, no layer scale): ln_1, attn, ln_2, mlp."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ls_1 = nn.Identity()
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, width))])
        )
        self.ls_2 = nn.Identity()

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls_1(self.attention(self.ln_1(x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_width) for _ in range(layers)])


class OpenCLIPText(nn.Module):
    """The text half of open_clip's ``CLIP`` (what sgm's FrozenOpenCLIPEmbedder2 keeps as ``model``), with
    sgm's ``encode_with_transformer`` (legacy=False): penultimate states, and the pooled output of the
    final layer norm at the end-of-text token (the highest id) through ``text_projection``."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, mlp_width: int, proj: int, context: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.transformer = Transformer(width, layers, heads, mlp_width)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, proj))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("attn_mask", torch.empty(context, context).fill_(float("-inf")).triu_(1), persistent=False)

    def encode_with_transformer(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.token_embedding(ids) + self.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND, as open_clip 2.20
        out = {}
        for i, r in enumerate(self.transformer.resblocks):
            if i == len(self.transformer.resblocks) - 1:
                out["penultimate"] = x.permute(1, 0, 2)
            x = r(x, attn_mask=self.attn_mask)
        out["last"] = x.permute(1, 0, 2)
        o = self.ln_final(out["last"])
        out["pooled"] = o[torch.arange(o.shape[0]), ids.argmax(dim=-1)] @ self.text_projection
        return out


def openclip_twin(hf_model: nn.Module) -> OpenCLIPText:
    """An OpenCLIPText with the weights of a HF ``CLIPTextModelWithProjection`` (q/k/v fused)."""
    from lora_trainer.model.sdxl import openclip_from_hf_state_dict

    c = hf_model.config
    m = OpenCLIPText(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.projection_dim)
    sd = openclip_from_hf_state_dict(hf_model.state_dict(), prefix="")
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert set(missing) == {"logit_scale"} and not unexpected, (missing, unexpected)
    return m.eval()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_te2(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_trainer.model.tiny import write_tiny_tokenizer
    from lora_trainer.model.tiny_sdxl import TINY_TE2

    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **TINY_TE2)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = tok(["ohwx ring, blue background", "a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return model, ids


def _randomize(net: LoRANetwork, seed: int = 4) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras:
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * 0.3)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.3)


def _hf_out(model, ids):
    out = model(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def _oc_out(model, ids):
    d = model.encode_with_transformer(ids)
    return d["penultimate"], d["pooled"]


# --------------------------------------------------------------------------- tests


def test_fused_lora_equals_the_unfused_lora_on_the_same_weights(hf_te2):
    """One kohya state dict, applied by hooks to a HF CLIPTextModelWithProjection (separate q/k/v) and by
    the fused path to the OpenCLIP twin: same names, same outputs, same gradients."""
    hf, ids = hf_te2
    oc = openclip_twin(hf)
    with torch.no_grad():
        base_hf, base_oc = _hf_out(hf, ids), _oc_out(oc, ids)
    torch.testing.assert_close(base_oc[0], base_hf[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(base_oc[1], base_hf[1], atol=1e-5, rtol=1e-4)

    hf_targets = find_targets(hf, "lora_te2", TEXT_CONTAINERS)
    oc_targets = openclip_text_targets(oc, "lora_te2")
    assert [t.lora_name for t in oc_targets] == [t.lora_name for t in hf_targets]  # order too: LoRA init draws
    assert len(oc_targets) == 6 * hf.config.num_hidden_layers
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj" in {t.lora_name for t in oc_targets}
    torch.manual_seed(0)
    hf_net = LoRANetwork.create(hf_targets, 4, 2.0)
    _randomize(hf_net)
    oc_net = LoRANetwork.create(oc_targets, 4, 2.0)
    oc_net.load_kohya_state_dict(hf_net.kohya_state_dict())  # strict: every key has its fused part
    assert oc_net.kohya_state_dict().keys() == hf_net.kohya_state_dict().keys()

    hf_net.attach()
    oc_net.attach()
    try:
        a, b = _hf_out(hf, ids), _oc_out(oc, ids)
        assert not torch.allclose(a[0], base_hf[0], atol=1e-3) and not torch.allclose(a[1], base_hf[1], atol=1e-3)
        torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=1e-4)
        (a[0].square().mean() + a[1].square().mean()).backward()
        (b[0].square().mean() + b[1].square().mean()).backward()
        for mh, mo in zip(hf_net.loras, oc_net.loras):
            assert mh.lora_name == mo.lora_name
            for ph, po in ((mh.lora_down.weight, mo.lora_down.weight), (mh.lora_up.weight, mo.lora_up.weight)):
                assert po.grad is not None and po.grad.abs().sum() > 0, mo.lora_name
                torch.testing.assert_close(po.grad, ph.grad, atol=1e-5, rtol=1e-3)
        # multiplier and enabled as for hooks
        hf_net.set_multiplier(0.5)
        oc_net.set_multiplier(0.5)
        with torch.no_grad():
            torch.testing.assert_close(_oc_out(oc, ids)[1], _hf_out(hf, ids)[1], atol=1e-5, rtol=1e-4)
        oc_net.set_multiplier(0.0)
        with torch.no_grad():
            assert torch.equal(_oc_out(oc, ids)[1], base_oc[1])
    finally:
        hf_net.detach()
        oc_net.detach()
    with torch.no_grad():
        after = _oc_out(oc, ids)
    assert torch.equal(after[0], base_oc[0]) and torch.equal(after[1], base_oc[1])
    assert not any("forward" in m.__dict__ for m in oc.modules())


def _mha(batch_first: bool, bias: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(3)
    m = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    return m


def _reference(m: nn.MultiheadAttention, x: torch.Tensor, deltas: dict[str, torch.Tensor], mask=None) -> torch.Tensor:
    """Separate q/k/v/out Linear layers with the LoRA deltas added to their outputs (the hook's view)."""
    d = m.embed_dim
    xs = x.transpose(0, 1) if m.batch_first else x  # (L, N, E)
    w, b = m.in_proj_weight, m.in_proj_bias
    proj = []
    for i, p in enumerate("qkv"):
        y = nn.functional.linear(xs, w[i * d : (i + 1) * d], None if b is None else b[i * d : (i + 1) * d])
        proj.append(y + (xs @ deltas[p].T if p in deltas else 0))
    q, k, v = (t.reshape(t.shape[0], -1, m.num_heads, d // m.num_heads).permute(1, 2, 0, 3) for t in proj)
    a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    a = a.permute(2, 0, 1, 3).reshape(xs.shape[0], xs.shape[1], d)
    out = nn.functional.linear(a, m.out_proj.weight, m.out_proj.bias) + (a @ deltas["out"].T if "out" in deltas else 0)
    return out.transpose(0, 1) if m.batch_first else out


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("parts", [("q", "k", "v", "out"), ("k",), ("out",)])
def test_mha_lora_matches_separate_projections_and_is_removed_exactly(batch_first, parts):
    m = _mha(batch_first)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    mask = torch.empty(5, 5).fill_(float("-inf")).triu_(1)
    state = {k: (v.data_ptr(), v._version, v.clone()) for k, v in m.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        base = m(x, x, x, need_weights=False, attn_mask=mask)[0]

    targets = [t for t in (FusedProjection(m, p) for p in parts)]
    net = LoRANetwork.create([_target(f"lora_{t.part}", t) for t in targets], 3, 1.5)
    _randomize(net)
    deltas = {mod.org_module.part: mod.weight_delta().detach() for mod in net.loras}
    net.attach()
    assert "forward" in m.__dict__
    try:
        with torch.no_grad():
            ours = m(x, x, x, need_weights=False, attn_mask=mask)[0]
            with_weights, attn = m(x, x, x, attn_mask=mask)  # need_weights=True: the averaged weights come back
        ref = _reference(m, x, deltas, mask)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(with_weights, ref, atol=1e-5, rtol=1e-4)
        assert attn.shape == (2, 5, 5)
        assert not torch.allclose(ours, base, atol=1e-4)
    finally:
        net.detach()
    assert "forward" not in m.__dict__
    for k, v in m.state_dict(keep_vars=True).items():
        ptr, version, value = state[k]
        assert v.data_ptr() == ptr and v._version == version and torch.equal(v, value), k
    with torch.no_grad():
        assert torch.equal(m(x, x, x, need_weights=False, attn_mask=mask)[0], base)


def _target(name, module):
    from lora_trainer.network.targets import Target

    return Target(name, module, False)


def test_a_class_level_patch_still_runs_without_an_active_lora_and_after_removal(monkeypatch):
    """A1111 patches ``nn.MultiheadAttention.forward`` globally (its Lora extension): with every LoRA
    disabled our instance forward defers to it, and after removal it is what runs."""
    calls = []
    original = nn.MultiheadAttention.forward

    def patched(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, "forward", patched)
    m = _mha(False)
    x = torch.randn(4, 2, 16)
    net = LoRANetwork.create([_target("lora_q", FusedProjection(m, "q"))], 2, 1.0)
    net.attach()
    with torch.no_grad():
        m(x, x, x)  # active (zero-initialised up, but active): our path, not the host's
        assert calls == []
        net.loras[0].enabled = False
        m(x, x, x)
        assert calls == [1]
    net.detach()
    with torch.no_grad():
        m(x, x, x)
    assert calls == [1, 1]


def test_refuses_an_attention_it_cannot_patch():
    m = _mha(False)
    with pytest.raises(TypeError):
        FusedProjection(nn.Linear(4, 4), "q")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FusedProjection(m, "x")
    m.forward = lambda *a, **k: None  # someone else's instance forward
    net = LoRANetwork.create([_target("lora_q", FusedProjection(m, "q"))], 2, 1.0)
    with pytest.raises(RuntimeError, match="instance forward"):
        net.attach()
    two = LoRANetwork.create([_target("a", FusedProjection(_mha(False), "q"))], 2, 1.0)
    other = two.loras[0].org_module.attention
    dup = LoRANetwork.create([_target("b", FusedProjection(other, "q"))], 2, 1.0)
    two.attach()
    try:
        with pytest.raises(RuntimeError, match="already has a LoRA"):
            dup.attach()
    finally:
        two.detach()
    assert "forward" not in other.__dict__
    assert isinstance(FusedAttentionLoRA(other).loras, dict)


def test_openclip_targets_can_stop_before_the_last_block(hf_te2):
    oc = openclip_twin(hf_te2[0])
    names = [t.lora_name for t in openclip_text_targets(oc, "lora_te", num_layers=1)]
    assert len(names) == 6 and all(n.startswith("lora_te_text_model_encoder_layers_0_") for n in names)
    with pytest.raises(TypeError):
        openclip_text_targets(nn.Linear(2, 2), "lora_te")


def test_half_precision_attention_with_float32_lora_under_autocast():
    """As on a GPU host with half weights: the deltas are cast to the weights' dtype, the gradients reach
    the float32 LoRA parameters."""
    m = _mha(False).to(torch.bfloat16).requires_grad_(False)  # frozen, as the loop leaves host weights
    net = LoRANetwork.create([_target(f"lora_{p}", FusedProjection(m, p)) for p in FusedProjection.PARTS], 3, 1.5)
    _randomize(net)
    x = torch.randn(5, 2, 16)
    net.attach()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, x, x, need_weights=False)[0]
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        out.float().square().mean().backward()
    finally:
        net.detach()
    for mod in net.loras:
        assert mod.lora_up.weight.dtype == torch.float32
        assert mod.lora_up.weight.grad is not None and mod.lora_up.weight.grad.abs().sum() > 0, mod.lora_name
    assert m.in_proj_weight.grad is None and m.out_proj.weight.grad is None and m.in_proj_weight.dtype == torch.bfloat16
