"""The Forge host adapter (lora_trainer/hosts/forge.py), without Forge.

Forge's ``backend`` cannot be imported here, so each Forge trap is rebuilt from what Forge's
source does (read in lllyasviel/stable-diffusion-webui-forge @ dfdcbab6, none of it copied):
weights created under ``torch.inference_mode()``, a textual-inversion wrapper holding the token
embedding's weight a second time, transformer blocks that add residuals in place after a
LayerNorm, a ``Linear`` that is not a ``torch.nn.Linear``, LoRAs left merged by the last
generation. Each trap test shows the failure without our fix and its absence with it. The last
tests run ``ForgeHost.run`` end to end on an LDM UNet built with those traps, through stand-in
``modules`` / ``backend`` / ``networks`` packages.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.hosts.forge import (
    ForgeHost,
    _StateMirror,
    checkpoint_unet_blocks,
    detach_inference_tensors,
    effective_mixed_precision,
    guard_inplace_residuals,
    noise_schedule,
    restore_clean_weights,
)
from lora_trainer.model.ldm import ldm_unet_lora_targets
from lora_trainer.network import LoRANetwork
from lora_trainer.network.lora import LoRAModule
from lora_trainer.network.targets import find_targets, is_linear
from lora_trainer.train.events import EventBus, FileSaved, StepEvent, StopControl, TrainingStarted

INFERENCE_SAVE = "Inference tensors cannot be saved for backward"
NO_VERSION = "Inference tensors do not track version counter"
INPLACE = "modified by an inplace operation"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- Forge-like parts
class Linear(nn.Module):
    """Like Forge's ``ForgeOperations.Linear``: an ``nn.Module`` (not ``nn.Linear``) with weight and
    bias, whose forward casts the weights to the input's dtype when ``parameters_manual_cast``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features, dtype=dtype) / in_features**0.5)
        self.bias = nn.Parameter(torch.randn(out_features, dtype=dtype) * 0.1) if bias else None
        self.parameters_manual_cast = dtype != torch.float32

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.parameters_manual_cast:
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)


def forgeify_linears(root: nn.Module) -> int:
    """Swap every ``nn.Linear`` for the Forge-style ``Linear`` holding the same Parameters."""
    n = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                new = Linear.__new__(Linear)
                nn.Module.__init__(new)
                new.in_features, new.out_features = child.in_features, child.out_features
                new.weight = child.weight
                new.bias = child.bias
                new.parameters_manual_cast = False
                setattr(parent, name, new)
                n += 1
    return n


def as_inference_tensors(root: nn.Module) -> None:
    """What Forge's loader leaves: every parameter and buffer an inference tensor (sharing kept)."""
    made: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for _, owner in root.named_modules(remove_duplicate=False):
            for slots in (owner._parameters, owner._buffers):
                for k, t in list(slots.items()):
                    if t is None:
                        continue
                    if id(t) not in made:
                        data = t.detach().clone()
                        made[id(t)] = (
                            nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                        )
                    slots[k] = made[id(t)]
    made.clear()


class TIWrapper(nn.Module):
    """Like Forge's ``CLIPEmbeddingForTextualInversion``: wraps the token embedding and registers
    its weight a second time as its own ``weight``."""

    def __init__(self, wrapped: nn.Embedding):
        super().__init__()
        self.wrapped = wrapped
        self.weight = wrapped.weight

    def forward(self, ids):
        return self.wrapped(ids)


class TinyTextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding = TIWrapper(nn.Embedding(16, 8))
        self.register_buffer("position_ids", torch.arange(4))
        self.position_embedding = nn.Embedding(4, 8)
        self.lin1 = nn.Linear(8, 8)
        self.lin2 = nn.Linear(8, 8)

    def forward(self, ids):
        h = self.token_embedding(ids) + self.position_embedding(self.position_ids[: ids.shape[1]])
        return self.lin2(torch.relu(self.lin1(h)))


def forge_like_dtype_cast(model: TinyTextModel) -> None:
    """What Forge's ``encode_with_transformers`` does before every text encode (in the caller's mode)."""
    model.token_embedding = model.token_embedding.to(dtype=torch.float16)
    model.token_embedding = model.token_embedding.to(dtype=torch.float32)


def _train_one_step(model: TinyTextModel) -> None:
    lora = LoRAModule("lora_te_lin1", model.lin1, 2, 1.0)
    with torch.no_grad():
        lora.lora_up.weight.fill_(0.1)
    lora.attach()
    try:
        ids = torch.tensor([[1, 2, 3, 4]])
        loss = model(ids).pow(2).mean()
        loss.backward()  # through lin2, whose weight autograd must save
        assert lora.lora_down.weight.grad is not None and lora.lora_down.weight.grad.abs().sum() > 0
    finally:
        lora.detach()


def _inference_text_model() -> TinyTextModel:
    torch.manual_seed(0)
    with torch.inference_mode():
        return TinyTextModel().eval()


def _naive_detach(module: nn.Module) -> None:
    """The tempting fix that misses shared references: one replacement per *unique* parameter name."""
    with torch.inference_mode(False):
        for name, p in list(module.named_parameters()):
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            owner._parameters[name.rpartition(".")[2]] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


# ------------------------------------------------------------------------ (a) inference tensors
def test_inference_weights_fail_backward_without_the_fix():
    model = _inference_text_model()
    with pytest.raises(RuntimeError, match=INFERENCE_SAVE):
        _train_one_step(model)


def test_detach_inference_tensors_makes_backward_work_and_keeps_values_and_sharing():
    model = _inference_text_model()
    with torch.inference_mode(False):
        before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    model.lin2.weight.requires_grad_(False)
    modules_before = dict(model.named_modules())
    flags = {k: p.requires_grad for k, p in model.named_parameters(remove_duplicate=False)}

    n = detach_inference_tensors(model)

    # every distinct tensor once (the shared embedding weight too, although it has two names)
    distinct = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    assert n == len(distinct)
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        assert not t.is_inference(), name
        assert torch.equal(t, before[name]), f"{name} changed value"
    assert isinstance(model.lin1.weight, nn.Parameter)
    assert {k: p.requires_grad for k, p in model.named_parameters(remove_duplicate=False)} == flags
    assert model.token_embedding.weight is model.token_embedding.wrapped.weight, "sharing is kept"
    assert dict(model.named_modules()) == modules_before, "same module objects"
    _train_one_step(model)
    assert detach_inference_tensors(model) == 0, "a second call has nothing to do"


def test_shared_reference_is_replaced_too():
    """Forge's text engine casts the token-embedding wrapper's dtype before each encode. A weight that
    stayed an inference tensor behind the second reference becomes, after that cast outside
    inference mode, a tensor without a version counter: the next generation (inference mode) fails."""
    naive = _inference_text_model()
    _naive_detach(naive)
    assert naive.token_embedding.wrapped.weight.is_inference(), "the naive fix misses the second reference"
    forge_like_dtype_cast(naive)  # during training, outside inference mode
    with pytest.raises(RuntimeError, match=NO_VERSION):
        with torch.inference_mode():
            naive(torch.tensor([[1, 2]]))

    model = _inference_text_model()
    detach_inference_tensors(model)
    _train_one_step(model)
    forge_like_dtype_cast(model)
    with torch.inference_mode():  # the next txt2img
        model(torch.tensor([[1, 2]]))
    model(torch.tensor([[1, 2]]))


def test_tensor_without_version_counter_is_repaired():
    model = _inference_text_model()
    forge_like_dtype_cast(model)  # the cast outside inference mode leaves counter-less tensors
    assert detach_inference_tensors(model) >= 1
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]))


# -------------------------------------------------------------------- (b) in-place residual adds
class InplaceBlock(nn.Module):
    """The residual pattern of Forge's ``BasicTransformerBlock._forward``: ``x += n`` after a
    LayerNorm saved ``x`` (``inplace=False`` is the same block with out-of-place adds)."""

    def __init__(self, d: int = 8, inplace: bool = True):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(d), Linear(d, d)
        self.norm2, self.attn2 = nn.LayerNorm(d), Linear(d, d)
        self.norm3, self.ff = nn.LayerNorm(d), Linear(d, d)
        self.inplace = inplace

    def forward(self, x):
        if not self.inplace:
            x = self.attn1(self.norm1(x)) + x
            x = self.attn2(self.norm2(x)) + x
            return self.ff(self.norm3(x)) + x
        n = self.attn1(self.norm1(x))
        x += n
        n = self.attn2(self.norm2(x))
        x += n
        skip = x
        x = self.ff(self.norm3(x))
        x += skip
        return x


