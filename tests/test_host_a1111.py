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
        out = te(input_ids=ids.to(te.device), output_hidden_states=skip > 1)
        if skip > 1:
            return te.text_model.final_layer_norm(out.hidden_states[-skip])
        return out.last_hidden_state


class FakeSDModel(nn.Module):
    """The parts of ``LatentDiffusion`` (as A1111 loads SD1.5) the adapter touches."""

    def __init__(self, unet: nn.Module, cond: nn.Module, vae: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
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


def build_fake_sd_model(tok_dir: Path) -> FakeSDModel:
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
            num_res_blocks=1,
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
    shared.cmd_opts = SimpleNamespace(lora_dir=str(root / "models" / "Lora"), api_auth=None, medvram=False, lowvram=False)
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


@pytest.fixture
def host_env(monkeypatch, tmp_path, _master_model):
    sd = copy.deepcopy(_master_model)
    env = install_fake_webui(monkeypatch, tmp_path)
    env.shared.sd_model = sd
    for root in (sd.model.diffusion_model, sd.cond_stage_model):
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
                m.register_forward_pre_hook(_patched_forward_emulation)
    env.sd = sd
    env.lora_dir = Path(env.shared.cmd_opts.lora_dir)
    return env


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


def _snapshot(sd: FakeSDModel) -> dict:
    unet, clip = sd.model.diffusion_model, sd.cond_stage_model
    with torch.no_grad():
        cond = clip(["ohwx ring, blue background"])
        out = unet(PROBE_X, PROBE_T, context=cond)
    roots = {"unet": unet, "te": clip.wrapped.transformer}
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
    files = sorted(p.name for p in env.lora_dir.iterdir())
    assert files == ["t-000001.safetensors", "t.safetensors"]
    assert not (Path(cfg.output_dir)).exists()
    tensors, meta = _file(env.lora_dir / "t.safetensors")
    names = {k.split(".")[0] for k in tensors}
    expected = _expected_names(sd)
    assert names == expected and len(tensors) == 3 * len(expected)
    assert any(n.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k") for n in names)
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
    assert sorted(p.name for p in folder.iterdir()) == ["ck-000001.safetensors", "ck.safetensors"]
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


def test_sdxl_is_refused_clearly_and_the_host_is_released(host_env, cfg):
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StopControl

    env = host_env
    env.sd.is_sd1, env.sd.is_sdxl = False, True
    with pytest.raises(LoraTrainerError, match="SDXL training in the WebUI is not supported yet"):
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
