"""The A1111 adapter, on a fake but structurally real AUTOMATIC1111: a ``modules`` package in
``sys.modules`` whose ``shared.sd_model`` holds real modules the way A1111 holds them (an ldm
``UNetModel`` at ``model.diffusion_model``, a CLIP wrapper whose ``wrapped.transformer`` is an HF
``CLIPTextModel``, a KL VAE behind ``encode_first_stage``), A1111's grad flags, and an emulation of the
built-in Lora extension's patched layer forwards (merged weights, restored from a backup on the next
forward once ``loaded_networks`` is empty)."""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.train.state import STATE_FOLDER  # the resume states live beside the LoRA files

# --------------------------------------------------------------------------- the fake host


class FakeOptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, **kw):
        self.default = default
        self.label = label
        self.section = section


class FakeOptions:
    """Like A1111's ``Options``: values in ``data``, defaults in ``data_labels``."""

    def __init__(self, data: dict):
        object.__setattr__(self, "data", dict(data))
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key):
        if key.startswith("__") or key in ("data", "data_labels"):
            raise AttributeError(key)
        if key in self.data:
            return self.data[key]
        if key in self.data_labels:
            return self.data_labels[key].default
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value


class FakeState:
    """The fields and calls of A1111's ``shared.state`` the adapter uses."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None

    def begin(self, job="(unknown)"):
        self.calls.append(("begin", job))
        self.job = job
        self.job_count = -1
        self.job_no = 0
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None

    def end(self):
        self.calls.append(("end", self.job_no, self.job_count))
        self.job = ""
        self.job_count = 0

    def interrupt(self):
        self.interrupted = True


class FakeNetwork:
    """A host LoRA as ``networks.loaded_networks`` lists it; its deltas are fixed per layer."""

    def __init__(self, name: str):
        self.name = name
        self._deltas: dict[int, torch.Tensor] = {}

    def delta(self, module: nn.Module) -> torch.Tensor:
        if id(module) not in self._deltas:
            g = torch.Generator().manual_seed(len(self._deltas) + 1)
            self._deltas[id(module)] = 0.05 * torch.randn(module.weight.shape, generator=g)
        return self._deltas[id(module)]


def _patched_forward_emulation(module: nn.Module, args) -> None:
    """What A1111's patched Linear/Conv2d/GroupNorm/LayerNorm forwards do before computing: if the wanted
    networks differ from the merged ones, copy the backup back and merge the wanted ones, in place
    (no ``no_grad``: a grad-enabled forward fails on a weight that requires grad, as on the real host)."""
    nets = sys.modules["networks"]
    wanted = tuple(n.name for n in nets.loaded_networks)
    current = getattr(module, "network_current_names", ())
    if wanted == current:
        return
    backup = getattr(module, "network_weights_backup", None)
    if backup is None and wanted:
        backup = module.network_weights_backup = module.weight.detach().clone()
    if backup is not None:
        module.weight.copy_(backup)
    for n in nets.loaded_networks:
        module.weight.add_(n.delta(module))
    module.network_current_names = wanted


def _host_device(module: nn.Module) -> torch.device:
    """Where A1111 sends the tokens: ``devices.device`` (under --medvram the text encoder is still on the CPU
    until its hook moves it in), else where the module is."""
    devices = sys.modules.get("modules.devices")
    return getattr(devices, "device", None) or module.device


class FakeCLIPWrapper(nn.Module):
    """Like ``FrozenCLIPEmbedderWithCustomWords``: ``wrapped.transformer`` is the HF model, ``wrapped.tokenizer``
    its tokenizer; calling it with captions gives the conditioning, without ``no_grad``, honouring Clip skip."""

    def __init__(self, transformer: nn.Module, tokenizer):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = transformer
        self.wrapped.tokenizer = tokenizer

    def forward(self, texts: list[str]) -> torch.Tensor:
        te = self.wrapped.transformer
        ids = self.wrapped.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        skip = int(sys.modules["modules.shared"].opts.CLIP_stop_at_last_layers)
        out = te(input_ids=ids.to(_host_device(te)), output_hidden_states=skip > 1)
        if skip > 1:
            return te.text_model.final_layer_norm(out.hidden_states[-skip])
        return out.last_hidden_state


class FakeDiffusionWrapper(nn.Module):
    """ldm's ``DiffusionWrapper`` (``sd_model.model``, conditioning key crossattn): what ``apply_model``
    calls, and where --medvram's hook on the UNet sits."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c_crossattn=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class FakeSDModel(nn.Module):
    """The parts of ``LatentDiffusion`` (as A1111 loads SD1.5) the adapter touches."""

    def __init__(self, unet: nn.Module, cond: nn.Module, vae: nn.Module):
        super().__init__()
        self.model = FakeDiffusionWrapper(unet)
        self.cond_stage_model = cond
        self.first_stage_model = vae
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0).float())
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False
        self.scale_factor = 0.18215
        self.sd_checkpoint_info = SimpleNamespace(
            title="tiny-a1111.safetensors [0123456789]", filename="/models/tiny-a1111.safetensors", sha256="ab" * 32
        )

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist

    def get_first_stage_encoding(self, posterior):
        z = posterior if isinstance(posterior, torch.Tensor) else posterior.sample()
        return self.scale_factor * z


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    """Make every weight distinct (zero-initialised output layers would hide gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def build_fake_sd_model(tok_dir: Path, num_res_blocks: int = 1) -> FakeSDModel:
    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_trainer.model.tiny import TINY_CLIP, write_tiny_tokenizer

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # ldm prints while building
        unet = openaimodel.UNetModel(
            image_size=8,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            attention_resolutions=[1],
            num_res_blocks=num_res_blocks,
            channel_mult=(1, 2),
            num_heads=2,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=32,
            use_checkpoint=True,  # ldm's own checkpointing: the adapter must switch it off for the run
            legacy=False,
        )
    write_tiny_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY_CLIP
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    sd = FakeSDModel(_perturb(unet, 1), FakeCLIPWrapper(_perturb(te, 2), tok), vae).eval()
    # requires_grad as A1111 leaves them after loading: UNet True, text encoder and VAE False
    sd.model.diffusion_model.requires_grad_(True)
    sd.cond_stage_model.requires_grad_(False)
    sd.first_stage_model.requires_grad_(False)
    return sd


class FakeFIFOLock:
    """The hosts' ``modules.fifo_lock.FIFOLock`` signature: ``acquire(blocking=True)``, no timeout."""

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True):
        return self._lock.acquire(blocking)

    def release(self):
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def install_fake_webui(monkeypatch, root: Path, sd_model=None) -> SimpleNamespace:
    """A fake ``modules`` package (shared, call_queue, script_callbacks) and ``networks`` in sys.modules."""
    modules = types.ModuleType("modules")
    modules.__path__ = []  # a package
    shared = types.ModuleType("modules.shared")
    shared.opts = FakeOptions({"CLIP_stop_at_last_layers": 1})
    shared.OptionInfo = FakeOptionInfo
    shared.state = FakeState()
    shared.cmd_opts = SimpleNamespace(
        lora_dir=str(root / "models" / "Lora"), data_dir=str(root), api_auth=None, medvram=False, lowvram=False
    )
    shared.models_path = str(root / "models")
    shared.sd_model = sd_model
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = FakeFIFOLock()
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.registered = {"ui_tabs": [], "ui_settings": [], "app_started": []}
    callbacks.on_ui_tabs = callbacks.registered["ui_tabs"].append
    callbacks.on_ui_settings = callbacks.registered["ui_settings"].append
    callbacks.on_app_started = callbacks.registered["app_started"].append
    networks = types.ModuleType("networks")
    networks.loaded_networks = []
    networks.refreshes = 0

    def list_available_networks():
        networks.refreshes += 1

    networks.list_available_networks = list_available_networks
    for name, mod in {
        "modules": modules,
        "modules.shared": shared,
        "modules.call_queue": call_queue,
        "modules.script_callbacks": callbacks,
        "networks": networks,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if name.startswith("modules."):
            setattr(modules, name.split(".", 1)[1], mod)
    return SimpleNamespace(shared=shared, call_queue=call_queue, callbacks=callbacks, networks=networks)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def _master_model(tmp_path_factory):
    return build_fake_sd_model(tmp_path_factory.mktemp("tok"))


def fake_host_env(monkeypatch, tmp_path, master, text_root: str, patch_mha: bool = False) -> SimpleNamespace:
    """A fake WebUI holding a copy of ``master``, its layers patched as A1111's Lora extension patches
    them (the UNet and ``master.<text_root>``; ``patch_mha``: torch's MultiheadAttention too)."""
    sd = copy.deepcopy(master)
    env = install_fake_webui(monkeypatch, tmp_path)
    env.shared.sd_model = sd
    for root in (sd.model.diffusion_model, getattr(sd, text_root)):
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
                m.register_forward_pre_hook(_patched_forward_emulation)
    if patch_mha:
        monkeypatch.setattr(nn.MultiheadAttention, "forward", _patched_mha_forward(nn.MultiheadAttention.forward))
    env.sd = sd
    env.lora_dir = Path(env.shared.cmd_opts.lora_dir)
    return env


@pytest.fixture
def host_env(monkeypatch, tmp_path, _master_model):
    return fake_host_env(monkeypatch, tmp_path, _master_model, "cond_stage_model")


@pytest.fixture
def cfg(demo_data, tmp_path) -> TrainConfig:
    return TrainConfig(
        train_data_dir=str(demo_data),
        output_dir=str(tmp_path / "elsewhere"),  # ignored in the WebUI: files go to the Lora folder
        output_name="t",
        resolution=64,
        network_dim=4,
        network_alpha=2.0,
        max_train_epochs=2,
        unet_lr=1e-3,
        text_encoder_lr=1e-3,
        lr_scheduler="constant",
        seed=1,
        grid_after_training=False,  # the grid tests below turn it on
    )


# --------------------------------------------------------------------------- helpers

PROBE_GEN = torch.Generator().manual_seed(3)
PROBE_X = torch.randn(1, 4, 8, 8, generator=PROBE_GEN)
PROBE_T = torch.tensor([321])


def _text_encoder(sd: FakeSDModel) -> nn.Module:
    """SD1: the HF CLIPTextModel; SD2: the open_clip model."""
    wrapped = sd.cond_stage_model.wrapped
    return wrapped.transformer if hasattr(wrapped, "transformer") else wrapped.model


def _snapshot(sd: FakeSDModel) -> dict:
    unet, clip = sd.model.diffusion_model, sd.cond_stage_model
    with torch.no_grad():
        cond = clip(["ohwx ring, blue background"])
        out = unet(PROBE_X, PROBE_T, context=cond)
    roots = {"unet": unet, "te": _text_encoder(sd)}
    return {
        "weights": {f"{r}.{k}": v.detach().clone() for r, m in roots.items() for k, v in m.state_dict().items()},
        "grad": {f"{r}.{k}": p.requires_grad for r, m in roots.items() for k, p in m.named_parameters()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in sd.modules()],
        "instance_forwards": sum("forward" in m.__dict__ for m in sd.modules()),
        "ldm_flags": [(getattr(m, "checkpoint", None), getattr(m, "use_checkpoint", None)) for m in unet.modules()],
        "training": [m.training for m in sd.modules()],
        "cond": cond,
        "out": out,
    }


def _assert_host_unchanged(before: dict, after: dict) -> None:
    assert before["weights"].keys() == after["weights"].keys()
    changed = [k for k in before["weights"] if not torch.equal(before["weights"][k], after["weights"][k])]
    assert not changed, f"weights changed: {changed[:5]}"
    assert before["grad"] == after["grad"], "requires_grad flags restored"
    assert before["hooks"] == after["hooks"], "no hook left behind"
    assert before["instance_forwards"] == after["instance_forwards"] == 0, "no checkpoint wrapper left behind"
    assert before["ldm_flags"] == after["ldm_flags"], "ldm's checkpoint flags restored"
    assert before["training"] == after["training"] and not any(after["training"]), "the model stays in eval mode"
    assert torch.equal(before["cond"], after["cond"]), "the text encoder computes bit for bit as before"
    assert torch.equal(before["out"], after["out"]), "the UNet computes bit for bit as before"


def _expected_names(sd: FakeSDModel) -> set[str]:
    from lora_trainer.model.ldm import ldm_unet_lora_targets
    from lora_trainer.network.targets import TEXT_CONTAINERS, find_targets

    unet = {t.lora_name for t in ldm_unet_lora_targets(sd.model.diffusion_model, False)}
    te = {t.lora_name for t in find_targets(sd.cond_stage_model.wrapped.transformer, "lora_te", TEXT_CONTAINERS)}
    return unet | te


def _file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# --------------------------------------------------------------------------- tests


def test_run_trains_the_loaded_model_and_leaves_it_as_it_was(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, FileSaved, StepEvent, StopControl

    env = host_env
    sd = env.sd
    before = _snapshot(sd)
    seen: dict[str, list] = {"locked": [], "job_no": [], "refreshes_at_save": [], "grad_mode": []}

    def listener(ev):
        if isinstance(ev, StepEvent):
            seen["locked"].append(env.call_queue.queue_lock.locked())
            seen["job_no"].append(env.shared.state.job_no)
            seen["grad_mode"].append(torch.is_grad_enabled())
        if isinstance(ev, FileSaved):
            seen["refreshes_at_save"].append(env.networks.refreshes)

    A1111Host().run(cfg, EventBus(listener), StopControl())

    # files: one per epoch, in the host's Lora folder, never in cfg.output_dir
    files = sorted(p.name for p in env.lora_dir.iterdir() if p.name != STATE_FOLDER)
    assert files == ["t-000001.safetensors", "t.safetensors"]
    assert not (Path(cfg.output_dir)).exists()
    tensors, meta = _file(env.lora_dir / "t.safetensors")
    names = {k.split(".")[0] for k in tensors}
    expected = _expected_names(sd)
    assert names == expected and len(tensors) == 3 * len(expected)
    # one ResBlock per level, not SD1.5's layout: the UNet layers are named by their LDM paths
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k" in names
    assert any(n.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
    # every adapter learned something: ldm's own checkpointing (on in this UNet) was switched off for the run
    dead = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0]
    assert not dead, f"no gradient reached {dead[:3]}"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == "tiny-a1111.safetensors [0123456789]"
    assert meta["ss_new_sd_model_hash"] == "ab" * 32

    # generation was locked out for the whole run; the host's progress followed the steps
    assert seen["locked"] and all(seen["locked"])
    assert not env.call_queue.queue_lock.locked()
    assert seen["job_no"] == list(range(1, 17))
    assert env.shared.state.calls[0] == ("begin", "LoRA training")
    assert env.shared.state.calls[-1] == ("end", 16, 16)
    assert seen["grad_mode"] and all(seen["grad_mode"])
    # the LoRA list was refreshed after each saved file (and once more at the end)
    assert seen["refreshes_at_save"] == [1, 2] and env.networks.refreshes == 3

    after = _snapshot(sd)
    _assert_host_unchanged(before, after)
    assert all(after["grad"][k] for k in after["grad"] if k.startswith("unet."))
    assert not any(after["grad"][k] for k in after["grad"] if k.startswith("te."))
    assert torch.is_grad_enabled()


def test_training_job_checkpointing_clip_skip_and_subfolder(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.job import TrainingJob
    from lora_trainer.train.events import StepEvent

    env = host_env
    env.shared.opts.data["lora_trainer_subfolder"] = "mine/v1"
    before = _snapshot(env.sd)
    seen = {"clip_skip": set(), "wrapped": set()}

    def listener(ev):
        if isinstance(ev, StepEvent):
            seen["clip_skip"].add(env.shared.opts.CLIP_stop_at_last_layers)
            seen["wrapped"].add(sum("forward" in m.__dict__ for m in env.sd.modules()))

    job = TrainingJob(A1111Host().run, on_event=listener)
    job.start(TrainConfig(**{**cfg.to_dict(), "gradient_checkpointing": True, "clip_skip": 2, "output_name": "ck"}))
    status = job.wait(120)
    assert status.state == "done", status.error
    folder = env.lora_dir / "mine" / "v1"
    assert sorted(p.name for p in folder.iterdir() if p.name != STATE_FOLDER) == ["ck-000001.safetensors", "ck.safetensors"]
    assert [Path(f.path).parent for f in status.files] == [folder, folder]
    tensors, meta = _file(folder / "ck.safetensors")
    assert {k.split(".")[0] for k in tensors} == _expected_names(env.sd)
    assert meta["ss_clip_skip"] == "2"
    # the form's clip_skip held during the run; the host's setting is back afterwards
    assert seen["clip_skip"] == {2} and env.shared.opts.CLIP_stop_at_last_layers == 1
    # non-reentrant checkpoint wrappers around the UNet's blocks during the run, none after
    assert seen["wrapped"] == {len(env.sd.model.diffusion_model.input_blocks) + 1 + len(env.sd.model.diffusion_model.output_blocks)}
    _assert_host_unchanged(before, _snapshot(env.sd))


def test_host_interrupt_stops_the_run(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.job import TrainingJob
    from lora_trainer.train.events import StepEvent

    env = host_env

    def listener(ev):
        if isinstance(ev, StepEvent) and ev.step == 3:
            env.shared.state.interrupt()  # the WebUI's Interrupt button / POST /sdapi/v1/interrupt

    job = TrainingJob(A1111Host().run, on_event=listener)
    job.start(cfg)
    status = job.wait(120)
    assert status.state == "stopped", status.error
    assert status.step < status.total_steps
    assert not env.lora_dir.exists() or not any(env.lora_dir.iterdir()), "the unfinished epoch is discarded"
    assert env.shared.state.calls[-1][0] == "end"
    assert not env.call_queue.queue_lock.locked()


def test_host_loras_are_cleared_not_baked_in(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StepEvent, StopControl

    env = host_env
    sd = env.sd
    clean = _snapshot(sd)
    # a generation with <lora:host:1> merged the host LoRA into the weights, and it stays merged
    env.networks.loaded_networks.append(FakeNetwork("host"))
    merged = _snapshot(sd)
    assert not torch.equal(merged["out"], clean["out"])
    seen = []

    def listener(ev):
        if isinstance(ev, StepEvent) and ev.step == 1:
            w = sd.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight
            seen.append(torch.equal(w, clean["weights"]["unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]))

    A1111Host().run(cfg, EventBus(listener), StopControl())
    assert seen == [True], "training ran on the clean weights"
    assert env.networks.loaded_networks == []
    after = _snapshot(sd)
    _assert_host_unchanged(clean, after)
    # the next generation that asks for the host LoRA merges it again, as before training
    env.networks.loaded_networks.append(FakeNetwork("host"))
    again = _snapshot(sd)
    assert torch.equal(again["out"], merged["out"])


def test_names_outside_the_lora_folder_are_refused(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.job import TrainingJob
    from lora_trainer.train.events import EventBus, StopControl

    env = host_env
    bad = TrainConfig(**{**cfg.to_dict(), "output_name": "../x"})
    with pytest.raises(ConfigError) as e:
        A1111Host().run(bad, EventBus(), StopControl())
    assert e.value.field == "output_name"
    with pytest.raises(ConfigError):
        TrainingJob(A1111Host().run).start(bad)
    env.shared.opts.data["lora_trainer_subfolder"] = "../evil"
    with pytest.raises(ConfigError) as e:
        A1111Host().lora_dir(cfg)
    assert e.value.field == "lora_trainer_subfolder"
    assert env.shared.state.calls == [] and not env.call_queue.queue_lock.locked()
    assert not (env.lora_dir.parent / "evil").exists() and not (Path(cfg.train_data_dir).parent / "x.safetensors").exists()


def test_an_unknown_sdxl_layout_is_refused_clearly_and_the_host_is_released(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StopControl

    env = host_env
    env.sd.is_sd1, env.sd.is_sdxl = False, True  # flagged SDXL, but no SDXL conditioner
    with pytest.raises(LoraTrainerError, match="not an SDXL base model"):
        A1111Host().run(cfg, EventBus(), StopControl())
    assert [c[0] for c in env.shared.state.calls] == ["begin", "end"]
    assert not env.call_queue.queue_lock.locked()
    env.shared.sd_model = None
    with pytest.raises(LoraTrainerError, match="No checkpoint is loaded"):
        A1111Host().run(cfg, EventBus(), StopControl())


def test_waits_for_a_running_generation_and_can_be_stopped_while_waiting(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.job import TrainingJob

    env = host_env
    lock = env.call_queue.queue_lock
    lock.acquire()  # a generation is running
    try:
        job = TrainingJob(A1111Host().run)
        job.start(cfg)
        deadline = threading.Event()
        for _ in range(100):
            if any("waiting for the WebUI" in m for m in job.status().messages):
                break
            deadline.wait(0.05)
        assert any("waiting for the WebUI" in m for m in job.status().messages)
        assert env.shared.state.calls == []
        assert job.stop()
        status = job.wait(30)
    finally:
        lock.release()
    assert status.state == "stopped" and not status.files
    assert env.shared.state.calls == []


def test_grid_after_training_goes_through_the_hosts_txt2img(host_env, cfg, monkeypatch):
    """Each cell is one StableDiffusionProcessingTxt2Img with <lora:file:w> in the prompt, made
    while generation is locked out; the grid PNG lands next to the epoch files."""
    from PIL import Image

    calls = []
    processing = types.ModuleType("modules.processing")

    class P:
        def __init__(self, **kw):
            self.kw = kw
            self.closed = False

        def close(self):
            self.closed = True

    def process_images(p):
        assert host_env.call_queue.queue_lock.locked()
        calls.append(p.kw)
        shade = int(255 * float(p.kw["prompt"].rsplit(":", 1)[1].rstrip(">")))
        return SimpleNamespace(images=[Image.new("RGB", (p.kw["width"], p.kw["height"]), (shade, 0, 0))])

    processing.StableDiffusionProcessingTxt2Img = P
    processing.process_images = process_images
    monkeypatch.setitem(sys.modules, "modules.processing", processing)
    monkeypatch.setattr(sys.modules["modules"], "processing", processing, raising=False)
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StopControl

    cfg = cfg.with_overrides(["grid_after_training=true", "grid_weights=0, 1", "grid_prompt=ohwx ring", "grid_seed=9"])
    A1111Host().run(cfg, EventBus(), StopControl())
    assert len(calls) == 4
    assert {c["prompt"] for c in calls} == {
        "ohwx ring, <lora:t-000001:0>", "ohwx ring, <lora:t:0>", "ohwx ring, <lora:t-000001:1>", "ohwx ring, <lora:t:1>"
    }
    assert all(c["seed"] == 9 and c["do_not_save_samples"] for c in calls)
    grid = host_env.lora_dir / "t_grid.png"
    assert grid.is_file()
    with Image.open(grid) as im:
        assert "lora_trainer_grid" in im.text


def test_a_failing_grid_does_not_fail_the_training(host_env, cfg):
    # no modules.processing at all: the grid fails, the files stay, the run ends normally
    cfg = cfg.with_overrides(["grid_after_training=true"])
    messages = []
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, Message, StopControl

    A1111Host().run(cfg, EventBus(lambda e: messages.append(e.text) if isinstance(e, Message) else None), StopControl())
    assert (host_env.lora_dir / "t.safetensors").is_file()
    assert any("grid could not be built" in m for m in messages)


# =========================================================================== SDXL
#
# A1111 1.10 holds SDXL as sgm's DiffusionEngine: ``conditioner.embedders`` = [A1111's CLIP-L wrapper
# around sgm's FrozenCLIPEmbedder (``wrapped.transformer`` a HF CLIPTextModel, layer "hidden"),
# A1111's OpenCLIP wrapper around FrozenOpenCLIPEmbedder2 (``wrapped.model`` an open_clip model whose
# attention is nn.MultiheadAttention with a fused in_proj; output (penultimate, pooled)), three
# ConcatTimestepEmbedderND size embedders]; ``model.diffusion_model`` an sgm UNet (SGM names, ``y``).
# The stand-ins below carry the weights of the tiny SDXL (lora_trainer.model.tiny_sdxl), so the
# standalone diffusers bundle on the same weights is the reference.


class FakeSDXLCLIPWrapper(nn.Module):
    """Like ``FrozenCLIPEmbedderForSDXLWithCustomWords`` (layer "hidden": the penultimate states)."""

    input_key = "txt"

    def __init__(self, transformer: nn.Module, tokenizer):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = transformer
        self.wrapped.tokenizer = tokenizer
        self.wrapped.layer, self.wrapped.layer_idx = "hidden", -2

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.wrapped.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = self.wrapped.transformer(input_ids=ids, output_hidden_states=True)
        return out.hidden_states[self.wrapped.layer_idx]


class FakeOpenCLIP2Wrapper(nn.Module):
    """Like ``FrozenOpenCLIPEmbedder2WithCustomWords`` around sgm's FrozenOpenCLIPEmbedder2 (penultimate,
    always_return_pooled, legacy=False): returns ``(states, pooled)``."""

    input_key = "txt"

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.model = model
        self.wrapped.layer = "penultimate"
        self.tokenizer = tokenizer

    def forward(self, texts: list[str]):
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        d = self.wrapped.model.encode_with_transformer(ids)
        return d["penultimate"], d["pooled"]


class FakeSizeEmbedder(nn.Module):
    """sgm's ``ConcatTimestepEmbedderND``: each column's sinusoidal embedding, concatenated."""

    def __init__(self, input_key: str, outdim: int):
        super().__init__()
        self.input_key = input_key
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ldm.modules.diffusionmodules.util import timestep_embedding

        b, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, dims * self.outdim)


class FakeConditioner(nn.Module):
    """sgm's ``GeneralConditioner.forward``: frozen embedders under ``no_grad``; 3-D outputs joined on the
    channel axis (crossattn), 2-D ones on dim 1 (vector), in embedder order."""

    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch: dict) -> dict:
        out: dict[str, torch.Tensor] = {}
        for emb in self.embedders:
            with torch.no_grad():
                res = emb(batch[emb.input_key])
            for r in res if isinstance(res, (tuple, list)) else [res]:
                key, dim = ("crossattn", 2) if r.dim() == 3 else ("vector", 1)
                out[key] = torch.cat((out[key], r), dim) if key in out else r
        return out


class FakeOpenAIWrapper(nn.Module):
    """sgm's ``OpenAIWrapper`` (``sd_model.model``): ``apply_model``'s entry, with --medvram's hook."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c: dict):
        return self.diffusion_model(x, timesteps=t, context=c["crossattn"], y=c["vector"])


class FakeSDXLModel(nn.Module):
    def __init__(self, unet: nn.Module, conditioner: FakeConditioner, vae: nn.Module):
        super().__init__()
        self.model = FakeOpenAIWrapper(unet)
        self.conditioner = conditioner
        self.cond_stage_model = conditioner  # what A1111's sd_hijack sets for SDXL
        self.first_stage_model = vae
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0).float())
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl = False, False, True
        self.scale_factor = 0.13025
        self.sd_checkpoint_info = SimpleNamespace(
            title="tiny-sdxl.safetensors [fedcba9876]", filename="/models/tiny-sdxl.safetensors", sha256="cd" * 32
        )


def sgm_like_unet(parts) -> nn.Module:
    """An SGM-shaped UNet (module paths, SpatialTransformer/ResBlock classes, ``forward(x, timesteps,
    context, y)`` with a sequential ``label_emb``) with the tiny SDXL UNet's weights: ldm's UNetModel
    (sgm's is the same code with per-level depths), GroupNorms set to the diffusers config's groups."""
    from lora_trainer.model.ldm_names import convert_unet_state_dict, unet_diffusers_to_ldm_names
    from tests.test_ldm_names import _ldm_unet_kwargs

    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    config = dict(parts.unet.config)
    depths = set(config["transformer_layers_per_block"][i] for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t)
    assert len(depths) == 1, "one transformer depth on the attention levels (ldm takes an int)"
    depth = depths.pop()
    kwargs = _ldm_unet_kwargs({**config, "transformer_layers_per_block": depth})

    class UNetModel(openaimodel.UNetModel):
        def forward(self, x, timesteps=None, context=None, y=None, **kw):
            # this ldm's SpatialTransformer takes one context per depth (sgm's reuses a single one)
            return super().forward(x, timesteps, [context] * depth if torch.is_tensor(context) else context, y, **kw)

    with contextlib.redirect_stdout(io.StringIO()):
        unet = UNetModel(**kwargs, use_checkpoint=True)
    ted = unet.time_embed[0].out_features
    adm = config["projection_class_embeddings_input_dim"]
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm, ted), nn.SiLU(), nn.Linear(ted, ted)))
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            m.num_groups = config["norm_num_groups"]
    unet.load_state_dict(convert_unet_state_dict(parts.unet.state_dict(), unet_diffusers_to_ldm_names(config)), strict=True)
    return unet.eval()


def build_fake_sdxl_model(parts) -> FakeSDXLModel:
    from lora_trainer.model.tiny_sdxl import TIME_EMBED
    from tests.test_fused_qkv import openclip_twin

    te1 = copy.deepcopy(parts.text_encoder).eval()
    te2 = openclip_twin(parts.text_encoder_2)
    conditioner = FakeConditioner(
        [
            FakeSDXLCLIPWrapper(te1, parts.tokenizer),
            FakeOpenCLIP2Wrapper(te2, parts.tokenizer_2),
            FakeSizeEmbedder("original_size_as_tuple", TIME_EMBED),
            FakeSizeEmbedder("crop_coords_top_left", TIME_EMBED),
            FakeSizeEmbedder("target_size_as_tuple", TIME_EMBED),
        ]
    )
    sd = FakeSDXLModel(sgm_like_unet(parts), conditioner, copy.deepcopy(parts.vae)).eval()
    sd.model.diffusion_model.requires_grad_(True)
    sd.conditioner.requires_grad_(False)
    sd.first_stage_model.requires_grad_(False)
    return sd


def _patched_mha_forward(original):
    """A1111's class-level ``MultiheadAttention.forward`` patch (networks.network_MultiheadAttention_forward):
    merges the wanted networks into ``in_proj_weight`` and ``out_proj.weight`` from a backup, in place."""

    def forward(self, *args, **kwargs):
        nets = sys.modules["networks"]
        wanted = tuple(n.name for n in nets.loaded_networks)
        if wanted != getattr(self, "network_current_names", ()):
            backup = getattr(self, "network_weights_backup", None)
            if backup is None and wanted:
                backup = self.network_weights_backup = (self.in_proj_weight.detach().clone(), self.out_proj.weight.detach().clone())
            if backup is not None:
                self.in_proj_weight.copy_(backup[0])
                self.out_proj.weight.copy_(backup[1])
            for n in nets.loaded_networks:
                self.in_proj_weight.add_(n.delta_of(("in", id(self)), self.in_proj_weight.shape))
                self.out_proj.weight.add_(n.delta_of(("out", id(self)), self.out_proj.weight.shape))
            self.network_current_names = wanted
        return original(self, *args, **kwargs)

    return forward


FakeNetwork.delta_of = lambda self, tag, shape: self._deltas.setdefault(  # type: ignore[attr-defined]
    tag, 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(len(self._deltas) + 101))
)


@pytest.fixture(scope="module")
def _tiny_sdxl_parts(tmp_path_factory):
    from lora_trainer.model.tiny_sdxl import build_tiny_sdxl

    parts = build_tiny_sdxl(seed=0, tokenizer_dir=tmp_path_factory.mktemp("tokxl"))
    for i, name in enumerate(("unet", "text_encoder", "text_encoder_2")):
        _perturb(getattr(parts, name), 10 + i)
    return parts


@pytest.fixture(scope="module")
def _master_sdxl(_tiny_sdxl_parts):
    return build_fake_sdxl_model(_tiny_sdxl_parts)


@pytest.fixture
def sdxl_env(monkeypatch, tmp_path, _master_sdxl):
    return fake_host_env(monkeypatch, tmp_path, _master_sdxl, "conditioner", patch_mha=True)


XL_PROMPT = "ohwx, ring, blue background"  # tests.test_sdxl.PROMPT: its _outputs encodes that
XL_SIZES = [(64, 48, 4, 0, 64, 64)]


def _xl_reference(sd: FakeSDXLModel, prompt: str = XL_PROMPT, sizes=XL_SIZES):
    """What A1111 computes: ``get_learned_conditioning`` (the conditioner with the batch's sizes), then
    ``apply_model`` (UNet with context = crossattn, y = vector)."""
    s = torch.tensor(sizes, dtype=torch.float32)
    with torch.no_grad():
        c = sd.conditioner(
            {"txt": [prompt] * len(sizes), "original_size_as_tuple": s[:, 0:2], "crop_coords_top_left": s[:, 2:4], "target_size_as_tuple": s[:, 4:6]}
        )
        out = sd.model.diffusion_model(PROBE_X.repeat(len(sizes), 1, 1, 1), timesteps=PROBE_T, context=c["crossattn"], y=c["vector"])
    return c, out


def _snapshot_xl(sd: FakeSDXLModel) -> dict:
    emb = sd.conditioner.embedders
    roots = {"unet": sd.model.diffusion_model, "te1": emb[0].wrapped.transformer, "te2": emb[1].wrapped.model}
    c, out = _xl_reference(sd)
    return {
        "weights": {f"{r}.{k}": v.detach().clone() for r, m in roots.items() for k, v in m.state_dict().items()},
        "grad": {f"{r}.{k}": p.requires_grad for r, m in roots.items() for k, p in m.named_parameters()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in sd.modules()],
        "instance_forwards": sum("forward" in m.__dict__ for m in sd.modules()),
        "ldm_flags": [(getattr(m, "checkpoint", None), getattr(m, "use_checkpoint", None)) for m in sd.model.diffusion_model.modules()],
        "training": [m.training for m in sd.modules()],
        "cond": torch.cat([c["crossattn"].flatten(), c["vector"].flatten()]),
        "out": out,
    }


def _xl_bundle(env):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.runtime import Runtime

    return A1111Host().model_bundle(TrainConfig(), Runtime(torch.device("cpu"), "no"))


def _xl_standalone(parts):
    from lora_trainer.model.sdxl import make_sdxl_bundle

    return make_sdxl_bundle(copy.deepcopy(parts))


def _xl_predict(bundle, prompt: str = XL_PROMPT, sizes=XL_SIZES):
    with torch.no_grad():
        cond = bundle.condition(bundle.encode_text([prompt] * len(sizes)), sizes)
        return cond, bundle.predict(PROBE_X.repeat(len(sizes), 1, 1, 1), PROBE_T, cond)


def test_sdxl_bundle_conditions_as_the_host_and_as_diffusers(sdxl_env, _tiny_sdxl_parts):
    """The bundle's context, ``y`` and UNet output are what A1111's conditioner and apply_model give, and
    what the standalone (diffusers) SDXL bundle gives on the same weights."""
    env = sdxl_env
    bundle = _xl_bundle(env)
    try:
        assert bundle.family == "sdxl" and bundle.base_model_version == "sdxl_base_v1-0"
        assert bundle.prediction_type == "epsilon" and bundle.default_resolution == 1024
        sizes = [(64, 48, 4, 0, 64, 64), (96, 64, 0, 16, 64, 64)]
        cond, out = _xl_predict(bundle, sizes=sizes)
        host_c, host_out = _xl_reference(env.sd, sizes=sizes)
        torch.testing.assert_close(cond.hidden, host_c["crossattn"])
        from lora_trainer.hosts.a1111 import _SDXLConditioning

        y = _SDXLConditioning(env.sd, torch.device("cpu")).vector(cond.pooled, cond.time_ids)
        torch.testing.assert_close(y, host_c["vector"])
        torch.testing.assert_close(out, host_out)

        ref = _xl_standalone(_tiny_sdxl_parts)
        ref_cond, ref_out = _xl_predict(ref, sizes=sizes)
        torch.testing.assert_close(cond.hidden, ref_cond.hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cond.pooled, ref_cond.pooled, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-3)
        # without sizes: the square, uncropped size of the latents
        plain = bundle.predict(PROBE_X, PROBE_T, bundle.encode_text([XL_PROMPT]))
        torch.testing.assert_close(plain, ref.predict(PROBE_X, PROBE_T, ref.encode_text([XL_PROMPT])), atol=1e-4, rtol=1e-3)
        # latents: the posterior mean (or a sample from our generator), scaled
        px = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
        torch.testing.assert_close(bundle.encode_images(px, None), ref.encode_images(px, None), atol=1e-5, rtol=1e-4)
        a = bundle.encode_images(px, torch.Generator().manual_seed(1))
        assert torch.equal(a, bundle.encode_images(px, torch.Generator().manual_seed(1)))
        torch.testing.assert_close(a, ref.encode_images(px, torch.Generator().manual_seed(1)), atol=1e-5, rtol=1e-4)
        # the text-encoder output cache joins per-caption outputs
        both = bundle.concat_conditions([bundle.encode_text(["a"]), bundle.encode_text(["b"])])
        assert both.hidden.shape[0] == 2 and both.pooled.shape[0] == 2
    finally:
        bundle.release()


@pytest.mark.parametrize("locon", [False, True])
def test_sdxl_targets_have_the_standalone_names_and_one_file_means_the_same(sdxl_env, _tiny_sdxl_parts, locon):
    """Same kohya names as the standalone SDXL bundle (SGM UNet names, te1, te2 with separate q/k/v);
    one LoRA state dict gives the same conditioning and UNet output on both."""
    from lora_trainer.network import LoRANetwork

    env = sdxl_env
    bundle = _xl_bundle(env)
    try:
        ref = _xl_standalone(_tiny_sdxl_parts)
        ours_t = bundle.unet_targets(locon) + bundle.text_encoder_targets()
        ref_t = ref.unet_targets(locon) + ref.text_encoder_targets()
        assert sorted(t.lora_name for t in ours_t) == sorted(t.lora_name for t in ref_t)
        names = {t.lora_name for t in ours_t}
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in names
        assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in names
        assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in names
        assert any(n.startswith("lora_unet_middle_block_1_transformer_blocks_1_") for n in names)
        assert not any("attn_out_proj" in n and n.startswith("lora_te2") and "self_attn" not in n for n in names)
        torch.manual_seed(0)
        ref_net = LoRANetwork.create(ref_t, 4, 2.0, 3 if locon else None, 1.5)
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for m in ref_net.loras:
                m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
        ours_net = LoRANetwork.create(ours_t, 4, 2.0, 3 if locon else None, 1.5)
        ours_net.load_kohya_state_dict(ref_net.kohya_state_dict())  # strict
        base = _xl_predict(bundle)[1]
        ref_net.attach()
        ours_net.attach()
        try:
            ours_cond, ours_out = _xl_predict(bundle)
            ref_cond, ref_out = _xl_predict(ref)
        finally:
            ours_net.detach()
            ref_net.detach()
        assert not torch.allclose(ours_out, base, atol=1e-3)
        torch.testing.assert_close(ours_cond.hidden, ref_cond.hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours_cond.pooled, ref_cond.pooled, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours_out, ref_out, atol=1e-4, rtol=1e-3)
    finally:
        bundle.release()


def test_sdxl_run_trains_every_adapter_loads_in_diffusers_and_leaves_the_host_as_it_was(sdxl_env, cfg, _tiny_sdxl_parts, tmp_path):
    """A run on the A1111-shaped SDXL: files with SGM/te1/te2 names (separate q/k/v) and SDXL metadata;
    every adapter learned (te1's last layer is not in the penultimate output, as in kohya); diffusers'
    StableDiffusionXLPipeline.load_lora_weights takes every key and computes what our fused LoRA computes
    on the host; and the host is bit for bit as before, the class-level MHA patch included."""
    pytest.importorskip("peft")
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.network.load import network_from_file
    from lora_trainer.train.events import EventBus, Message, StepEvent, StopControl
    from tests.test_sdxl import _outputs, _pipeline

    env = sdxl_env
    sd = env.sd
    before = _snapshot_xl(sd)
    seen = {"fused": set(), "grad": []}
    messages = []

    def listener(ev):
        if isinstance(ev, StepEvent):
            seen["fused"].add(sum("forward" in m.__dict__ for m in sd.conditioner.modules()))
            seen["grad"].append(torch.is_grad_enabled())
        elif isinstance(ev, Message):
            messages.append(ev.text)

    cfg = TrainConfig(**{**cfg.to_dict(), "clip_skip": 2, "save_precision": "float"})
    A1111Host().run(cfg, EventBus(listener), StopControl())
    assert sorted(p.name for p in env.lora_dir.iterdir() if p.name != STATE_FOLDER) == ["t-000001.safetensors", "t.safetensors"]
    tensors, meta = _file(env.lora_dir / "t.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_sd_model_name"] == "tiny-sdxl.safetensors [fedcba9876]"
    ref = _xl_standalone(_tiny_sdxl_parts)
    expected = {t.lora_name for t in ref.unet_targets(False) + ref.text_encoder_targets()}
    assert {k.split(".")[0] for k in tensors} == expected and len(tensors) == 3 * len(expected)
    layers = _tiny_sdxl_parts.text_encoder.config.num_hidden_layers
    dead = sorted(
        k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0
        and not k.startswith(f"lora_te1_text_model_encoder_layers_{layers - 1}_")
    )
    assert not dead, f"no gradient reached {dead[:4]}"
    for part in ("q", "k", "v", "out"):
        assert tensors[f"lora_te2_text_model_encoder_layers_0_self_attn_{part}_proj.lora_up.weight"].shape == (64, 4)
    assert seen["fused"] == {2} and all(seen["grad"])  # one instance forward per OpenCLIP attention, during the run
    assert any("clip_skip is not used" in m for m in messages)
    assert env.shared.opts.CLIP_stop_at_last_layers == 1  # SDXL never touches the host's Clip skip
    _assert_host_unchanged(before, _snapshot_xl(sd))

    # the file in diffusers: every key loaded, and the same numbers as our (fused) LoRA on the host
    bundle = _xl_bundle(env)
    try:
        net, unmatched = network_from_file(env.lora_dir / "t.safetensors", bundle.unet_targets(False) + bundle.text_encoder_targets())
        assert not unmatched
        net.attach()
        try:
            x, t = PROBE_X, PROBE_T
            with torch.no_grad():
                host_cond = bundle.encode_text([XL_PROMPT])
                host_out = bundle.predict(x, t, bundle.condition(host_cond, XL_SIZES))
        finally:
            net.detach()
    finally:
        bundle.release()
    reference = copy.deepcopy(_tiny_sdxl_parts)
    pipe = _pipeline(reference)
    pipe.load_lora_weights(str(env.lora_dir), weight_name="t.safetensors", adapter_name="ours")
    from peft.tuners.lora import LoraLayer

    counts = [sum(isinstance(m, LoraLayer) for m in getattr(reference, n).modules()) for n in ("unet", "text_encoder", "text_encoder_2")]
    assert counts == [sum(n.startswith(p) for n in expected) for p in ("lora_unet_", "lora_te1_", "lora_te2_")]
    theirs_cond, theirs_out = _outputs(reference, x, t, sizes=XL_SIZES)
    torch.testing.assert_close(theirs_cond.hidden, host_cond.hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_cond.pooled, host_cond.pooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_out, host_out, atol=1e-4, rtol=1e-3)


def test_sdxl_host_loras_are_cleared_through_the_fused_attention(sdxl_env, cfg):
    """A host LoRA merged into the OpenCLIP in_proj (A1111's MHA patch) and the other layers is taken out
    before training; the next generation that asks for it merges it again."""
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StepEvent, StopControl

    env = sdxl_env
    sd = env.sd
    clean = _snapshot_xl(sd)
    env.networks.loaded_networks.append(FakeNetwork("host"))
    merged = _snapshot_xl(sd)
    assert not torch.equal(merged["cond"], clean["cond"]) and not torch.equal(merged["out"], clean["out"])
    attn = sd.conditioner.embedders[1].wrapped.model.transformer.resblocks[0].attn
    seen = []

    def listener(ev):
        if isinstance(ev, StepEvent) and ev.step == 1:
            seen.append(torch.equal(attn.in_proj_weight, clean["weights"]["te2.transformer.resblocks.0.attn.in_proj_weight"]))

    run_cfg = TrainConfig(**{**cfg.to_dict(), "max_train_epochs": 1, "gradient_checkpointing": True})
    A1111Host().run(run_cfg, EventBus(listener), StopControl())
    assert seen == [True], "training ran on the clean fused weights"
    tensors, _ = _file(env.lora_dir / "t.safetensors")
    assert tensors["lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k.lora_up.weight"].abs().sum() > 0
    _assert_host_unchanged(clean, _snapshot_xl(sd))
    env.networks.loaded_networks.append(FakeNetwork("host"))
    again = _snapshot_xl(sd)
    assert torch.equal(again["cond"], merged["cond"]) and torch.equal(again["out"], merged["out"])


def test_sdxl_refiner_and_half_vae_are_refused_clearly(sdxl_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host, _encode_sgm_vae
    from lora_trainer.train.events import EventBus, StopControl

    env = sdxl_env
    emb = env.sd.conditioner.embedders
    # a refiner: OpenCLIP only, with an aesthetic score
    env.sd.conditioner.embedders = nn.ModuleList([emb[1], FakeSizeEmbedder("aesthetic_score", 8)])
    with pytest.raises(LoraTrainerError, match="refiner"):
        A1111Host().run(cfg, EventBus(), StopControl())
    assert [c[0] for c in env.shared.state.calls] == ["begin", "end"] and not env.call_queue.queue_lock.locked()
    env.sd.conditioner.embedders = emb
    vae = env.sd.first_stage_model
    with torch.no_grad():
        vae.quant_conv.bias.fill_(float("inf"))
    with pytest.raises(LoraTrainerError, match="no-half-vae"):
        _encode_sgm_vae(vae, torch.zeros(1, 3, 64, 64), None, 0.13025)


# =========================================================================== SD2
#
# A1111 1.10 holds SD2 as ldm's LatentDiffusion with ``cond_stage_model`` = its
# FrozenOpenCLIPEmbedderWithCustomWords, whose ``wrapped`` is ldm's FrozenOpenCLIPEmbedder: ``model`` an
# open_clip model (nn.MultiheadAttention with a fused in_proj), layer "penultimate" (``layer_idx`` 1: the
# last block never runs), ``encode_with_transformer`` = the blocks it runs, then ``ln_final``. The stand-in
# carries the weights of tests.test_sd2's tiny SD2 (its HF CLIPTextModel keeps the blocks the host runs, as
# diffusers keeps 23 of OpenCLIP-H's 24), so the standalone diffusers bundle on the same weights is the
# reference.


class FakeFrozenOpenCLIPEmbedder(nn.Module):
    """ldm's ``FrozenOpenCLIPEmbedder`` (layer "penultimate")."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layer, self.layer_idx = "penultimate", 1

    def encode_with_transformer(self, text: torch.Tensor) -> torch.Tensor:
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        blocks = self.model.transformer.resblocks
        for i, r in enumerate(blocks):
            if i == len(blocks) - self.layer_idx:
                break
            x = r(x, attn_mask=self.model.attn_mask)
        return self.model.ln_final(x.permute(1, 0, 2))


class FakeOpenCLIPWrapper(nn.Module):
    """Like ``FrozenOpenCLIPEmbedderWithCustomWords``: tokens, then ``wrapped.encode_with_transformer``, no
    ``no_grad``; Clip skip is not read (A1111 ignores it for OpenCLIP)."""

    def __init__(self, wrapped: nn.Module, tokenizer):
        super().__init__()
        self.wrapped = wrapped
        self.tokenizer = tokenizer

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return self.wrapped.encode_with_transformer(ids)


def openclip_sd2_twin(hf_te: nn.Module) -> nn.Module:
    """An open_clip text model with the HF CLIPTextModel's blocks (q/k/v fused) and one block more after
    them, which the penultimate layer never runs."""
    from lora_trainer.model.sdxl import openclip_from_hf_state_dict
    from tests.test_fused_qkv import OpenCLIPText

    c = hf_te.config
    m = OpenCLIPText(c.vocab_size, c.hidden_size, c.num_hidden_layers + 1, c.num_attention_heads, c.intermediate_size, c.hidden_size)
    sd = {**hf_te.state_dict(), "text_projection.weight": torch.eye(c.hidden_size)}  # OpenCLIP-H files carry one
    missing, unexpected = m.load_state_dict(openclip_from_hf_state_dict(sd, prefix=""), strict=False)
    last = f"transformer.resblocks.{c.num_hidden_layers}."
    assert not unexpected and all(k == "logit_scale" or k.startswith(last) for k in missing), missing
    return m.eval()


def ldm_unet_of(parts, use_checkpoint: bool = True) -> nn.Module:
    """ldm's UNetModel with a diffusers SD1/SD2 UNet's weights (GroupNorms set to its groups)."""
    from lora_trainer.model.ldm_names import convert_unet_state_dict, unet_diffusers_to_ldm_names
    from tests.test_ldm_names import _ldm_unet_kwargs

    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    config = dict(parts.unet.config)
    with contextlib.redirect_stdout(io.StringIO()):
        unet = openaimodel.UNetModel(**_ldm_unet_kwargs(config), use_checkpoint=use_checkpoint)
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            m.num_groups = config["norm_num_groups"]
    unet.load_state_dict(convert_unet_state_dict(parts.unet.state_dict(), unet_diffusers_to_ldm_names(config)), strict=True)
    return unet.eval()


class FakeSD2Model(FakeSDModel):
    def __init__(self, unet: nn.Module, cond: nn.Module, vae: nn.Module):
        super().__init__(unet, cond, vae)
        self.parameterization = "v"
        self.is_sd1, self.is_sd2, self.is_sdxl = False, True, False
        self.sd_checkpoint_info = SimpleNamespace(
            title="tiny-sd2.safetensors [5d2a5d2a5d]", filename="/models/tiny-sd2.safetensors", sha256="ef" * 32
        )


def build_fake_sd2_model(parts) -> FakeSD2Model:
    oc = openclip_sd2_twin(parts.text_encoder)
    with torch.no_grad():  # the block the host never runs: anything but the HF model's
        for p in oc.transformer.resblocks[-1].parameters():
            p.add_(0.5)
    cond = FakeOpenCLIPWrapper(FakeFrozenOpenCLIPEmbedder(oc), parts.tokenizer)
    sd = FakeSD2Model(ldm_unet_of(parts), cond, copy.deepcopy(parts.vae)).eval()
    sd.model.diffusion_model.requires_grad_(True)
    sd.cond_stage_model.requires_grad_(False)
    sd.first_stage_model.requires_grad_(False)
    return sd


@pytest.fixture(scope="module")
def _tiny_sd2_parts(tmp_path_factory):
    from tests.test_sd2 import build_tiny_sd2

    parts = build_tiny_sd2(0, tmp_path_factory.mktemp("tok2"))
    _perturb(parts.unet, 20)
    _perturb(parts.text_encoder, 21)
    return parts


@pytest.fixture(scope="module")
def _master_sd2(_tiny_sd2_parts):
    return build_fake_sd2_model(_tiny_sd2_parts)


@pytest.fixture
def sd2_env(monkeypatch, tmp_path, _master_sd2):
    return fake_host_env(monkeypatch, tmp_path, _master_sd2, "cond_stage_model", patch_mha=True)


SD2_PROMPT = "ohwx, ring"
_host_bundle = _xl_bundle  # A1111Host().model_bundle on whatever the fake host has loaded


def _sd2_standalone(parts):
    from lora_trainer.model.sd import make_sd_bundle

    return make_sd_bundle(copy.deepcopy(parts))


def _sd_predict(bundle, prompt: str = SD2_PROMPT):
    with torch.no_grad():
        cond = bundle.encode_text([prompt])
        return cond, bundle.predict(PROBE_X, PROBE_T, cond)


def test_sd2_bundle_names_and_outputs_are_the_standalone_ones(sd2_env, _tiny_sd2_parts):
    """On A1111's SD2 (OpenCLIP, fused q/k/v, penultimate layer): v-prediction, the same conditioning and
    UNet output as the standalone SD2 bundle on the same weights; the same kohya names (diffusers UNet
    names, ``lora_te_`` for the blocks the host runs, separate q/k/v); one LoRA state dict gives the same
    outputs on both, and removing it gives the host back bit for bit."""
    from lora_trainer.network import LoRANetwork

    env = sd2_env
    bundle = _host_bundle(env)
    try:
        assert bundle.family == "sd2" and bundle.prediction_type == "v_prediction"
        assert bundle.base_model_version == "sd_v2_v" and bundle.default_resolution == 768
        ref = _sd2_standalone(_tiny_sd2_parts)
        base_cond, base_out = _sd_predict(bundle)
        ref_cond, ref_out = _sd_predict(ref)
        torch.testing.assert_close(base_cond, ref_cond, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(base_out, ref_out, atol=1e-4, rtol=1e-3)

        for locon in (False, True):
            ours_t = bundle.unet_targets(locon) + bundle.text_encoder_targets()
            ref_t = ref.unet_targets(locon) + ref.text_encoder_targets()
            assert [t.lora_name for t in ours_t[-len(ref.text_encoder_targets()):]] == [t.lora_name for t in ref.text_encoder_targets()]
            assert sorted(t.lora_name for t in ours_t) == sorted(t.lora_name for t in ref_t)
        te_names = [t.lora_name for t in bundle.text_encoder_targets()]
        layers = _tiny_sd2_parts.text_encoder.config.num_hidden_layers
        assert len(te_names) == 6 * layers  # the host's open_clip model has one block more: never run, no LoRA
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_names
        assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in te_names
        assert not any(f"_layers_{layers}_" in n for n in te_names)

        torch.manual_seed(0)
        ref_net = LoRANetwork.create(ref_t, 4, 2.0, 3, 1.5)
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for m in ref_net.loras:
                m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
        ours_net = LoRANetwork.create(ours_t, 4, 2.0, 3, 1.5)
        ours_net.load_kohya_state_dict(ref_net.kohya_state_dict())  # strict
        ref_net.attach()
        ours_net.attach()
        try:
            ours_cond, ours_out = _sd_predict(bundle)
            lora_ref_cond, lora_ref_out = _sd_predict(ref)
        finally:
            ours_net.detach()
            ref_net.detach()
        assert not torch.allclose(ours_cond, base_cond, atol=1e-3) and not torch.allclose(ours_out, base_out, atol=1e-3)
        torch.testing.assert_close(ours_cond, lora_ref_cond, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours_out, lora_ref_out, atol=1e-4, rtol=1e-3)
        after_cond, after_out = _sd_predict(bundle)
        assert torch.equal(after_cond, base_cond) and torch.equal(after_out, base_out)
    finally:
        bundle.release()


def test_sd2_run_trains_the_text_encoder_loads_in_diffusers_and_leaves_the_host_as_it_was(sd2_env, cfg, _tiny_sd2_parts):
    """``A1111Host().run`` on the SD2 stand-in with a host LoRA merged: the host LoRA is taken out first (the
    fused in_proj included), every adapter learns, the te q/k/v LoRA runs through the fused attention, the
    file has the standalone trainer's names and SD2 metadata (clip_skip 1: A1111 ignores Clip skip for
    SD2), diffusers' load_lora_weights takes every key and computes what the file computes on the host,
    and the host is bit for bit as before."""
    pytest.importorskip("peft")
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.network.load import network_from_file
    from lora_trainer.train.events import EventBus, Message, StepEvent, StopControl
    from tests.test_sd2 import _outputs

    env = sd2_env
    sd = env.sd
    clean = _snapshot(sd)
    env.networks.loaded_networks.append(FakeNetwork("host"))
    merged = _snapshot(sd)
    assert not torch.equal(merged["cond"], clean["cond"])
    attn = sd.cond_stage_model.wrapped.model.transformer.resblocks[0].attn
    seen: dict = {"fused": set(), "clean": []}
    messages = []

    def listener(ev):
        if isinstance(ev, StepEvent):
            seen["fused"].add(sum("forward" in m.__dict__ for m in sd.cond_stage_model.modules()))
            if ev.step == 1:
                seen["clean"].append(torch.equal(attn.in_proj_weight, clean["weights"]["te.transformer.resblocks.0.attn.in_proj_weight"]))
        elif isinstance(ev, Message):
            messages.append(ev.text)

    run_cfg = TrainConfig(**{**cfg.to_dict(), "clip_skip": 2, "save_precision": "float"})
    A1111Host().run(run_cfg, EventBus(listener), StopControl())
    assert seen["clean"] == [True], "training ran on the clean fused weights"
    layers = _tiny_sd2_parts.text_encoder.config.num_hidden_layers
    assert seen["fused"] == {layers}, "one instance forward per OpenCLIP attention the host runs, during the run"
    assert any("SD2: clip_skip is not used" in m for m in messages)
    assert not any("cannot take" in m for m in messages)
    assert env.shared.opts.CLIP_stop_at_last_layers == 1
    tensors, meta = _file(env.lora_dir / "t.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and meta["ss_clip_skip"] == "1"
    ref = _sd2_standalone(_tiny_sd2_parts)
    expected = {t.lora_name for t in ref.unet_targets(False) + ref.text_encoder_targets()}
    assert {k.split(".")[0] for k in tensors} == expected and len(tensors) == 3 * len(expected)
    dead = sorted(k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0)
    assert not dead, f"no gradient reached {dead[:4]}"
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight"].shape == (48, 4)
    # the host: clean, as before (no hook, no instance forward, eval, flags); the host LoRA merges again on request
    _assert_host_unchanged(clean, _snapshot(sd))
    env.networks.loaded_networks.append(FakeNetwork("host"))
    again = _snapshot(sd)
    assert torch.equal(again["cond"], merged["cond"]) and torch.equal(again["out"], merged["out"])
    env.networks.loaded_networks.clear()
    _snapshot(sd)  # the patched forwards put the clean weights back

    # the file on the host (our hooks, the fused path) and in diffusers (peft layers on separate q/k/v)
    bundle = _host_bundle(env)
    try:
        net, unmatched = network_from_file(env.lora_dir / "t.safetensors", bundle.unet_targets(False) + bundle.text_encoder_targets())
        assert not unmatched
        net.attach()
        try:
            host_cond, host_out = _sd_predict(bundle)
        finally:
            net.detach()
    finally:
        bundle.release()
    reference = copy.deepcopy(_tiny_sd2_parts)
    pipe = StableDiffusionPipeline(
        vae=reference.vae,
        text_encoder=reference.text_encoder,
        tokenizer=reference.tokenizer,
        unet=reference.unet,
        scheduler=DDPMScheduler.from_config(reference.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # the tiny SD2 UNet is not laid out as SD2's, so its layers have LDM names, which diffusers' SD1/SD2
    # pipeline remaps only when given the UNet's config (its SDXL pipeline passes it by itself)
    assert any(n.startswith("lora_unet_input_blocks_") for n in expected)
    pipe.load_lora_weights(str(env.lora_dir), weight_name="t.safetensors", adapter_name="ours", unet_config=reference.unet.config)
    counts = [sum(isinstance(m, LoraLayer) for m in getattr(reference, n).modules()) for n in ("unet", "text_encoder")]
    assert counts == [sum(n.startswith(p) for n in expected) for p in ("lora_unet_", "lora_te_")]
    ids = reference.tokenizer([SD2_PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    theirs_cond, theirs_out = _outputs(reference, ids, PROBE_X, PROBE_T)
    torch.testing.assert_close(theirs_cond, host_cond, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_out, host_out, atol=1e-4, rtol=1e-3)


# =========================================================================== --medvram / --lowvram
#
# A1111's modules.lowvram (1.10), emulated: ``setup_for_low_vram`` keeps the VAE, the UNet wrapper
# (``sd_model.model``; with --lowvram each UNet block instead) and the text encoder on "the CPU" and moves
# one part at a time to "the GPU" from forward pre-hooks (``send_me_to_gpu``, with the same parents and
# ``module_in_gpu`` bookkeeping), the VAE's also from wrapped encode/decode; ``send_everything_to_cpu``
# sends back the part that is in. This machine has one device, so "on the CPU" is emulated: a part that is
# out has the data of its parameters and buffers swapped for NaN (ints: -1) of the same shape and dtype, the
# real data kept aside (same tensor objects: LoRA layers and grad flags see what they would see). Computing
# with a part that is out gives NaN, so a run that calls a part the host did not move in fails loudly.


class FakeLowVram:
    def __init__(self):
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, its real data)
        self.moves: list[tuple[str, str]] = []

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for t in [*module.parameters(), *module.buffers()]:
            seen.setdefault(id(t), t)
        return list(seen.values())

    def to_cpu(self, module: nn.Module) -> None:
        self.moves.append(("cpu", type(module).__name__))
        for t in self._tensors(module):
            if id(t) not in self.kept:
                real = t.data
                fill = float("nan") if real.is_floating_point() else -1
                self.kept[id(t)] = (t, real)
                t.data = torch.full((1,) * max(real.dim(), 1), fill, dtype=real.dtype).expand(real.shape) if real.dim() else torch.tensor(fill, dtype=real.dtype)

    def to_gpu(self, module: nn.Module) -> None:
        self.moves.append(("gpu", type(module).__name__))
        for t in self._tensors(module):
            entry = self.kept.pop(id(t), None)
            if entry is not None:
                t.data = entry[1]

    def is_out(self, module: nn.Module) -> bool:
        return any(id(t) in self.kept for t in self._tensors(module))

    def real(self, t: torch.Tensor) -> torch.Tensor:
        entry = self.kept.get(id(t))
        return entry[1] if entry is not None else t.data


def install_fake_lowvram(monkeypatch, env, *, lowvram_flag: bool = False, medvram_sdxl: bool = False) -> SimpleNamespace:
    """``modules.lowvram`` and ``modules.devices`` as A1111 has them, the command-line flag set, and the
    loaded model set up by ``setup_for_low_vram`` (as ``sd_models.load_model`` does)."""
    fake = FakeLowVram()
    lowvram = types.ModuleType("modules.lowvram")
    lowvram.module_in_gpu = None
    lowvram.cpu = torch.device("cpu")
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")

    def send_everything_to_cpu():
        if lowvram.module_in_gpu is not None:
            fake.to_cpu(lowvram.module_in_gpu)
        lowvram.module_in_gpu = None

    def is_enabled(sd_model):
        return sd_model.lowvram

    def setup_for_low_vram(sd_model, use_medvram):
        sd_model.lowvram = True
        parents = {}

        def send_me_to_gpu(module, _):
            module = parents.get(module, module)
            if lowvram.module_in_gpu == module:
                return
            if lowvram.module_in_gpu is not None:
                fake.to_cpu(lowvram.module_in_gpu)
            fake.to_gpu(module)
            lowvram.module_in_gpu = module

        vae = sd_model.first_stage_model
        encode, decode = vae.encode, vae.decode

        def first_stage_model_encode_wrap(x):
            send_me_to_gpu(vae, None)
            return encode(x)

        def first_stage_model_decode_wrap(z):
            send_me_to_gpu(vae, None)
            return decode(z)

        fake.to_cpu(vae)
        if getattr(sd_model, "is_sdxl", False):
            fake.to_cpu(sd_model.conditioner)
            sd_model.conditioner.register_forward_pre_hook(send_me_to_gpu)
        elif hasattr(sd_model.cond_stage_model.wrapped, "model"):  # SD2
            wrapped = sd_model.cond_stage_model.wrapped
            fake.to_cpu(wrapped.model)
            for m in (wrapped.model, wrapped.model.token_embedding):
                m.register_forward_pre_hook(send_me_to_gpu)
                parents[m] = wrapped
        else:
            wrapped = sd_model.cond_stage_model.wrapped
            fake.to_cpu(wrapped.transformer)
            wrapped.transformer.register_forward_pre_hook(send_me_to_gpu)
            parents[wrapped.transformer] = wrapped
        vae.register_forward_pre_hook(send_me_to_gpu)
        vae.encode = first_stage_model_encode_wrap
        vae.decode = first_stage_model_decode_wrap
        if use_medvram:
            fake.to_cpu(sd_model.model)
            sd_model.model.register_forward_pre_hook(send_me_to_gpu)
        else:
            unet = sd_model.model.diffusion_model
            for block in [unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks]:
                fake.to_cpu(block)
                block.register_forward_pre_hook(send_me_to_gpu)

    lowvram.send_everything_to_cpu = send_everything_to_cpu
    lowvram.is_enabled = is_enabled
    lowvram.setup_for_low_vram = setup_for_low_vram
    lowvram.fake = fake
    for name, mod in (("modules.lowvram", lowvram), ("modules.devices", devices)):
        monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setattr(sys.modules["modules"], name.split(".", 1)[1], mod, raising=False)
    cmd = env.shared.cmd_opts
    cmd.lowvram, cmd.medvram, cmd.medvram_sdxl = lowvram_flag, not lowvram_flag and not medvram_sdxl, medvram_sdxl
    setup_for_low_vram(env.sd, not lowvram_flag)
    return SimpleNamespace(lowvram=lowvram, fake=fake)


def _host_generation(sd, prompt: str = "ohwx ring, blue background") -> torch.Tensor:
    """One generation as A1111 runs it under --medvram: the conditioning through the text encoder's wrapper,
    ``apply_model`` through ``sd_model.model``, the VAE's wrapped decode; at the end everything goes back to
    the CPU (processing.process_images). Every hook moves its part in as it is called."""
    with torch.no_grad():
        if getattr(sd, "is_sdxl", False):
            s = torch.tensor(XL_SIZES, dtype=torch.float32)
            c = sd.conditioner(
                {"txt": [prompt], "original_size_as_tuple": s[:, 0:2], "crop_coords_top_left": s[:, 2:4], "target_size_as_tuple": s[:, 4:6]}
            )
            out = sd.model(PROBE_X, PROBE_T, c)
            cond = torch.cat([c["crossattn"].flatten(), c["vector"].flatten()])
        else:
            cond = sd.cond_stage_model([prompt])
            out = sd.model(PROBE_X, PROBE_T, c_crossattn=[cond])
        image = sd.first_stage_model.decode(out / sd.scale_factor).sample
    sys.modules["modules.lowvram"].send_everything_to_cpu()
    return torch.cat([cond.flatten(), out.flatten(), image.flatten()])


def _placement(sd, lv) -> dict:
    """Where each part is, what the host thinks is in, every hook (the objects, in order), the VAE's wraps,
    the real weights (kept aside or not) and grad flags."""
    fake = lv.lowvram.fake
    parts = {"vae": sd.first_stage_model, "unet": sd.model, "text": sd.conditioner if getattr(sd, "is_sdxl", False) else sd.cond_stage_model}
    return {
        "out": {k: fake.is_out(m) for k, m in parts.items()},
        "module_in_gpu": lv.lowvram.module_in_gpu,
        "pre_hooks": [list(m._forward_pre_hooks.values()) for m in sd.modules()],
        "hooks": [len(m._forward_hooks) for m in sd.modules()],
        "instance_forwards": sum("forward" in m.__dict__ for m in sd.modules()),
        "vae_wraps": (sd.first_stage_model.__dict__.get("encode"), sd.first_stage_model.__dict__.get("decode")),
        "weights": {n: fake.real(t).clone() for n, t in [*sd.named_parameters(), *sd.named_buffers()]},
        "grad": {n: p.requires_grad for n, p in sd.named_parameters()},
        "training": [m.training for m in sd.modules()],
    }


def _assert_placement_as_before(before: dict, after: dict) -> None:
    assert after["out"] == before["out"], f"parts in/out: {before['out']} -> {after['out']}"
    assert after["module_in_gpu"] is before["module_in_gpu"], "the host's module_in_gpu"
    assert after["pre_hooks"] == before["pre_hooks"], "the host's hooks, in order"
    assert after["hooks"] == before["hooks"] and after["instance_forwards"] == before["instance_forwards"] == 0
    assert after["vae_wraps"] == before["vae_wraps"]
    changed = [k for k in before["weights"] if not torch.equal(before["weights"][k], after["weights"][k])]
    assert not changed, f"weights changed: {changed[:5]}"
    assert after["grad"] == before["grad"] and after["training"] == before["training"]


@pytest.fixture(params=["sd1", "sd2"])
def medvram_env(request, monkeypatch):
    env = request.getfixturevalue("host_env" if request.param == "sd1" else "sd2_env")
    env.lv = install_fake_lowvram(monkeypatch, env)
    return env


def test_the_emulated_medvram_bites(medvram_env):
    """The emulation is faithful where it matters: the UNet called directly (as the bundle calls it) while
    the host has it on the CPU computes nothing usable; through ``sd_model.model`` the host moves it in."""
    env = medvram_env
    sd = env.sd
    cond = sd.cond_stage_model(["ohwx ring"])  # the text encoder's hook moves it in
    assert torch.isfinite(cond).all()
    with torch.no_grad():
        assert torch.isnan(sd.model.diffusion_model(PROBE_X, PROBE_T, context=cond)).all()
        assert torch.isfinite(sd.model(PROBE_X, PROBE_T, c_crossattn=[cond])).all()
    assert env.lv.lowvram.module_in_gpu is sd.model
    assert env.lv.fake.is_out(sd.cond_stage_model.wrapped), "the UNet's hook sent the text encoder back"


def test_without_the_medvram_handling_the_run_fails(medvram_env, cfg, monkeypatch):
    """The control: with the adapter's --medvram handling switched off, the run fails on the emulated host."""
    from lora_trainer.hosts import a1111
    from lora_trainer.train.events import EventBus, StopControl

    monkeypatch.setattr(a1111._Offloading, "for_model", classmethod(lambda cls, sd_model, roots: None))
    with pytest.raises(LoraTrainerError, match="The loss became nan"):
        a1111.A1111Host().run(TrainConfig(**{**cfg.to_dict(), "max_train_epochs": 1}), EventBus(), StopControl())


@pytest.mark.parametrize("variant", ["cached", "uncached_checkpointed", "text_cache_grid"])
def test_medvram_run_trains_and_gives_the_host_its_placement_back(medvram_env, cfg, monkeypatch, variant):
    """--medvram: the UNet is moved in by its own hook and stays in for the run (its hook off), the text
    encoder and the VAE are moved by the host's hooks as in a generation (the text encoder is in from its
    forward to the backward); every adapter learns; afterwards the hooks are back in order, the parts are
    where they were (here: the text encoder in, as after the host computed an empty prompt), the host's
    ``module_in_gpu`` is the same, and a generation gives the same numbers. A grid column in the middle of
    the run sees the host's own placement."""
    from PIL import Image

    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, Message, StepEvent, StopControl

    env = medvram_env
    sd = env.sd
    lv, fake = env.lv.lowvram, env.lv.fake
    generated = _host_generation(sd)
    assert torch.isfinite(generated).all()
    sd.cond_stage_model([""])  # as A1111 after loading a model: the text encoder is in
    before = _placement(sd, env.lv)
    assert before["out"] == {"vae": True, "unet": True, "text": False}
    seen: dict[str, list] = {"unet_in": [], "unet_hook": [], "in_gpu": []}
    columns: list[dict] = []
    messages: list[str] = []

    def listener(ev):
        if isinstance(ev, StepEvent):
            seen["unet_in"].append(not fake.is_out(sd.model))
            seen["unet_hook"].append(len(sd.model._forward_pre_hooks))
            seen["in_gpu"].append(type(lv.module_in_gpu).__name__)
        elif isinstance(ev, Message):
            messages.append(ev.text)

    overrides = {
        "cached": {},
        "uncached_checkpointed": {"cache_latents": False, "gradient_checkpointing": True},
        "text_cache_grid": {"train_text_encoder": False, "cache_text_encoder_outputs": True, "grid_each_epoch": True,
                            "grid_weights": "0, 1", "grid_prompt": "ohwx"},
    }[variant]
    if variant == "text_cache_grid":
        processing = types.ModuleType("modules.processing")

        class P:
            def __init__(self, **kw):
                self.kw = kw

            def close(self):
                pass

        def process_images(p):
            # the host's placement while it generates: its hooks on, the UNet on the CPU until called
            columns.append({"unet_out": fake.is_out(sd.model), "unet_hook": len(sd.model._forward_pre_hooks)})
            assert torch.isfinite(_host_generation(sd, p.kw["prompt"].split(",")[0])).all()
            return SimpleNamespace(images=[Image.new("RGB", (p.kw["width"], p.kw["height"]), (90, 0, 0))])

        processing.StableDiffusionProcessingTxt2Img = P
        processing.process_images = process_images
        monkeypatch.setitem(sys.modules, "modules.processing", processing)
        monkeypatch.setattr(sys.modules["modules"], "processing", processing, raising=False)
    run_cfg = TrainConfig(**{**cfg.to_dict(), **overrides})
    A1111Host().run(run_cfg, EventBus(listener), StopControl())

    assert any("--medvram" in m for m in messages)
    assert seen["unet_in"] and all(seen["unet_in"]) and set(seen["unet_hook"]) == {0}
    if variant == "text_cache_grid":
        # the text encoder's outputs are cached: after the first step it is not kept on the GPU
        assert set(seen["in_gpu"][1:]) <= {"NoneType"}, seen["in_gpu"]
        assert len(columns) == 4 and all(c == {"unet_out": True, "unet_hook": 1} for c in columns), columns
        assert (env.lora_dir / "t_grid.png").is_file()
    else:
        # the host's hook moved the text encoder in for the step's forward: it was in through the backward
        assert set(seen["in_gpu"]) == {type(sd.cond_stage_model.wrapped).__name__}, seen["in_gpu"]
    tensors, _ = _file(env.lora_dir / "t.safetensors")
    assert any(k.startswith("lora_te_") for k in tensors) == run_cfg.train_text_encoder
    dead = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0]
    assert not dead, f"no gradient reached {dead[:3]}"
    _assert_placement_as_before(before, _placement(sd, env.lv))
    assert torch.equal(_host_generation(sd), generated), "a generation gives the same numbers as before training"


def test_medvram_sdxl_run(sdxl_env, cfg, monkeypatch):
    """--medvram-sdxl with SDXL loaded: the conditioner (its hook is on the conditioner, which our
    embedder calls bypass) and sgm's VAE encoder (called past the wrapped encode) are moved in by the
    host's hooks; the run trains every adapter and gives the host its placement back."""
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StepEvent, StopControl

    env = sdxl_env
    env.lv = install_fake_lowvram(monkeypatch, env, medvram_sdxl=True)
    sd = env.sd
    lv, fake = env.lv.lowvram, env.lv.fake
    generated = _host_generation(sd)
    assert torch.isfinite(generated).all()
    before = _placement(sd, env.lv)
    assert before["out"] == {"vae": True, "unet": True, "text": True} and before["module_in_gpu"] is None
    seen = []
    A1111Host().run(
        TrainConfig(**{**cfg.to_dict(), "max_train_epochs": 1}),
        EventBus(lambda ev: seen.append((fake.is_out(sd.model), lv.module_in_gpu is sd.conditioner)) if isinstance(ev, StepEvent) else None),
        StopControl(),
    )
    assert seen and set(seen) == {(False, True)}, seen
    tensors, _ = _file(env.lora_dir / "t.safetensors")
    layers = env.sd.conditioner.embedders[0].wrapped.transformer.config.num_hidden_layers
    dead = sorted(
        k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.abs().sum() > 0
        and not k.startswith(f"lora_te1_text_model_encoder_layers_{layers - 1}_")
    )
    assert not dead, f"no gradient reached {dead[:4]}"
    _assert_placement_as_before(before, _placement(sd, env.lv))
    assert torch.equal(_host_generation(sd), generated)


def test_lowvram_is_refused_before_anything_changes(host_env, cfg, monkeypatch):
    """--lowvram (the UNet moved block by block) cannot train: a clear refusal naming the flag and what to
    do, before the host's model, placement or options are touched."""
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StopControl

    env = host_env
    env.lv = install_fake_lowvram(monkeypatch, env, lowvram_flag=True)
    sd = env.sd
    assert torch.isfinite(_host_generation(sd)).all()
    before = _placement(sd, env.lv)
    moves = len(env.lv.fake.moves)
    with pytest.raises(LoraTrainerError, match="--lowvram") as e:
        A1111Host().run(TrainConfig(**{**cfg.to_dict(), "clip_skip": 2}), EventBus(), StopControl())
    assert "--medvram" in str(e.value)
    assert len(env.lv.fake.moves) == moves, "nothing was moved"
    _assert_placement_as_before(before, _placement(sd, env.lv))
    assert [c[0] for c in env.shared.state.calls] == ["begin", "end"] and not env.call_queue.queue_lock.locked()
    assert env.shared.opts.CLIP_stop_at_last_layers == 1
    assert not env.lora_dir.exists() or not any(env.lora_dir.iterdir())


# =========================================================================== the host's own LoRA loader
#
# After each save the adapter asks A1111's Lora extension which of the file's modules it applies.
# The stand-ins restate, in our words, what A1111 1.10's extensions-builtin/Lora does with a kohya file.

_RESNET_PARTS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_fixed_stride_name(stem: str) -> str:
    """Stands for ``networks.convert_diffusers_name_to_compvis`` (SD1 names): a diffusers-style UNet
    name becomes an LDM path by SD1.5's fixed stride, three input and three output blocks per level
    (two ResBlocks and a resampler); the text encoder's names get the wrapper's ``transformer`` prefix.
    Any other name is returned as it is."""
    import re

    if m := re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", stem):
        side, level, kind, j, rest = m.groups()
        block = (1 if side == "down" else 0) + 3 * int(level) + int(j)
        rest = _RESNET_PARTS.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_{'input' if side == 'down' else 'output'}_blocks_{block}_{int(kind == 'attentions')}_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", stem):
        kind, j, rest = m.groups()
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * int(j)}_{rest}"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", stem):
        return f"transformer_text_model_encoder_layers_{m.group(1)}_{m.group(2)}"
    return stem


class FakeNetworkOnDisk:
    """Stands for ``network.NetworkOnDisk(name, filename)``: a LoRA file the extension knows."""

    def __init__(self, name, filename):
        self.name, self.filename = name, filename


def fake_load_network(name, network_on_disk):
    """Stands for ``networks.load_network(name, network_on_disk)``: every module of the file is looked
    up in the layer table of ``shared.sd_model`` (``network_layer_mapping``: the modules of
    ``cond_stage_model.wrapped`` and of ``model``, "." replaced by "_"), first under its converted
    name, then with ``lora_unet`` replaced by ``diffusion_model``. Matched ones end up in
    ``.modules`` (keyed by the converted name, each with ``network_key``, ``sd_key``, ``sd_module``);
    the others are only logged at debug level."""
    from safetensors import safe_open

    sd = sys.modules["modules.shared"].sd_model
    layers = {n.replace(".", "_"): m for n, m in sd.cond_stage_model.wrapped.named_modules()}
    layers.update({n.replace(".", "_"): m for n, m in sd.model.named_modules()})
    net = SimpleNamespace(name=name, modules={}, unmatched={})
    with safe_open(network_on_disk.filename, "pt") as f:
        keys = list(f.keys())
    for key in keys:
        stem = key.partition(".")[0]
        sd_key = a1111_fixed_stride_name(stem)
        module = layers.get(sd_key)
        if module is None and "lora_unet" in stem:
            sd_key = stem.replace("lora_unet", "diffusion_model")
            module = layers.get(sd_key)
        if module is None:
            net.unmatched[key] = sd_key
        elif sd_key not in net.modules:
            net.modules[sd_key] = SimpleNamespace(network_key=key, sd_key=sd_key, sd_module=module)
    return net


def install_fake_lora_loader(monkeypatch, env) -> None:
    network = types.ModuleType("network")
    network.NetworkOnDisk = FakeNetworkOnDisk
    monkeypatch.setitem(sys.modules, "network", network)
    env.networks.load_network = fake_load_network


@pytest.fixture(scope="module")
def _master_sd15_layout(tmp_path_factory):
    """The tiny model with SD1.5's block counts (two ResBlocks per level), which A1111's fixed stride fits."""
    return build_fake_sd_model(tmp_path_factory.mktemp("tok15"), num_res_blocks=2)


def _messages(events: list) -> list[tuple[str, str]]:
    from lora_trainer.train.events import Message

    return [(e.level, e.text) for e in events if isinstance(e, Message)]


def test_a_layout_the_host_maps_fully_gives_no_warning(monkeypatch, tmp_path, _master_sd15_layout, cfg):
    from lora_trainer.hosts.a1111 import A1111Host, a1111_key_match
    from lora_trainer.train.events import EventBus, StopControl

    env = fake_host_env(monkeypatch, tmp_path, _master_sd15_layout, "cond_stage_model")
    install_fake_lora_loader(monkeypatch, env)
    events: list = []
    A1111Host().run(cfg, EventBus(events.append), StopControl())
    assert not [m for m in _messages(events) if "LoRA modules of" in m[1] or "not checked" in m[1]]
    saved = env.lora_dir / "t.safetensors"
    match = a1111_key_match(saved)
    assert len(match.applied) == len(_expected_names(env.sd)) == 72 + 12  # every UNet and text module


def test_a_layout_off_the_fixed_stride_gets_ldm_names_the_host_applies_fully(host_env, cfg, monkeypatch):
    """The tiny model has one ResBlock per level, which A1111's fixed SD1.5 stride misreads (see the
    next test): its files name the UNet layers by their LDM paths, which A1111's fallback puts on
    exactly the layers they were trained on. No warning, and the grid is made."""
    from lora_trainer.hosts.a1111 import A1111Host, a1111_key_match
    from lora_trainer.model.ldm import ldm_unet_lora_targets
    from lora_trainer.train.events import EventBus, StopControl

    install_fake_lora_loader(monkeypatch, host_env)
    order: list[str] = []

    def load_network(name, network_on_disk):
        order.append(f"check {name}")
        return fake_load_network(name, network_on_disk)

    host_env.networks.load_network = load_network
    processing = types.ModuleType("modules.processing")
    processing.StableDiffusionProcessingTxt2Img = lambda **kw: SimpleNamespace(kw=kw, close=lambda: None)

    def process_images(p):
        from PIL import Image

        order.append("cell")
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))])

    processing.process_images = process_images
    monkeypatch.setitem(sys.modules, "modules.processing", processing)
    monkeypatch.setattr(sys.modules["modules"], "processing", processing, raising=False)
    events: list = []
    cfg = cfg.with_overrides(["grid_after_training=true", "grid_weights=1"])
    A1111Host().run(cfg, EventBus(events.append), StopControl())
    assert not [m for m in _messages(events) if "LoRA modules of" in m[1] or "not checked" in m[1]]
    assert order[:2] == ["check t-000001", "check t"] and set(order[2:]) == {"cell"}, "each file checked, before the grid"
    match = a1111_key_match(host_env.lora_dir / "t.safetensors")
    targets = {t.lora_name: t.module for t in ldm_unet_lora_targets(host_env.sd.model.diffusion_model, False)}
    assert len(targets) == 48 and set(targets) <= set(match.applied) and len(match.applied) == 60
    assert all(match.applied[stem].module is module for stem, module in targets.items())
    assert "lora_unet_output_blocks_2_1_proj_in" in targets and match.applied["lora_unet_output_blocks_2_1_proj_in"].name == (
        "diffusion_model_output_blocks_2_1_proj_in"
    )


def _diffusers_named_file(sd_model, path: Path) -> SimpleNamespace:
    """A LoRA file for every UNet and text-encoder layer of ``sd_model`` with kohya's SD1 names taken
    literally (diffusers paths, whatever the layout), and the trained network as ``HostKeyCheck`` reads it."""
    from safetensors.torch import save_file

    from lora_trainer.model.ldm import ldm_unet_config, ldm_unet_lora_targets
    from lora_trainer.model.ldm_names import unet_ldm_to_diffusers_names
    from lora_trainer.network import LoRANetwork
    from lora_trainer.network.targets import TEXT_CONTAINERS, find_targets

    unet = sd_model.model.diffusion_model
    to_diffusers = {
        "lora_unet_" + ldm.replace(".", "_"): "lora_unet_" + d.replace(".", "_")
        for ldm, d in unet_ldm_to_diffusers_names(ldm_unet_config(unet)).items()
    }
    targets = ldm_unet_lora_targets(unet, False) + find_targets(_text_encoder(sd_model), "lora_te", TEXT_CONTAINERS)
    net = LoRANetwork.create(targets, 4, 4.0)
    renamed = {}
    for key, value in net.kohya_state_dict().items():
        stem, _, part = key.partition(".")
        renamed[f"{to_diffusers.get(stem, stem)}.{part}"] = value
    save_file(renamed, str(path))
    loras = [SimpleNamespace(lora_name=to_diffusers.get(m.lora_name, m.lora_name), org_module=m.org_module) for m in net.loras]
    return SimpleNamespace(loras=loras)


def test_diffusers_names_on_that_layout_are_reported(host_env, monkeypatch):
    """The same layers named by their diffusers paths, as kohya's SD1 naming would: A1111's fixed
    stride sends 12 modules nowhere and 12 others onto the neighbouring attention (same shapes:
    silently wrong). The check says so."""
    from lora_trainer.hosts.a1111 import a1111_key_match
    from lora_trainer.hosts.webui_common import HostKeyCheck
    from lora_trainer.train.events import EventBus

    install_fake_lora_loader(monkeypatch, host_env)
    host_env.lora_dir.mkdir(parents=True, exist_ok=True)
    path = host_env.lora_dir / "d.safetensors"
    network = _diffusers_named_file(host_env.sd, path)
    events: list = []
    HostKeyCheck("A1111", a1111_key_match, EventBus(events.append))(path, network)
    [(level, text)] = _messages(events)
    assert level == "warning" and "A1111 will ignore or misplace 24 of 60 LoRA modules of d.safetensors" in text
    assert "12 match no layer" in text and "lora_unet_up_blocks_1_attentions_1_proj_in" in text
    assert "12 land on another layer" in text
    assert "lora_unet_up_blocks_1_attentions_0_proj_in -> diffusion_model_output_blocks_3_1_proj_in, not the layer it was trained on" in text


def test_a_shape_the_layer_cannot_take_is_reported(host_env, cfg, monkeypatch):
    from safetensors.torch import save_file

    from lora_trainer.hosts.a1111 import a1111_key_match
    from lora_trainer.hosts.webui_common import HostKeyCheck
    from lora_trainer.train.events import EventBus

    install_fake_lora_loader(monkeypatch, host_env)
    host_env.lora_dir.mkdir(parents=True)
    path = host_env.lora_dir / "odd.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # a 32x32 layer
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 48), f"{stem}.lora_up.weight": torch.zeros(32, 4),
               f"{stem}.alpha": torch.tensor(4.0)}, str(path))
    events: list = []
    HostKeyCheck("A1111", a1111_key_match, EventBus(events.append))(path)
    [(level, text)] = _messages(events)
    assert level == "warning" and "1 of 1 LoRA modules of odd.safetensors" in text
    assert "a 32x48 change for a 32x32 layer" in text


def test_without_the_hosts_loader_the_check_is_skipped_once(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StopControl

    events: list = []
    A1111Host().run(cfg, EventBus(events.append), StopControl())  # the fake networks has no load_network
    said = [m for m in _messages(events) if "not checked" in m[1]]
    assert said == [("info", said[0][1])] and (host_env.lora_dir / "t.safetensors").is_file()