class Spatial(nn.Module):
    """proj -> two in-place blocks -> residual, like Forge's SpatialTransformer."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.proj = Linear(8, 8)
        self.transformer_blocks = nn.ModuleList([InplaceBlock(inplace=inplace), InplaceBlock(inplace=inplace)])

    def forward(self, x):
        x_in = x
        x = self.proj(x).contiguous()
        for block in self.transformer_blocks:
            x = block(x)
        return x + x_in


class Stack(nn.Module):
    """Two Spatial units in ``input_blocks`` (the LDM name :func:`checkpoint_unet_blocks` looks for)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.input_blocks = nn.ModuleList([Spatial(inplace), Spatial(inplace)])

    def forward(self, x):
        for block in self.input_blocks:
            x = block(x)
        return x


def _grad_through(model: nn.Module, wrap=None) -> torch.Tensor:
    torch.manual_seed(3)
    lora_in = nn.Linear(8, 8)  # a trainable layer before the model (like a LoRA upstream)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    h = lora_in(x)
    y = wrap(model, h) if wrap else model(h)
    (y**2).sum().backward()
    return lora_in.weight.grad


def _stacks():
    torch.manual_seed(0)
    model = Stack(inplace=True).requires_grad_(False)
    reference = Stack(inplace=False).requires_grad_(False)
    reference.load_state_dict(model.state_dict())
    return model, reference


def test_inplace_residuals_fail_backward_without_the_fix():
    model, _ = _stacks()
    with pytest.raises(RuntimeError, match=INPLACE):
        _grad_through(model)


def test_checkpointing_alone_gives_wrong_gradients():
    """Why the fix is not "wrap the blocks in checkpoint(use_reentrant=False)": backward then runs,
    but the recomputation repeats the in-place adds on the tensors it saved, and the gradient is wrong."""
    from torch.utils.checkpoint import checkpoint

    model, reference = _stacks()
    want = _grad_through(reference)
    got = _grad_through(model, lambda m, h: checkpoint(m, h, use_reentrant=False))
    assert (got - want).abs().max() > 1e-2


def test_guard_gives_exact_gradients_and_is_removable():
    model, reference = _stacks()
    want = _grad_through(reference)
    undo = guard_inplace_residuals(model)
    torch.testing.assert_close(_grad_through(model), want, rtol=0, atol=1e-6)
    with torch.no_grad():
        y = model(torch.ones(1, 2, 8))
    undo()
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(torch.ones(1, 2, 8)), y)
    with pytest.raises(RuntimeError, match=INPLACE):
        _grad_through(model)


def test_block_checkpointing_with_the_guard_gives_exact_gradients():
    model, reference = _stacks()
    want = _grad_through(reference)
    undo_guard = guard_inplace_residuals(model)
    undo_ckpt = checkpoint_unet_blocks(model)
    assert all("forward" in vars(b) for b in model.input_blocks)
    torch.testing.assert_close(_grad_through(model), want, rtol=0, atol=1e-6)
    undo_ckpt()
    undo_guard()
    assert all("forward" not in vars(b) for b in model.input_blocks)


# --------------------------------------------------------------------- (c) Forge's Linear class
class CLIPAttention(nn.Module):  # a text-encoder LoRA container, by class name
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.q_proj = Linear(8, 8, dtype=dtype)

    def forward(self, x):
        return self.q_proj(x)


def test_lora_attaches_to_forge_linear_and_detaches_bit_for_bit():
    torch.manual_seed(0)
    root = nn.Sequential(CLIPAttention())
    layer = root[0].q_proj
    assert not isinstance(layer, nn.Linear) and is_linear(layer)
    targets = find_targets(root, "lora_te", frozenset({"CLIPAttention"}))
    assert [t.lora_name for t in targets] == ["lora_te_0_q_proj"]
    net = LoRANetwork.create(targets, 4, 4.0)
    with torch.no_grad():
        net.loras[0].lora_up.weight.normal_()
    x = torch.randn(3, 8)
    with torch.no_grad():
        base = root(x)
        net.attach()
        changed = root(x)
        net.detach()
        after = root(x)
    assert (changed - base).abs().max() > 1e-3
    assert torch.equal(after, base)


def test_fp32_lora_trains_on_a_half_precision_forge_linear():
    """Forge's text encoder is fp16 by default (also on the CPU): LoRA weights stay fp32 and get grads."""
    torch.manual_seed(0)
    root = nn.Sequential(CLIPAttention(dtype=torch.float16)).requires_grad_(False)
    net = LoRANetwork.create(find_targets(root, "lora_te", frozenset({"CLIPAttention"})), 4, 4.0)
    net.to(torch.float32)
    with torch.no_grad():
        net.loras[0].lora_up.weight.fill_(0.01)
    net.attach()
    out = root(torch.randn(2, 8, dtype=torch.float16))
    assert out.dtype == torch.float16
    out.float().pow(2).mean().backward()
    net.detach()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ----------------------------------------------------------------- (d) host LoRAs left merged
class ForgeObjects:
    def __init__(self, unet, clip=None):
        self.unet, self.clip = unet, clip

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip)


class SimLoraLoader:
    """Forge's ``LoraLoader`` in short: merges patches into the shared weights, keeps the originals."""

    def __init__(self, model: nn.Module):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    def refresh(self, patches: dict):
        h = str(sorted(patches))
        if h == self.loaded_hash:
            return
        for k, w in self.backup.items():
            setattr(self.model, k, w)
        self.backup = {}
        for k, delta in patches.values():
            self.backup.setdefault(k, getattr(self.model, k))
            setattr(self.model, k, nn.Parameter(getattr(self.model, k) + delta, requires_grad=False))
        self.loaded_hash = h


class SimPatcher:
    def __init__(self, model: nn.Module, patches: dict | None = None):
        self.model = model
        self.patches = patches or {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = SimLoraLoader(model)

    def with_lora(self, name: str, delta: torch.Tensor) -> SimPatcher:
        return SimPatcher(self.model, {**self.patches, name: ("weight", delta)})

    def refresh_loras(self):
        self.model.lora_loader.refresh(self.patches)


def sim_load_models_gpu(patchers, **_):
    for p in patchers:
        p.refresh_loras()


def sim_generate(sd_model, loras: dict[str, torch.Tensor]) -> torch.Tensor:
    """A generation as Forge's processing.py + sd_forge_lora do it, reduced to the LoRA bookkeeping."""
    sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
    wanted = str(sorted(loras))
    if sd_model.current_lora_hash != wanted:  # networks.load_networks
        sd_model.current_lora_hash = wanted
        unet = sd_model.forge_objects_original.unet
        for name, delta in loras.items():
            unet = unet.with_lora(name, delta)
        sd_model.forge_objects.unet = unet
        sd_model.forge_objects_after_applying_lora = sd_model.forge_objects.shallow_copy()
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    sim_load_models_gpu([sd_model.forge_objects.unet])  # sampling loads the UNet
    return sd_model.forge_objects.unet.model.weight.detach().clone()


def _sim_model():
    layer = nn.Linear(3, 3, bias=False)
    clean = layer.weight.detach().clone()
    original = ForgeObjects(SimPatcher(layer))
    sd_model = types.SimpleNamespace(
        forge_objects=original.shallow_copy(),
        forge_objects_original=original,
        forge_objects_after_applying_lora=original.shallow_copy(),
        current_lora_hash=str([]),
    )
    return sd_model, layer, clean


def test_merged_host_lora_is_removed_and_not_merged_again():
    delta = torch.full((3, 3), 0.5)
    sd_model, layer, clean = _sim_model()
    assert not torch.equal(sim_generate(sd_model, {"style": delta}), clean)
    assert not torch.equal(layer.weight, clean), "without the fix training would start from merged weights"

    restore_clean_weights(sd_model, sim_load_models_gpu)
    assert torch.equal(layer.weight, clean)
    assert sd_model.current_lora_hash == str([])
    assert torch.equal(sim_generate(sd_model, {}), clean), "a generation without LoRA stays clean"
    assert torch.equal(sim_generate(sd_model, {"style": delta}), clean + delta), "and the LoRA applies again"


def test_resetting_only_the_hash_merges_the_old_lora_again():
    """HOSTS.md section 4's recipe alone (load the original UNet, reset ``current_lora_hash``) is not
    enough: ``forge_objects_after_applying_lora`` still holds the LoRA patcher, and the next
    generation without a LoRA merges it back."""
    delta = torch.full((3, 3), 0.5)
    sd_model, layer, clean = _sim_model()
    sim_generate(sd_model, {"style": delta})
    sim_load_models_gpu([sd_model.forge_objects_original.unet])
    sd_model.current_lora_hash = str([])
    assert torch.equal(layer.weight, clean)
    assert not torch.equal(sim_generate(sd_model, {}), clean)


# -------------------------------------------------------------------------- small host pieces
def test_noise_schedule_from_predictor():
    pred = nn.Module()
    pred.prediction_type = "v_prediction"
    with torch.inference_mode():
        pred.register_buffer("alphas_cumprod", torch.linspace(0.99, 0.01, 1000))
    ptype, ac = noise_schedule(pred)
    assert ptype == "v_prediction" and not ac.is_inference() and ac.dtype == torch.float32
    assert noise_schedule(pred, "epsilon")[0] == "epsilon"
    pred.prediction_type = "edm"
    with pytest.raises(LoraTrainerError):
        noise_schedule(pred)


def test_mixed_precision_follows_a_half_precision_unet_on_cuda():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert effective_mixed_precision("no", cuda, torch.float16) == "fp16"  # loss scaling for an fp16 UNet
    assert effective_mixed_precision("no", cuda, torch.bfloat16) == "bf16"
    assert effective_mixed_precision("no", cuda, torch.float32) == "no"
    assert effective_mixed_precision("no", cpu, torch.float16) == "no"
    assert effective_mixed_precision("bf16", cuda, torch.float16) == "bf16"


def test_state_mirror_progress_and_interrupt():
    host = ForgeHost()
    host.refresh_loras = lambda: refreshed.append(1)  # type: ignore[method-assign]
    refreshed: list[int] = []
    state = types.SimpleNamespace(interrupted=False, stopping_generation=False, job_count=0, job_no=0, textinfo="")
    stop = StopControl()
    mirror = _StateMirror(host, state, stop)
    mirror(TrainingStarted(10, 2, 5, 4, ""))
    mirror(StepEvent(3, 10, 1, 0.5, 0.4, {}, 1.0, 2.0))
    assert (state.job_count, state.job_no) == (10, 3) and "step 3/10" in state.textinfo
    mirror(FileSaved("/x/a-000001.safetensors", 1, 5, False))
    assert refreshed == [1]
    state.stopping_generation = True
    mirror(StepEvent(4, 10, 1, 0.5, 0.4, {}, 1.0, 2.0))
    assert stop.requested and stop.save
    stop2 = StopControl()
    state.stopping_generation, state.interrupted = False, True
    _StateMirror(host, state, stop2)(StepEvent(5, 10, 1, 0.5, 0.4, {}, 1.0, 2.0))
    assert stop2.requested and not stop2.save


# ---------------------------------------------------------------- end to end, with fake Forge
def _inplace_forward(self, x, context=None):
    """ldm's transformer block with Forge's in-place residual adds (set on the instances' class)."""
    n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
    x += n
    n = self.attn2(self.norm2(x), context=context)
    x += n
    skip = x
    x = self.ff(self.norm3(x))
    x += skip
    return x


LDM_UNET = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[1],
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=[32],
    num_heads=4,
    legacy=False,
)


def build_forge_unet(seed: int = 0) -> nn.Module:
    """An LDM UNet with Forge's traits: in-place residual adds, Forge-style Linear, inference tensors."""
    import contextlib
    import io

    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    ldm_attention = pytest.importorskip("ldm.modules.attention")
    inplace_block = type(
        "InplaceTransformerBlock", (ldm_attention.BasicTransformerBlock,), {"_forward": _inplace_forward}
    )
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        unet = openaimodel.UNetModel(**LDM_UNET).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():  # ldm zero-inits its output convs: make every weight matter
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    for m in unet.modules():
        if type(m) is ldm_attention.BasicTransformerBlock:
            m.__class__ = inplace_block
    assert forgeify_linears(unet) > 0
    unet.computation_dtype = torch.float32
    unet.storage_dtype = torch.float32
    return unet


class FakePatcher:
    def __init__(self, model, load_device="cpu"):
        self.model = model
        self.load_device = torch.device(load_device)
        self.lora_patches: dict = {}

    def refresh_loras(self):
        # what Forge's LoraLoader does when the LoRA-free patcher is loaded: the weights a
        # generation merged a LoRA into are put back (see fake_processing)
        undo = self.__dict__.pop("undo_merge", None)
        if undo is not None:
            undo()

    def memory_required(self, shape):
        return 0


class FakeFirstStage(nn.Module):
    """Forge's VAE module interface (``encode(x, regulation)``, ``process_in``) over diffusers' VAE."""

    def __init__(self, vae, scale: float = 0.18215):
        super().__init__()
        self.vae = vae
        self.scale = scale

    def encode(self, x, regulation=None):
        posterior = self.vae.encode(x).latent_dist
        return regulation(posterior) if regulation is not None else posterior.sample()

    def process_in(self, z):
        return z * self.scale


class FakeEngine:
    """Forge's ClassicTextProcessingEngine as far as training sees it: wraps the token embedding for
    textual inversion (second reference), casts it to fp32 before each encode, clip skip."""

    def __init__(self, clip_wrapper, tokenizer):
        self.text_encoder = clip_wrapper
        self.tokenizer = tokenizer
        self.clip_skip = 1
        self.minimal_clip_skip = 1
        emb = clip_wrapper.transformer.text_model.embeddings
        emb.token_embedding = TIWrapper(emb.token_embedding)

    def __call__(self, texts):
        emb = self.text_encoder.transformer.text_model.embeddings
        emb.token_embedding = emb.token_embedding.to(dtype=torch.float32)
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = self.text_encoder.transformer(ids, output_hidden_states=True)
        z = out.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        return self.text_encoder.transformer.text_model.final_layer_norm(z)


def fake_forge_objects(kmodel: nn.Module, cond_stage_model: nn.Module, first_stage: nn.Module) -> dict:
    """Forge's patchers around the parts (weights as inference tensors, as Forge loads them), and
    the ``sd_model`` attributes that hold them, with a LoRA applied in the last generation."""
    for m in (kmodel, cond_stage_model, first_stage):
        as_inference_tensors(m)
    clip = types.SimpleNamespace(cond_stage_model=cond_stage_model, patcher=FakePatcher(cond_stage_model))
    vae = types.SimpleNamespace(
        first_stage_model=first_stage,
        patcher=FakePatcher(first_stage),
        device=torch.device("cpu"),
        vae_dtype=torch.float32,
        memory_used_encode=lambda shape, dtype: 1,
    )
    original = types.SimpleNamespace(unet=FakePatcher(kmodel), clip=clip, vae=vae)
    original.shallow_copy = lambda: types.SimpleNamespace(
        unet=original.unet, clip=original.clip, vae=original.vae, shallow_copy=original.shallow_copy
    )
    return {
        "forge_objects": original.shallow_copy(),
        "forge_objects_original": original,
        "forge_objects_after_applying_lora": original.shallow_copy(),
        "current_lora_hash": "[('some.safetensors', 1.0, 1.0, False)]",
    }


def build_fake_sd_model(tiny_sd):
    unet = build_forge_unet()
    kmodel = nn.Module()
    kmodel.diffusion_model = unet
    kmodel.predictor = nn.Module()
    kmodel.predictor.prediction_type = "epsilon"
    from lora_trainer.model.sd import alphas_cumprod_from_config

    kmodel.predictor.register_buffer("alphas_cumprod", alphas_cumprod_from_config(tiny_sd.scheduler_config))
    kmodel.storage_dtype = torch.float32

    clip_l = nn.Module()
    clip_l.transformer = tiny_sd.text_encoder.eval()
    forgeify_linears(clip_l)
    cond_stage_model = nn.ModuleDict({"clip_l": clip_l})
    engine = FakeEngine(clip_l, tiny_sd.tokenizer)
    first_stage = FakeFirstStage(tiny_sd.vae.eval())
    return types.SimpleNamespace(
        **fake_forge_objects(kmodel, cond_stage_model, first_stage),
        is_sd1=True,
        is_sd2=False,
        is_sdxl=False,
        text_processing_engine=engine,
        sd_checkpoint_info=types.SimpleNamespace(title="tiny [0000]", filename="/models/tiny.safetensors", sha256=None),
    )


class FakeState:
    def __init__(self):
        self.calls: list[str] = []
        self.interrupted = False
        self.stopping_generation = False
        self.job_count = self.job_no = 0
        self.textinfo = ""

    def begin(self, job="(unknown)"):
        self.calls.append(f"begin:{job}")

    def end(self):
        self.calls.append("end")


@pytest.fixture
def fake_forge(tiny_sd, tmp_path, monkeypatch):
    """``modules``, ``modules_forge``, ``backend`` and ``networks`` as Forge has them, reduced."""
    sd_model = build_fake_sd_model(tiny_sd)
    log: list[tuple] = []

    def load_models_gpu(patchers, memory_required=0, hard_memory_preservation=0):
        log.append(("load", tuple(id(p) for p in patchers)))
        for p in patchers:
            p.refresh_loras()

    shared = types.SimpleNamespace(
        sd_model=sd_model,
        cmd_opts=types.SimpleNamespace(lora_dir=str(tmp_path / "models" / "Lora")),
        opts=types.SimpleNamespace(lora_trainer_subfolder="trained"),
        state=FakeState(),
    )
    call_queue = types.SimpleNamespace(queue_lock=threading.Lock())
    sd_models = types.SimpleNamespace(forge_model_reload=lambda: log.append(("reload",)))
    main_thread = types.SimpleNamespace(
        run_and_wait_result=lambda fn, *a, **k: (log.append(("main_thread",)), fn(*a, **k))[1]
    )
    mm = types.SimpleNamespace(load_models_gpu=load_models_gpu)
    networks = types.SimpleNamespace(list_available_networks=lambda: log.append(("refresh",)))

    modules = types.ModuleType("modules")
    modules.shared, modules.call_queue, modules.sd_models = shared, call_queue, sd_models
    modules_forge = types.ModuleType("modules_forge")
    modules_forge.main_thread = main_thread
    backend = types.ModuleType("backend")
    backend.memory_management = mm
    for name, mod in {
        "modules": modules,
        "modules.shared": shared,
        "modules.call_queue": call_queue,
        "modules.sd_models": sd_models,
        "modules_forge": modules_forge,
        "modules_forge.main_thread": main_thread,
        "backend": backend,
        "backend.memory_management": mm,
        "networks": networks,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(sd_model=sd_model, shared=shared, log=log)


def run_in_thread(host: ForgeHost, cfg, bus: EventBus, stop: StopControl) -> None:
    """As the training job does it: ``run`` in a background thread (not Forge's main thread)."""
    box: dict = {}

    def target():
        try:
            host.run(cfg, bus, stop)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(120)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]


def _forward_in_inference_mode(sd_model) -> torch.Tensor:
    unet = sd_model.forge_objects_original.unet.model.diffusion_model
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    with torch.inference_mode():
        return unet(x, torch.tensor([500]), context=ctx, transformer_options={}).clone()


def _host_state(sd_model):
    roots = [sd_model.forge_objects_original.unet.model, sd_model.forge_objects_original.clip.cond_stage_model]
    flags = [(k, p.requires_grad) for r in roots for k, p in r.named_parameters(remove_duplicate=False)]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for r in roots for m in r.modules())
    return flags, hooks


def test_forge_host_trains_end_to_end(fake_forge, tiny_config):
    from safetensors.torch import load_file

    sd_model, log = fake_forge.sd_model, fake_forge.log
    cfg = tiny_config.__class__(
        **{**tiny_config.to_dict(), "cache_latents": False, "clip_skip": 2, "save_every_n_epochs": 1}
    )
    before = _forward_in_inference_mode(sd_model)
    flags_before, hooks_before = _host_state(sd_model)
    engine = sd_model.text_processing_engine

    steps: list[int] = []
    loads_at_step: list[int] = []
    clip_skip_seen: list[int] = []

    def listen(ev):
        if isinstance(ev, StepEvent):
            steps.append(ev.step)
            loads_at_step.append(sum(1 for e in log if e[0] == "load"))
            clip_skip_seen.append(engine.clip_skip)

    run_in_thread(ForgeHost(), cfg, EventBus(listen), StopControl())

    # files went to Forge's LoRA folder (+ sub-folder), one per epoch, and the list was refreshed after each
    folder = Path(fake_forge.shared.cmd_opts.lora_dir) / "trained"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == ["t-000001.safetensors", "t.safetensors"]
    assert sum(1 for e in log if e == ("refresh",)) >= 2
    sd = load_file(str(folder / "t.safetensors"))
    # the tiny model is not laid out as SD1.5 (one ResBlock per level): LDM names, as standalone
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in sd), "LDM names off SD1.5's layout"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_up" in k), "the LoRA learned something"

    # the model was (re)loaded on Forge's main thread; host LoRA state reset
    assert log[0] == ("main_thread",) and log[1] == ("reload",)
    assert sd_model.current_lora_hash == str([])
    # placement: the UNet+CLIP load happens after the last VAE load, once, and never during the loop
    unet_clip = (id(sd_model.forge_objects.unet), id(sd_model.forge_objects.clip.patcher))
    vae = (id(sd_model.forge_objects.vae.patcher),)
    loads = [e[1] for e in log if e[0] == "load"]
    last_vae = max(i for i, p in enumerate(loads) if p == vae)
    assert loads[last_vae + 1 :] == [unet_clip]
    assert len(set(loads_at_step)) == 1 and steps == list(range(1, len(steps) + 1))
    assert clip_skip_seen and set(clip_skip_seen) == {2} and engine.clip_skip == 1

    # the host is as it was: progress ended, hooks gone, flags back, same output bit for bit
    assert fake_forge.shared.state.calls == ["begin:lora_trainer", "end"]
    assert fake_forge.shared.state.job_no == len(steps) and "saved" in fake_forge.shared.state.textinfo
    flags_after, hooks_after = _host_state(sd_model)
    assert flags_after == flags_before and hooks_after == hooks_before
    assert torch.equal(_forward_in_inference_mode(sd_model), before)
    # and Forge can still encode text in inference mode (the shared embedding reference was fixed)
    with torch.inference_mode():
        engine(["a photo"])


@pytest.mark.parametrize("broken", ["detach_inference_tensors", "guard_inplace_residuals"])
def test_forge_host_fails_without_each_fix(fake_forge, tiny_config, monkeypatch, broken):
    import lora_trainer.hosts.forge as forge

    if broken == "detach_inference_tensors":
        monkeypatch.setattr(forge, broken, lambda module: 0)
        match = INFERENCE_SAVE
    else:
        monkeypatch.setattr(forge, broken, lambda unet: lambda: None)
        match = INPLACE
    cfg = tiny_config.__class__(**{**tiny_config.to_dict(), "max_train_steps": 1})
    with pytest.raises(RuntimeError) as info:
        run_in_thread(ForgeHost(), cfg, EventBus(), StopControl())
    chain, e = [], info.value
    while e is not None:  # without the detach, restoring grad flags in the loop's finally fails too
        chain.append(str(e))
        e = e.__context__
    assert any(match in m for m in chain), chain
    assert fake_forge.shared.state.calls == ["begin:lora_trainer", "end"]


def test_forge_host_gradient_checkpointing_matches(fake_forge, tiny_config):
    """Activation checkpointing (our wrapper: Forge's own raises NotImplementedError) trains to the
    same LoRA as without it."""
    from safetensors.torch import load_file

    base = {**tiny_config.to_dict(), "max_train_steps": 3, "save_precision": "float"}
    out = []
    for i, gc in enumerate((False, True)):
        cfg = tiny_config.__class__(**{**base, "gradient_checkpointing": gc, "output_name": f"gc{i}"})
        run_in_thread(ForgeHost(), cfg, EventBus(), StopControl())
        out.append(load_file(str(Path(fake_forge.shared.cmd_opts.lora_dir) / "trained" / f"gc{i}.safetensors")))
    assert out[0].keys() == out[1].keys()
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=0, atol=1e-6)


def test_forge_lora_targets_match_ldm_names(fake_forge):
    unet = fake_forge.sd_model.forge_objects.unet.model.diffusion_model
    targets = ldm_unet_lora_targets(unet, include_conv=False)
    assert targets and any(not isinstance(t.module, nn.Linear) and is_linear(t.module) for t in targets)


def test_lora_dir_and_subfolder(fake_forge):
    host = ForgeHost()
    root = Path(fake_forge.shared.cmd_opts.lora_dir)
    assert host.lora_dir() == root / "trained"
    fake_forge.shared.opts.lora_trainer_subfolder = ""
    assert host.lora_dir() == root
    fake_forge.shared.opts.lora_trainer_subfolder = "../elsewhere"
    with pytest.raises(ConfigError):
        host.lora_dir()


def test_unsupported_models_are_refused(fake_forge, tiny_config):
    from lora_trainer.train.runtime import Runtime

    fake_forge.sd_model.is_sd1, fake_forge.sd_model.is_sdxl = False, True  # SDXL-type without SDXL's parts
    with pytest.raises(LoraTrainerError, match="not an SDXL base model"):
        ForgeHost().model_bundle(tiny_config, Runtime("cpu"))
    fake_forge.sd_model.is_sdxl = False
    with pytest.raises(LoraTrainerError, match="not Stable Diffusion"):
        ForgeHost().model_bundle(tiny_config, Runtime("cpu"))


def test_an_overflowing_vae_is_reported_with_forges_fix(fake_forge, tiny_config, monkeypatch):
    """SDXL's VAE overflows in fp16: NaN latents stop the run before training, naming Forge's flag."""
    from lora_trainer.train.events import EventBus, StopControl

    fsm = fake_forge.sd_model.forge_objects.vae.first_stage_model
    monkeypatch.setattr(fsm, "process_in", lambda z: z * float("nan"))
    with pytest.raises(LoraTrainerError, match="non-finite latents.*--vae-in-fp32"):
        ForgeHost().run(tiny_config, EventBus(), StopControl())
    assert not list(ForgeHost().lora_dir().glob("*.safetensors"))


# --------------------------------------------------------------- the grid through Forge's txt2img
@pytest.fixture
def fake_processing(fake_forge, monkeypatch):
    """``modules.processing`` as far as the grid uses it. Each generation does what a Forge txt2img
    with ``<lora:...>`` leaves behind: the text engine's clip skip set from the host option (1), and
    a LoRA merged into a UNet weight (a new Parameter; loading the LoRA-free patcher undoes it)."""
    from PIL import Image

    sd_model = fake_forge.sd_model
    calls: list[dict] = []
    processing = types.ModuleType("modules.processing")

    class P:
        def __init__(self, **kw):
            self.kw = kw

        def close(self):
            pass

    def process_images(p):
        assert sys.modules["modules"].call_queue.queue_lock.locked(), "generation is locked out"
        fake_forge.log.append(("generate", p.kw["prompt"]))
        calls.append(p.kw)
        sd_model.text_processing_engine.clip_skip = 1
        patcher = sd_model.forge_objects_original.unet
        layer = patcher.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
        clean = layer.weight
        with torch.inference_mode():
            layer.weight = nn.Parameter(clean + 0.5, requires_grad=False)
        patcher.__dict__.setdefault("undo_merge", lambda: setattr(layer, "weight", clean))
        sd_model.current_lora_hash = f"[{p.kw['prompt']!r}]"
        shade = int(255 * float(p.kw["prompt"].rsplit(":", 1)[1].rstrip(">")))
        return types.SimpleNamespace(images=[Image.new("RGB", (p.kw["width"], p.kw["height"]), (shade, 0, 0))])

    processing.StableDiffusionProcessingTxt2Img = P
    processing.process_images = process_images
    monkeypatch.setitem(sys.modules, "modules.processing", processing)
    monkeypatch.setattr(sys.modules["modules"], "processing", processing, raising=False)
    return calls


def _grid_cfg(tiny_config, **kw):
    base = {**tiny_config.to_dict(), "grid_weights": "0, 1", "grid_prompt": "ohwx ring", "grid_seed": 9}
    return tiny_config.__class__(**{**base, **kw})


def test_grid_after_training_goes_through_forges_txt2img(fake_forge, fake_processing, tiny_config):
    """The epochs x weights grid after training: each cell one txt2img with <lora:file:w>, on Forge's
    main thread, while generation is locked out; the PNG lands next to the epoch files and the job
    reports its progress. (Forge's adapter made no grid before: the real-Forge trial found it.)"""
    from PIL import Image

    from lora_trainer.train.events import GridProgress, GridSaved

    events: list = []
    run_in_thread(ForgeHost(), _grid_cfg(tiny_config, grid_after_training=True), EventBus(events.append), StopControl())
    assert {c["prompt"] for c in fake_processing} == {
        "ohwx ring, <lora:t-000001:0>", "ohwx ring, <lora:t:0>", "ohwx ring, <lora:t-000001:1>", "ohwx ring, <lora:t:1>"
    }  # fmt: skip
    assert all(c["seed"] == 9 and c["do_not_save_samples"] and c["scheduler"] == "Automatic" for c in fake_processing)
    log = fake_forge.log
    gens = [i for i, e in enumerate(log) if e[0] == "generate"]
    assert len(gens) == 4 and all(log[i - 1] == ("main_thread",) for i in gens), "each cell on Forge's main thread"
    grid = Path(fake_forge.shared.cmd_opts.lora_dir) / "trained" / "t_grid.png"
    with Image.open(grid) as im:
        assert "lora_trainer_grid" in im.text
    assert [e.done for e in events if isinstance(e, GridProgress)][-1] == 4
    assert [e.path for e in events if isinstance(e, GridSaved)] == [str(grid)]
    assert fake_forge.shared.state.calls == ["begin:lora_trainer", "end", "begin:LoRA grid", "end"]


def test_grid_is_skipped_when_switched_off_or_stopped(fake_forge, fake_processing, tiny_config):
    run_in_thread(ForgeHost(), _grid_cfg(tiny_config, grid_after_training=False), EventBus(), StopControl())
    fake_forge.shared.opts.lora_trainer_grid_after_training = False
    run_in_thread(
        ForgeHost(), _grid_cfg(tiny_config, grid_after_training=True, output_name="u"), EventBus(), StopControl()
    )
    assert fake_processing == []


def test_a_failing_grid_does_not_fail_the_training(fake_forge, tiny_config):
    # no modules.processing at all: the grid fails, the files stay, the run ends normally
    from lora_trainer.train.events import Message

    messages: list[str] = []
    bus = EventBus(lambda e: messages.append(e.text) if isinstance(e, Message) else None)
    run_in_thread(ForgeHost(), _grid_cfg(tiny_config, grid_after_training=True), bus, StopControl())
    assert (Path(fake_forge.shared.cmd_opts.lora_dir) / "trained" / "t.safetensors").is_file()
    assert any("grid could not be built" in m for m in messages)


def test_build_grid_button(fake_forge, fake_processing, tiny_config, tmp_path):
    """The Build grid button on saved files: Forge's txt2img under the queue lock, the PNG beside them."""
    run_in_thread(ForgeHost(), _grid_cfg(tiny_config, grid_after_training=False), EventBus(), StopControl())
    folder = Path(fake_forge.shared.cmd_opts.lora_dir) / "trained"
    files = [str(folder / "t-000001.safetensors"), str(folder / "t.safetensors")]
    ForgeHost().build_grid(_grid_cfg(tiny_config), files, EventBus(), StopControl())
    assert len(fake_processing) == 4
    assert sorted(p.name for p in folder.glob("*.png")) == ["t_grid.png"]
    assert fake_forge.shared.state.calls[-2:] == ["begin:LoRA grid", "end"]
    assert not sys.modules["modules"].call_queue.queue_lock.locked()


def test_growing_grid_leaves_training_undisturbed(fake_forge, fake_processing, tiny_config):
    """grid_each_epoch: a column after each saved epoch, through Forge's txt2img, in the middle of the
    run. Forge's generation leaves its LoRA merged in the weights and its own clip skip in the text
    engine; the adapter loads the clean weights back, sets the training clip skip again and reloads
    the UNet and text encoder, so the LoRA trained is the same bit for bit as without the grid."""
    from safetensors.torch import load_file

    folder = Path(fake_forge.shared.cmd_opts.lora_dir) / "trained"
    base = {"grid_after_training": False, "clip_skip": 2, "save_precision": "float"}
    engine = fake_forge.sd_model.text_processing_engine
    skips: list[int] = []

    def listen(ev):
        if isinstance(ev, StepEvent):
            skips.append(engine.clip_skip)

    run_in_thread(ForgeHost(), _grid_cfg(tiny_config, output_name="plain", **base), EventBus(), StopControl())
    assert fake_processing == []
    loads_before = sum(1 for e in fake_forge.log if e[0] == "load")
    cfg = _grid_cfg(tiny_config, output_name="grown", grid_each_epoch=True, **base)
    run_in_thread(ForgeHost(), cfg, EventBus(listen), StopControl())

    assert len(fake_processing) == 4, "two columns of two weights"
    assert set(skips) == {2}, f"training clip skip after Forge's generation: {skips}"
    assert (folder / "grown_grid.png").is_file()
    plain, grown = load_file(str(folder / "plain.safetensors")), load_file(str(folder / "grown.safetensors"))
    assert plain.keys() == grown.keys()
    for k in plain:
        assert torch.equal(plain[k], grown[k]), f"{k}: the grid column changed the training"
    # after each column the LoRA-free UNet + CLIP were loaded (clean weights), then once more before training went on
    loads = [e for e in fake_forge.log[loads_before:] if e[0] == "load"]
    unet_clip = (id(fake_forge.sd_model.forge_objects.unet), id(fake_forge.sd_model.forge_objects.clip.patcher))
    assert sum(1 for e in loads if e[1] == unet_clip) >= 3
    assert engine.clip_skip == 1 and fake_forge.sd_model.current_lora_hash == str([])


# =========================================================================== SDXL
#
# Forge holds SDXL (backend/diffusion_engine/sdxl.py) as: ``forge_objects.clip.cond_stage_model.clip_l``
# and ``.clip_g``, each ``.transformer`` a HF CLIPTextModel (CLIP-G with separate q/k/v and a
# ``text_projection`` Linear added); ``text_processing_engine_l`` / ``_g`` (layer -max(clip_skip, 2),
# no final LayerNorm; the G engine also returns the projected pooled output); ``embedder`` a sinusoidal
# timestep embedding of each size value; the UNet an LDM/SGM UNet taking ``y`` (``label_emb``). The
# stand-ins carry the tiny SDXL's weights (lora_trainer.model.tiny_sdxl), so the standalone diffusers
# SDXL bundle on the same weights is the reference.


@pytest.fixture(scope="module")
def _tiny_sdxl_parts(tmp_path_factory):
    from lora_trainer.model.tiny_sdxl import build_tiny_sdxl

    parts = build_tiny_sdxl(seed=0, tokenizer_dir=tmp_path_factory.mktemp("tokxl"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no zero-initialised layer anywhere: every weight matters to the comparisons
        for m in (parts.unet, parts.text_encoder, parts.text_encoder_2):
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return parts


@pytest.fixture
def tiny_sdxl(_tiny_sdxl_parts):
    import copy

    return copy.deepcopy(_tiny_sdxl_parts)


class FakeSDXLEngine:
    """Forge's ClassicTextProcessingEngine as its SDXL model sets it up (minimal clip skip 2, no final
    LayerNorm; CLIP-G: the pooled output through ``text_projection``), as far as training sees it."""

    def __init__(self, clip_wrapper, tokenizer, key: str):
        self.text_encoder, self.tokenizer, self.key = clip_wrapper, tokenizer, key
        self.clip_skip = self.minimal_clip_skip = 2
        self.return_pooled = key == "clip_g"
        emb = clip_wrapper.transformer.text_model.embeddings
        emb.token_embedding = TIWrapper(emb.token_embedding)

    def __call__(self, texts):
        transformer = self.text_encoder.transformer
        emb = transformer.text_model.embeddings
        emb.token_embedding = emb.token_embedding.to(dtype=torch.float32)
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = transformer(ids, output_hidden_states=True)
        z = out.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if not self.return_pooled:
            return z
        return z, transformer.text_projection(out.pooler_output)


class FakeTimestep(nn.Module):
    """Forge's ``backend.nn.unet.Timestep``: ``timestep_embedding(t, dim)`` (cos, then sin)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        return timestep_embedding(t, self.dim)


def build_forge_sdxl_unet(parts) -> nn.Module:
    """Forge's SDXL UNet in small: ldm's UNetModel (SGM module paths, ``label_emb``, ``y``) with the tiny
    SDXL UNet's weights and Forge's traits (in-place residual adds, Forge-style Linear)."""
    import contextlib
    import io

    from lora_trainer.model.ldm_names import convert_unet_state_dict, unet_diffusers_to_ldm_names
    from tests.test_ldm_names import _ldm_unet_kwargs

    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    ldm_attention = pytest.importorskip("ldm.modules.attention")
    config = dict(parts.unet.config)
    depths = {
        config["transformer_layers_per_block"][i] for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t
    }
    assert len(depths) == 1, "one transformer depth on the attention levels (ldm takes an int)"
    depth = depths.pop()

    class UNetModel(openaimodel.UNetModel):
        # Forge's signature; this ldm's SpatialTransformer takes one context per depth
        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kw):  # noqa: B006
            return super().forward(x, timesteps, [context] * depth, y)

    with contextlib.redirect_stdout(io.StringIO()):
        unet = UNetModel(**_ldm_unet_kwargs({**config, "transformer_layers_per_block": depth}))
    ted = unet.time_embed[0].out_features
    unet.num_classes = "sequential"
    adm = config["projection_class_embeddings_input_dim"]
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm, ted), nn.SiLU(), nn.Linear(ted, ted)))
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            m.num_groups = config["norm_num_groups"]
    unet.load_state_dict(
        convert_unet_state_dict(parts.unet.state_dict(), unet_diffusers_to_ldm_names(config)), strict=True
    )
    inplace_block = type(
        "InplaceTransformerBlock", (ldm_attention.BasicTransformerBlock,), {"_forward": _inplace_forward}
    )
    for m in unet.modules():
        if type(m) is ldm_attention.BasicTransformerBlock:
            m.__class__ = inplace_block
            m.checkpoint = False
    assert forgeify_linears(unet) > 0
    unet.computation_dtype = torch.float32
    unet.storage_dtype = torch.float32
    return unet.eval()


def forge_clip_g(te2) -> nn.Module:
    """Forge's CLIP-G: a plain CLIPTextModel with a ``text_projection`` Linear added (loader.py,
    ``IntegratedCLIP(CLIPTextModel, config, add_text_projection=True)``), holding the weights of
    the diffusers CLIPTextModelWithProjection."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(te2.config)
    missing, unexpected = model.load_state_dict(te2.state_dict(), strict=False)
    assert not missing and unexpected == ["text_projection.weight"], (missing, unexpected)
    model.text_projection = nn.Linear(te2.config.hidden_size, te2.config.projection_dim, bias=False)
    model.text_projection.weight = nn.Parameter(te2.text_projection.weight.detach().clone())
    return model.eval()


def build_fake_sdxl_model(parts):
    import copy

    from lora_trainer.model.sd import alphas_cumprod_from_config
    from lora_trainer.model.tiny_sdxl import TIME_EMBED

    unet = build_forge_sdxl_unet(parts)
    kmodel = nn.Module()
    kmodel.diffusion_model = unet
    kmodel.predictor = nn.Module()
    kmodel.predictor.prediction_type = "epsilon"
    kmodel.predictor.register_buffer("alphas_cumprod", alphas_cumprod_from_config(parts.scheduler_config))
    kmodel.storage_dtype = torch.float32

    clip_l, clip_g = nn.Module(), nn.Module()
    clip_l.transformer = copy.deepcopy(parts.text_encoder).eval()
    clip_g.transformer = forge_clip_g(parts.text_encoder_2)
    for w in (clip_l, clip_g):
        forgeify_linears(w)
    cond_stage_model = nn.ModuleDict({"clip_l": clip_l, "clip_g": clip_g})
    engine_l = FakeSDXLEngine(clip_l, parts.tokenizer, "clip_l")
    engine_g = FakeSDXLEngine(clip_g, parts.tokenizer_2, "clip_g")
    first_stage = FakeFirstStage(copy.deepcopy(parts.vae).eval(), scale=0.13025)
    return types.SimpleNamespace(
        **fake_forge_objects(kmodel, cond_stage_model, first_stage),
        is_sd1=False,
        is_sd2=False,
        is_sdxl=True,
        text_processing_engine_l=engine_l,
        text_processing_engine_g=engine_g,
        embedder=FakeTimestep(TIME_EMBED),
        sd_checkpoint_info=types.SimpleNamespace(
            title="tiny-xl [0000]", filename="/models/tiny-xl.safetensors", sha256=None
        ),
    )


@pytest.fixture
def fake_forge_xl(fake_forge, tiny_sdxl):
    """The fake Forge of :func:`fake_forge`, holding the tiny SDXL instead."""
    sd_model = build_fake_sdxl_model(tiny_sdxl)
    fake_forge.shared.sd_model = sd_model
    fake_forge.sd_model = sd_model
    fake_forge.parts = tiny_sdxl
    return fake_forge


def _reference_bundle(parts):
    import copy

    from lora_trainer.model.sdxl import make_sdxl_bundle

    return make_sdxl_bundle(copy.deepcopy(parts), device="cpu", dtype=torch.float32)


CAPTIONS = ["ohwx ring, blue background", "a green square"]
SIZES = [(64, 48, 8, 0, 64, 64), (96, 64, 0, 16, 64, 64)]


def test_sdxl_bundle_conditions_the_unet_as_the_reference(fake_forge_xl, tiny_config):
    """Forge's SDXL in the bundle gives what the standalone diffusers SDXL bundle gives on the same
    weights: context (CLIP-L then CLIP-G penultimate states), pooled projection, and the UNet output
    with size conditioning (the ``y`` vector built as Forge builds it)."""
    from lora_trainer.model.sdxl import SDXLCond
    from lora_trainer.train.runtime import Runtime

    ref = _reference_bundle(fake_forge_xl.parts)
    bundle = ForgeHost().model_bundle(tiny_config, Runtime("cpu"))
    try:
        assert bundle.family == "sdxl" and bundle.default_resolution == 1024
        assert bundle.base_model_version == "sdxl_base_v1-0"
        with torch.no_grad():
            got, want = bundle.encode_text(CAPTIONS), ref.encode_text(CAPTIONS)
            assert isinstance(got, SDXLCond)
            torch.testing.assert_close(got.hidden, want.hidden, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.pooled, want.pooled, atol=1e-5, rtol=1e-5)
            g = torch.Generator().manual_seed(4)
            x = torch.randn(2, 4, 8, 8, generator=g)
            t = torch.tensor([10, 700])
            for sizes in (SIZES, None):  # given sizes; none: the latents' square size
                out = bundle.predict(x, t, bundle.condition(got, sizes))
                expect = ref.predict(x, t, ref.condition(want, sizes))
                torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)
            other = bundle.predict(x, t, bundle.condition(got, [(1024, 1024, 0, 0, 1024, 1024)] * 2))
            assert (other - out).abs().max() > 1e-4, "the size conditioning reaches the UNet"
            joined = bundle.concat_conditions([bundle.condition(got, SIZES), bundle.condition(got, SIZES)])
            assert joined.hidden.shape[0] == 4 and joined.time_ids.shape == (4, 6)
    finally:
        bundle.release()


def test_sdxl_lora_names_are_kohyas(fake_forge_xl, tiny_config):
    """``lora_unet_`` + SGM module paths, ``lora_te1_`` / ``lora_te2_`` + HF paths with separate q/k/v:
    the names the standalone SDXL bundle (and kohya sd-scripts) give the same layers."""
    from lora_trainer.train.runtime import Runtime

    ref = _reference_bundle(fake_forge_xl.parts)
    bundle = ForgeHost().model_bundle(tiny_config, Runtime("cpu"))
    try:
        for conv in (False, True):
            got = sorted(t.lora_name for t in bundle.unet_targets(conv))
            assert got == sorted(t.lora_name for t in ref.unet_targets(conv)), conv
        te = sorted(t.lora_name for t in bundle.text_encoder_targets())
        assert te == sorted(t.lora_name for t in ref.text_encoder_targets())
        assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in got
        assert {
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_1_self_attn_v_proj",
        } <= set(te)
        assert not [n for n in te if "text_projection" in n]
    finally:
        bundle.release()


def _one_step_grads(bundle, state: dict) -> dict[str, torch.Tensor]:
    """LoRA gradients of one loss on ``bundle``, the network's weights loaded from ``state``."""
    for root in bundle.trainable_roots:
        root.requires_grad_(False)
    net = LoRANetwork.create(bundle.unet_targets(False) + bundle.text_encoder_targets(), 4, 4.0)
    net.load_kohya_state_dict(state)
    net.attach()
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        cond = bundle.condition(bundle.encode_text(CAPTIONS), SIZES)
        loss = (bundle.predict(x, torch.tensor([10, 700]), cond) - noise).pow(2).mean()
        loss.backward()
        grads = {f"{m.lora_name}.{k}": getattr(m, k).weight.grad for m in net.loras for k in ("lora_down", "lora_up")}
        return {k: None if v is None else v.clone() for k, v in grads.items()}
    finally:
        net.detach()


def test_sdxl_training_signal_matches_the_reference(fake_forge_xl, tiny_config):
    """With the same LoRA weights, one step's gradients on Forge's SDXL equal the standalone SDXL's,
    for every UNet and text-encoder adapter: the same training, through Forge's traits (inference
    tensors, in-place residual adds, Forge's Linear)."""
    from lora_trainer.train.runtime import Runtime

    ref = _reference_bundle(fake_forge_xl.parts)
    init = LoRANetwork.create(ref.unet_targets(False) + ref.text_encoder_targets(), 4, 4.0)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in init.loras:
            m.lora_up.weight.copy_(0.1 * torch.randn(m.lora_up.weight.shape, generator=gen))
    state = init.kohya_state_dict()
    want = _one_step_grads(ref, state)
    bundle = ForgeHost().model_bundle(tiny_config, Runtime("cpu"))
    try:
        got = _one_step_grads(bundle, state)
    finally:
        bundle.release()
    assert got.keys() == want.keys()
    # CLIP-L's last layer feeds no output the UNet sees (the penultimate states): no gradient, in both
    unused = {k for k, v in want.items() if v is None}
    assert unused and all(k.startswith("lora_te1_text_model_encoder_layers_1_") for k in unused), sorted(unused)
    assert {k for k, v in got.items() if v is None} == unused
    assert any(k.startswith("lora_te2_") for k in got)
    for k in want.keys() - unused:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-3, msg=k)
        if ".lora_down" in k:
            assert got[k].abs().sum() > 0, f"{k}: no gradient"


def test_forge_host_trains_sdxl_end_to_end(fake_forge_xl, tiny_config):
    from safetensors import safe_open

    sd_model, log = fake_forge_xl.sd_model, fake_forge_xl.log
    engines = (sd_model.text_processing_engine_l, sd_model.text_processing_engine_g)
    unet = sd_model.forge_objects_original.unet.model.diffusion_model
    g = torch.Generator().manual_seed(9)
    probe = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 96, generator=g))
    y = torch.randn(1, unet.label_emb[0][0].in_features, generator=g)
    with torch.inference_mode():
        before = unet(*probe, y=y).clone()
    flags_before = [(k, p.requires_grad) for k, p in unet.named_parameters()]
    skips: list[tuple[int, int]] = []

    def listen(ev):
        if isinstance(ev, StepEvent):
            skips.append(tuple(e.clip_skip for e in engines))

    cfg = tiny_config.__class__(**{**tiny_config.to_dict(), "clip_skip": 3})
    run_in_thread(ForgeHost(), cfg, EventBus(listen), StopControl())

    path = Path(fake_forge_xl.shared.cmd_opts.lora_dir) / "trained" / "t.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.split(".", 1)[0] for k in keys}
    ref = _reference_bundle(fake_forge_xl.parts)
    assert modules == {t.lora_name for t in ref.unet_targets(False) + ref.text_encoder_targets()}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert set(skips) == {(3, 3)} and all(e.clip_skip == 2 for e in engines), "clip skip set for the run, then put back"
    assert sd_model.current_lora_hash == str([])
    assert any(e[0] == "load" for e in log)
    assert [(k, p.requires_grad) for k, p in unet.named_parameters()] == flags_before
    with torch.inference_mode():
        assert torch.equal(unet(*probe, y=y), before)
        for e in engines:  # Forge can still encode text in inference mode
            e(["a photo"])


def test_sdxl_refiner_is_refused(fake_forge_xl, tiny_config):
    from lora_trainer.train.runtime import Runtime

    sd_model = fake_forge_xl.sd_model
    del sd_model.text_processing_engine_l  # Forge's StableDiffusionXLRefiner: CLIP-G only
    with pytest.raises(LoraTrainerError, match="refiner"):
        ForgeHost().model_bundle(tiny_config, Runtime("cpu"))
    assert sd_model.current_lora_hash != str([]), "refused before anything was changed"


# --------------------------------------------------------------- the host's own LoRA loader
_CLIP_PARTS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def fake_forge_lora_module(with_diffusers_names: bool = True, with_ldm_names: bool = True) -> types.ModuleType:
    """Stands for Forge's ``backend.patcher.lora`` as ``load_lora_for_models`` uses it, restated:
    ``model_lora_keys_unet(model, key_map)`` names every UNet weight ``lora_unet_<LDM path>`` and,
    through Forge's config-driven diffusers<->LDM table (here ``ldm_names``, tested against diffusers'
    converter), ``lora_unet_<diffusers path>``; ``model_lora_keys_clip`` names CLIP-L's attention and
    MLP weights ``lora_te_``/``lora_te1_``; ``load_lora(lora, key_map)`` returns (model key -> LoRA
    patch, the file's keys it did not use). ``with_diffusers_names=False``: a Forge whose table
    lacks this UNet's layout; ``with_ldm_names=False`` as well: a Forge that knows no name of its
    UNet's layers (a model it does not support)."""
    from lora_trainer.model.ldm_names import unet_config_from_ldm_state_dict, unet_ldm_to_diffusers_names

    mod = types.ModuleType("backend.patcher.lora")

    def model_lora_keys_unet(model, key_map):
        sd = model.state_dict()
        for k in sd:
            if with_ldm_names and k.startswith("diffusion_model.") and k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = k
        if with_diffusers_names:
            config = unet_config_from_ldm_state_dict(sd, "diffusion_model.")
            for ldm, diffusers in unet_ldm_to_diffusers_names(config).items():
                if f"diffusion_model.{ldm}.weight" in sd:
                    key_map["lora_unet_" + diffusers.replace(".", "_")] = f"diffusion_model.{ldm}.weight"
        return key_map

    def model_lora_keys_clip(model, key_map):
        sd = model.state_dict()
        for b in range(32):
            for part in _CLIP_PARTS:
                k = f"clip_l.transformer.text_model.encoder.layers.{b}.{part}.weight"
                if k in sd:
                    for prefix in ("lora_te", "lora_te1"):
                        key_map[f"{prefix}_text_model_encoder_layers_{b}_{part.replace('.', '_')}"] = k
        return key_map

    def load_lora(lora, key_map):
        patches, used = {}, set()
        for stem, target in key_map.items():
            up, down, alpha = (f"{stem}.{p}" for p in ("lora_up.weight", "lora_down.weight", "alpha"))
            if up in lora:
                patches[target] = ("lora", (lora[up], lora[down], lora[alpha].item() if alpha in lora else None, None, None))
                used |= {up, down, alpha}
        return patches, {k: v for k, v in lora.items() if k not in used}

    mod.model_lora_keys_unet = model_lora_keys_unet
    mod.model_lora_keys_clip = model_lora_keys_clip
    mod.load_lora = load_lora
    return mod


def install_fake_forge_lora(monkeypatch, **kw) -> None:
    patcher = types.ModuleType("backend.patcher")
    patcher.lora = fake_forge_lora_module(**kw)
    monkeypatch.setitem(sys.modules, "backend.patcher", patcher)
    monkeypatch.setitem(sys.modules, "backend.patcher.lora", patcher.lora)
    monkeypatch.setattr(sys.modules["backend"], "patcher", patcher, raising=False)


def _loader_messages(events: list) -> list[tuple[str, str]]:
    from lora_trainer.train.events import Message

    return [(e.level, e.text) for e in events if isinstance(e, Message) and ("LoRA modules of" in e.text or "not checked" in e.text)]


def test_forge_applies_every_saved_module_no_warning(fake_forge, tiny_config, monkeypatch):
    from lora_trainer.hosts.forge import forge_key_match
    from lora_trainer.hosts.webui_common import lora_module_shapes

    install_fake_forge_lora(monkeypatch)
    events: list = []
    run_in_thread(ForgeHost(), tiny_config, EventBus(events.append), StopControl())
    assert _loader_messages(events) == []
    saved = ForgeHost().lora_dir() / "t.safetensors"
    match = forge_key_match(fake_forge.sd_model, saved)
    assert set(match.applied) == set(lora_module_shapes(saved)) and len(match.applied) == 60


def test_forge_without_diffusers_names_still_applies_every_module(fake_forge, tiny_config, monkeypatch):
    """The tiny model's layout is not SD1.5's, so its files name the UNet layers by their LDM paths:
    Forge applies them through its ``lora_unet_<LDM path>`` keys even where its diffusers table
    lacks the layout, on exactly the layers they were trained on."""
    from lora_trainer.hosts.forge import forge_key_match
    from lora_trainer.model.ldm import ldm_unet_lora_targets

    install_fake_forge_lora(monkeypatch, with_diffusers_names=False)
    events: list = []
    run_in_thread(ForgeHost(), tiny_config, EventBus(events.append), StopControl())
    assert _loader_messages(events) == []
    match = forge_key_match(fake_forge.sd_model, ForgeHost().lora_dir() / "t.safetensors")
    unet = fake_forge.sd_model.forge_objects.unet.model.diffusion_model
    targets = {t.lora_name: t.module for t in ldm_unet_lora_targets(unet, False)}
    assert len(targets) == 48 and len(match.applied) == 60
    assert all(match.applied[stem].module is module for stem, module in targets.items())


def test_forge_dropping_the_whole_file_is_reported_before_the_grid(fake_forge, fake_processing, tiny_config, monkeypatch):
    """A Forge whose key table knows no name of this UNet's layers leaves all 48 UNet modules (144 keys)
    unmatched: over its limit of 12 it applies nothing of the file. Said after each save, before the grid."""
    install_fake_forge_lora(monkeypatch, with_diffusers_names=False, with_ldm_names=False)
    order: list[str] = []

    def listen(ev):
        if _loader_messages([ev]):
            order.append("warning")

    real = sys.modules["modules.processing"].process_images
    monkeypatch.setattr(sys.modules["modules.processing"], "process_images", lambda p: (order.append("cell"), real(p))[1])
    events: list = []
    bus = EventBus(events.append, listen)
    run_in_thread(ForgeHost(), _grid_cfg(tiny_config, grid_after_training=True), bus, StopControl())
    [(level, first), (_, last)] = _loader_messages(events)
    assert level == "warning" and order[:2] == ["warning", "warning"] and order.count("cell") == 4
    assert "Forge will apply none of the 60 LoRA modules of t.safetensors (144 of its keys are unmatched" in last
    assert "t-000001.safetensors" in first


def test_forge_unmatched_and_misfit_modules_are_named(fake_forge, monkeypatch, tmp_path):
    from safetensors.torch import save_file

    from lora_trainer.hosts.forge import forge_key_match
    from lora_trainer.hosts.webui_common import HostKeyCheck

    install_fake_forge_lora(monkeypatch)
    path = tmp_path / "odd.safetensors"
    misfit = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a 32x32 layer
    unknown = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_9_attn1_to_q"  # no such block

    def module(stem, down_in):
        return {f"{stem}.lora_down.weight": torch.zeros(4, down_in), f"{stem}.lora_up.weight": torch.zeros(32, 4),
                f"{stem}.alpha": torch.tensor(4.0)}

    save_file({**module(misfit, 16), **module(unknown, 32)}, str(path))
    events: list = []
    HostKeyCheck("Forge", lambda p: forge_key_match(fake_forge.sd_model, p), EventBus(events.append))(path)
    [(level, text)] = _loader_messages(events)
    assert level == "warning" and "Forge will ignore or misplace 2 of 2 LoRA modules of odd.safetensors" in text
    assert f"1 match no layer of the loaded model ({unknown})" in text
    assert f"{misfit} -> diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight: a 32x16 change for a 32x32 layer" in text
