"""The training loop on the tiny SD1.5-architecture model: noise maths against diffusers, the
step plan and its events, saving, stopping, caching, precision, optimizers and failure paths."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.errors import ConfigError, LoraTrainerError
from lora_trainer.model.sd import alphas_cumprod_from_config, make_sd_bundle
from lora_trainer.model.tiny import SD_SCHEDULER
from lora_trainer.train.cache import CACHE_SUFFIX, encode_batch
from lora_trainer.train.events import (
    CachingProgress,
    EventBus,
    FileSaved,
    Message,
    StepEvent,
    StopControl,
    TrainingFinished,
    TrainingStarted,
)
from lora_trainer.train.loop import train
from lora_trainer.train.noise import add_noise, min_snr_weight, sample_noise, target_for
from lora_trainer.train.state import STATE_FOLDER

# ---------------------------------------------------------------------------------------- helpers


def _set_repeats(cfg, n: int) -> int:
    """Rename the demo folder to ``<n>_ohwx ring``; returns the number of images in it."""
    root = Path(cfg.train_data_dir)
    (sub,) = [d for d in root.iterdir() if d.is_dir()]
    sub.rename(root / f"{n}_ohwx ring")
    return len(list((root / f"{n}_ohwx ring").glob("*.png")))


def _collect():
    events: list = []
    return events, EventBus(events.append)


def _names(result) -> list[str]:
    return [p.name for p in result.files]


def _files_in(cfg) -> list[str]:
    """The files a host sees in the output folder (not the hidden training states: tests/test_resume.py)."""
    return sorted(p.name for p in Path(cfg.output_dir).iterdir() if p.name != STATE_FOLDER)


def _ups(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if k.endswith(".lora_up.weight")}


def _tensor_bytes(path: Path) -> bytes:
    """The tensor data of a safetensors file (everything after the JSON header)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return data[8 + n :]


def _count_encoded(bundle) -> list[int]:
    """Wrap ``bundle.encode_images`` so every encoded image is counted."""
    counter = [0]
    orig = bundle.encode_images

    def counting(pixels, generator=None):
        counter[0] += pixels.shape[0]
        return orig(pixels, generator)

    bundle.encode_images = counting
    return counter


def _no_hooks(parts) -> bool:
    return not any(
        m._forward_hooks or m._forward_pre_hooks for root in (parts.unet, parts.text_encoder) for m in root.modules()
    )


# ------------------------------------------------------------------------------------- noise maths

T = torch.tensor([0, 1, 10, 250, 500, 750, 999])


def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SD_SCHEDULER)


def test_alphas_match_diffusers_scaled_linear():
    sched = _ddpm()
    assert SD_SCHEDULER["beta_schedule"] == "scaled_linear"
    torch.testing.assert_close(alphas_cumprod_from_config(SD_SCHEDULER), sched.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_add_noise_and_targets_match_diffusers():
    sched = _ddpm()
    ac = alphas_cumprod_from_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(T), 4, 8, 8, generator=g)
    noise = torch.randn(len(T), 4, 8, 8, generator=g)
    torch.testing.assert_close(add_noise(x0, noise, T, ac), sched.add_noise(x0, noise, T), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        target_for("v_prediction", x0, noise, T, ac), sched.get_velocity(x0, noise, T), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(target_for("epsilon", x0, noise, T, ac), noise)
    with pytest.raises(ValueError, match="sample"):
        target_for("sample", x0, noise, T, ac)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight_formula(gamma):
    ac = _ddpm().alphas_cumprod.double()
    snr = ac[T] / (1 - ac[T])
    expect_eps = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    expect_v = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    ours = alphas_cumprod_from_config(SD_SCHEDULER)
    eps = min_snr_weight(T, ours, gamma, "epsilon")
    v = min_snr_weight(T, ours, gamma, "v_prediction")
    torch.testing.assert_close(eps.double(), expect_eps, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(v.double(), expect_v, rtol=1e-4, atol=1e-7)
    # sanity of the formula itself: epsilon weights are 1 where snr <= gamma (noisy end), below 1 at t=0
    assert eps[-1].item() == pytest.approx(1.0) and eps[0].item() < 0.01
    assert (v < 1).all()


def test_noise_offset_shifts_each_channel_by_a_constant():
    shape = torch.Size((64, 4, 16, 16))
    plain = sample_noise(shape, torch.Generator().manual_seed(5), 0.0)
    offset = sample_noise(shape, torch.Generator().manual_seed(5), 0.1)
    diff = offset - plain  # same first draw, then one value per (sample, channel)
    per_channel = diff.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(diff, per_channel.expand_as(diff))
    assert 0.07 < per_channel.std().item() < 0.13  # 0.1 * N(0, 1)
    # channel means: spread ~ 1/16 without offset, ~ sqrt(0.1^2 + 1/16^2) with it
    assert plain.mean(dim=(2, 3)).std().item() < 0.08
    assert offset.mean(dim=(2, 3)).std().item() > 0.1


# -------------------------------------------------------------------------------- plan and events


def test_step_events_follow_the_plan_with_batch_and_accumulation(tiny_sd, tiny_config):
    cfg = tiny_config
    cfg.train_batch_size, cfg.gradient_accumulation_steps = 2, 2
    cfg.text_encoder_lr = 5e-4
    images, repeats, epochs = 4, 2, cfg.max_train_epochs
    per_epoch = math.ceil(images * repeats / 2 / 2)  # images x repeats / batch / accumulation
    bundle = make_sd_bundle(tiny_sd)
    batch_sizes: list[int] = []
    orig = bundle.predict
    bundle.predict = lambda x, t, c: (batch_sizes.append(x.shape[0]), orig(x, t, c))[1]
    events, bus = _collect()
    result = train(cfg, bundle, bus)

    started = [e for e in events if isinstance(e, TrainingStarted)]
    assert len(started) == 1
    assert (started[0].total_steps, started[0].epochs, started[0].steps_per_epoch) == (per_epoch * epochs, epochs, per_epoch)
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == list(range(1, per_epoch * epochs + 1))
    assert {e.total_steps for e in steps} == {per_epoch * epochs}
    assert [e.epoch for e in steps] == [ep for ep in range(1, epochs + 1) for _ in range(per_epoch)]
    for e in steps:
        assert math.isfinite(e.loss) and e.loss > 0 and e.eta >= 0 and e.elapsed >= 0
        assert e.lrs == {"unet": pytest.approx(1e-3), "text_encoder": pytest.approx(5e-4)}
    assert steps[-1].eta == 0
    # every sample went through the model: 2 batches of 2 accumulated per optimizer step
    assert batch_sizes == [2] * (images * repeats // 2 * epochs)
    assert result.steps == per_epoch * epochs and len(result.losses) == result.steps
    finished = [e for e in events if isinstance(e, TrainingFinished)]
    assert finished and finished[0].steps == result.steps and not finished[0].stopped


def test_max_train_steps_stops_exactly_and_saves_the_final_file(tiny_sd, tiny_config):
    cfg = tiny_config
    cfg.max_train_epochs, cfg.max_train_steps = 10, 3  # 8 steps per epoch: stops inside epoch 1
    events, bus = _collect()
    result = train(cfg, make_sd_bundle(tiny_sd), bus)
    assert result.steps == 3
    assert [e.step for e in events if isinstance(e, StepEvent)] == [1, 2, 3]
    assert _names(result) == ["t.safetensors"] and _files_in(cfg) == ["t.safetensors"]
    with safe_open(result.files[0], "pt") as f:
        assert f.metadata()["ss_steps"] == "3"


def test_save_every_two_epochs(tiny_sd, tiny_config):
    cfg = tiny_config
    _set_repeats(cfg, 1)
    cfg.max_train_epochs, cfg.save_every_n_epochs = 3, 2
    events, bus = _collect()
    result = train(cfg, make_sd_bundle(tiny_sd), bus)
    assert _names(result) == ["t-000002.safetensors", "t.safetensors"]
    assert _files_in(cfg) == ["t-000002.safetensors", "t.safetensors"]
    saved = [(e.epoch, e.final) for e in events if isinstance(e, FileSaved)]
    assert saved == [(2, False), (3, True)]


# ------------------------------------------------------------------------------ training options


def test_v_prediction_trains_with_the_v_target(tiny_sd, tiny_config, monkeypatch):
    import lora_trainer.train.loop as loop

    seen: list[str] = []

    def spy(prediction_type, *a):
        seen.append(prediction_type)
        return target_for(prediction_type, *a)

    monkeypatch.setattr(loop, "target_for", spy)
    tiny_config.max_train_steps = 2
    result = train(tiny_config, make_sd_bundle(tiny_sd, prediction_type="v_prediction"))
    assert seen == ["v_prediction"] * 2
    assert all(math.isfinite(x) for x in result.losses)
    assert any(v.abs().max() > 0 for v in _ups(result.files[-1]).values())


def test_min_snr_gamma_and_noise_offset_change_the_result(tiny_sd, tiny_config, tmp_path):
    gamma = 1.0

    def run(name, **kw):
        cfg = copy.deepcopy(tiny_config)
        cfg.max_train_epochs = 1
        cfg.save_precision = "float"
        cfg.output_dir = str(tmp_path / name)
        for k, v in kw.items():
            setattr(cfg, k, v)
        bundle = make_sd_bundle(copy.deepcopy(tiny_sd))
        ts: list[int] = []
        orig = bundle.predict
        bundle.predict = lambda x, t, c: (ts.append(int(t[0])), orig(x, t, c))[1]
        return train(cfg, bundle), ts

    off, t_off = run("off")
    snr, t_snr = run("snr", min_snr_gamma=gamma)
    offset, _ = run("offset", noise_offset=0.1)
    assert t_off == t_snr  # same timesteps, only the weights differ
    # the first step is the same model on the same batch: its loss is weighted by min(snr, gamma) / snr
    ac = _ddpm().alphas_cumprod.double()
    s = (ac[t_off[0]] / (1 - ac[t_off[0]])).item()
    assert snr.losses[0] == pytest.approx(off.losses[0] * min(s, gamma) / s, rel=1e-4)
    assert any(ac[t] / (1 - ac[t]) > gamma for t in t_off), "no step was weighted: pick another seed"
    assert snr.losses != off.losses
    assert offset.losses[0] != pytest.approx(off.losses[0], rel=1e-6)
    base = load_file(off.files[-1])
    for other in (snr, offset):
        changed = load_file(other.files[-1])
        assert any(not torch.equal(base[k], changed[k]) for k in base)


def test_unet_only_has_no_text_encoder_keys(tiny_sd, tiny_config):
    tiny_config.train_text_encoder = False
    tiny_config.max_train_steps = 2
    te_before = copy.deepcopy(tiny_sd.text_encoder.state_dict())
    result = train(tiny_config, make_sd_bundle(tiny_sd))
    keys = list(load_file(result.files[-1]))
    assert keys and not any(k.startswith("lora_te") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys)
    assert all(torch.equal(v, tiny_sd.text_encoder.state_dict()[k]) for k, v in te_before.items())
    with safe_open(result.files[-1], "pt") as f:
        assert f.metadata()["ss_network_train_unet_only"] == "True"


def test_locon_adds_conv_keys(tiny_sd, tiny_config):
    def conv_downs(path):
        return {k: v for k, v in load_file(path).items() if k.endswith("lora_down.weight") and v.ndim == 4 and v.shape[2:] == (3, 3)}

    tiny_config.max_train_steps = 1
    standard = train(copy.deepcopy(tiny_config), make_sd_bundle(copy.deepcopy(tiny_sd)))
    assert conv_downs(standard.files[-1]) == {}
    tiny_config.network_type, tiny_config.conv_dim = "LoCon", 3
    tiny_config.output_name = "locon"
    locon = train(tiny_config, make_sd_bundle(tiny_sd))
    convs = conv_downs(locon.files[-1])
    assert convs and all(v.shape[0] == 3 for v in convs.values())
    assert all(k.startswith("lora_unet_") for k in convs)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in tiny_sd.unet.modules())
    assert len(convs) <= n_convs


# ---------------------------------------------------------------------------------- latent cache


def test_cache_on_and_off_give_the_same_weights(tiny_sd, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TRAINER_DETERMINISTIC", "1")
    cfg = tiny_config
    cfg.max_train_epochs = 1
    cfg.train_batch_size = 2  # uncached batches of 2, the cache encodes in groups of 4
    cached = train(cfg, make_sd_bundle(copy.deepcopy(tiny_sd)))
    cfg2 = copy.deepcopy(cfg)
    cfg2.cache_latents, cfg2.output_dir = False, str(tmp_path / "uncached")
    uncached = train(cfg2, make_sd_bundle(tiny_sd))
    assert uncached.losses == cached.losses
    assert _tensor_bytes(uncached.files[-1]) == _tensor_bytes(cached.files[-1])
    with safe_open(cached.files[-1], "pt") as a, safe_open(uncached.files[-1], "pt") as b:
        ma, mb = a.metadata(), b.metadata()
    assert {k for k in ma if ma[k] != mb.get(k)} == {"ss_cache_latents"}


def test_disk_cache_written_reused_and_invalidated(tiny_sd, tiny_config, tmp_path):
    from PIL import Image

    cfg = tiny_config
    cfg.cache_latents_to_disk = True
    cfg.max_train_steps = 1
    images = sorted(Path(cfg.train_data_dir).rglob("*.png"))
    caches = [img.with_name(img.stem + CACHE_SUFFIX) for img in images]
    assert CACHE_SUFFIX == ".lora_trainer.npz"

    def run(name, parts=tiny_sd, **kw):
        c = copy.deepcopy(cfg)
        c.output_dir = str(tmp_path / name)
        for k, v in kw.items():
            setattr(c, k, v)
        bundle = make_sd_bundle(parts)
        counter = _count_encoded(bundle)
        events, bus = _collect()
        train(c, bundle, bus)
        return counter[0], events, bundle

    n, _, bundle = run("first")
    assert n == len(images) == 4
    assert all(c.is_file() for c in caches)
    import numpy as np

    with np.load(caches[0]) as z:
        stored = torch.from_numpy(z["latents"])
    expected = encode_batch(bundle.encode_images, [images[0]], cfg.resolution, (255, 255, 255))[0]
    assert torch.equal(stored, expected)

    stamps = [c.read_bytes() for c in caches]
    n, events, _ = run("second")
    assert n == 0, "the second run must read every latent from disk"
    assert [c.read_bytes() for c in caches] == stamps
    assert not any(isinstance(e, Message) and ".npz" in e.text for e in events), "cache files reported as unused"

    # one image changes: exactly that one is encoded again
    img = Image.open(images[1]).convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))
    img.save(images[1])
    n, _, _ = run("image")
    assert n == 1
    assert [c.read_bytes() == s for c, s in zip(caches, stamps)] == [True, False, True, True]

    stamps = [c.read_bytes() for c in caches]
    n, _, _ = run("resolution", resolution=72)
    assert n == 4 and all(c.read_bytes() != s for c, s in zip(caches, stamps))

    # other VAE weights: a new vae_id, everything re-encoded
    n, _, _ = run("same-again", resolution=72)
    assert n == 0
    other = copy.deepcopy(tiny_sd)
    with torch.no_grad():
        next(other.vae.parameters()).add_(0.01)
    assert make_sd_bundle(other).vae_id != bundle.vae_id
    n, _, _ = run("vae", parts=other, resolution=72)
    assert n == 4


def test_cache_to_disk_implies_caching(tiny_sd, tiny_config):
    cfg = tiny_config
    cfg.cache_latents, cfg.cache_latents_to_disk = False, True
    cfg.max_train_steps = 1
    events, bus = _collect()
    train(cfg, make_sd_bundle(tiny_sd), bus)
    images = sorted(Path(cfg.train_data_dir).rglob("*.png"))
    assert all(img.with_name(img.stem + CACHE_SUFFIX).is_file() for img in images)
    assert any(isinstance(e, Message) and e.level == "warning" and "cache_latents_to_disk" in e.text for e in events)


# ------------------------------------------------------------------------------------ stopping


def _stop_in_epoch_2(stop: StopControl, save: bool):
    def listener(ev):
        if isinstance(ev, StepEvent) and ev.epoch == 2:
            stop.stop(save=save)

    return listener


def test_stop_discards_the_unfinished_epoch(tiny_sd, tiny_config):
    cfg = tiny_config
    per_epoch = _set_repeats(cfg, 1)
    cfg.max_train_epochs = 3
    stop = StopControl()
    events, bus = _collect()
    bus.subscribe(_stop_in_epoch_2(stop, save=False))
    result = train(cfg, make_sd_bundle(tiny_sd), bus, stop=stop)
    assert result.stopped and result.epochs_done == 1
    assert result.steps == per_epoch + 1  # the step during which stop was asked finishes, no more
    assert _names(result) == ["t-000001.safetensors"] and _files_in(cfg) == ["t-000001.safetensors"]
    finished = [e for e in events if isinstance(e, TrainingFinished)][0]
    assert finished.stopped and finished.files == [str(result.files[0])]
    assert _no_hooks(tiny_sd)


def test_stop_and_save_writes_the_final_file(tiny_sd, tiny_config):
    cfg = tiny_config
    per_epoch = _set_repeats(cfg, 1)
    cfg.max_train_epochs = 3
    stop = StopControl()
    bus = EventBus(_stop_in_epoch_2(stop, save=True))
    result = train(cfg, make_sd_bundle(tiny_sd), bus, stop=stop)
    assert result.stopped
    assert _names(result) == ["t-000001.safetensors", "t.safetensors"]
    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == str(per_epoch + 1) and meta["ss_epoch"] == "2"
    assert load_file(result.files[-1]).keys() == load_file(result.files[0]).keys()


def test_stop_after_the_last_step_of_an_epoch_keeps_that_epoch(tiny_sd, tiny_config, tmp_path):
    cfg = tiny_config
    per_epoch = _set_repeats(cfg, 1)
    cfg.max_train_epochs = 3

    def stop_at(step, save=False):
        stop = StopControl()
        bus = EventBus(lambda ev: isinstance(ev, StepEvent) and ev.step == step and stop.stop(save=save))
        return stop, bus

    stop, bus = stop_at(per_epoch)  # the last step of epoch 1: the epoch is complete
    result = train(cfg, make_sd_bundle(copy.deepcopy(tiny_sd)), bus, stop=stop)
    assert result.stopped and result.epochs_done == 1 and result.steps == per_epoch
    assert _names(result) == ["t-000001.safetensors"]

    # stop-and-save asked before the first step of epoch 2 ran: the file says epoch 1
    cfg.output_dir = str(tmp_path / "save")
    stop, bus = stop_at(per_epoch, save=True)
    result = train(cfg, make_sd_bundle(copy.deepcopy(tiny_sd)), bus, stop=stop)
    assert _names(result) == ["t-000001.safetensors", "t.safetensors"]
    with safe_open(result.files[-1], "pt") as f:
        assert f.metadata()["ss_epoch"] == "1" and f.metadata()["ss_steps"] == str(per_epoch)

    # a stop during the very last step comes too late to discard anything: the run ends normally
    cfg.output_dir = str(tmp_path / "late")
    stop, bus = stop_at(3 * per_epoch)
    result = train(cfg, make_sd_bundle(tiny_sd), bus, stop=stop)
    assert result.steps == 3 * per_epoch and result.epochs_done == 3
    assert _names(result)[-1] == "t.safetensors"


# ------------------------------------------------------------------------------- failure paths


def test_nan_loss_stops_with_advice_and_cleans_up(tiny_sd, tiny_config):
    bundle = make_sd_bundle(tiny_sd)
    orig = bundle.predict
    bundle.predict = lambda x, t, c: orig(x, t, c) * float("nan")
    flags = [p.requires_grad for p in tiny_sd.unet.parameters()]
    with pytest.raises(LoraTrainerError) as e:
        train(tiny_config, bundle)
    msg = str(e.value)
    assert "nan" in msg and "step 1" in msg and "learning rate" in msg
    assert _no_hooks(tiny_sd)
    assert [p.requires_grad for p in tiny_sd.unet.parameters()] == flags
    assert not Path(tiny_config.output_dir).exists() or _files_in(tiny_config) == []


def test_epoch_files_of_a_bracketed_name_are_never_overwritten(tiny_sd, tiny_config):
    cfg = tiny_config
    cfg.output_name = "ohwx [v2]"
    cfg.max_train_steps = 1
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    old = out / "ohwx [v2]-000001.safetensors"  # e.g. left by a stopped run (no final file)
    old.write_bytes(b"old")
    with pytest.raises(ConfigError, match=r"ohwx \[v2\]-000001.safetensors exists"):
        train(cfg, make_sd_bundle(tiny_sd))
    assert old.read_bytes() == b"old"
    assert _files_in(cfg) == [old.name]


def test_fp16_on_cpu_is_a_config_error(tiny_sd, tiny_config):
    tiny_config.mixed_precision = "fp16"
    with pytest.raises(ConfigError) as e:
        train(tiny_config, make_sd_bundle(tiny_sd))
    assert e.value.field == "mixed_precision" and "bf16" in str(e.value) and "no" in str(e.value)
    assert not Path(tiny_config.output_dir).exists()


def test_bf16_mixed_precision_on_cpu(tiny_sd, tiny_config):
    from lora_trainer.train.runtime import Runtime

    tiny_config.mixed_precision = "bf16"
    tiny_config.max_train_steps = 2
    runtime = Runtime(torch.device("cpu"), "bf16")
    bundle = make_sd_bundle(tiny_sd, dtype=runtime.weight_dtype)  # as the standalone host does
    dtypes: list[torch.dtype] = []
    orig = bundle.predict
    bundle.predict = lambda x, t, c: (lambda out: (dtypes.append(out.dtype), out)[1])(orig(x, t, c))
    result = train(tiny_config, bundle, runtime=runtime)
    assert dtypes == [torch.bfloat16] * 2
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    assert any(v.abs().max() > 0 for v in _ups(result.files[-1]).values())


def test_failing_listener_does_not_stop_training(tiny_sd, tiny_config):
    calls = [0]

    def broken(ev):
        calls[0] += 1
        raise RuntimeError("progress bar broke")

    events: list = []
    tiny_config.max_train_steps = 3
    result = train(tiny_config, make_sd_bundle(tiny_sd), EventBus(broken, events.append))
    assert result.steps == 3 and _names(result) == ["t.safetensors"]
    assert calls[0] == 1  # reported once, then removed
    assert [e.step for e in events if isinstance(e, StepEvent)] == [1, 2, 3]


# ---------------------------------------------------------------------------------- optimizers

OPTIMIZER_CASES = [
    ("AdamW", 1e-3, None),
    ("AdamW8bit", 1e-3, "bitsandbytes"),
    ("Adafactor", 1e-3, "transformers"),
    ("DAdaptAdam", 1.0, "dadaptation"),
    ("Prodigy", 1.0, "prodigyopt"),
    ("Lion", 1e-4, "lion_pytorch"),
]


@pytest.mark.parametrize("name, lr, package", OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES])
def test_each_optimizer_trains(tiny_sd, tiny_config, name, lr, package):
    if package:
        pytest.importorskip(package)
    cfg = tiny_config
    cfg.optimizer = name
    cfg.learning_rate = cfg.unet_lr = cfg.text_encoder_lr = lr
    cfg.max_train_steps = 2
    cfg.save_precision = "float"
    result = train(cfg, make_sd_bundle(tiny_sd))
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    ups = _ups(result.files[-1])
    assert any(v.abs().max() > 0 for k, v in ups.items() if k.startswith("lora_unet_")), "UNet LoRA did not move"
    assert any(v.abs().max() > 0 for k, v in ups.items() if k.startswith("lora_te_")), "text-encoder LoRA did not move"
    assert all(torch.isfinite(v).all() for v in ups.values())


# ------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize(
    "device,tol",
    [
        ("cpu", 1e-5),
        pytest.param("cuda", 1e-4, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    ],
)
def test_gradient_checkpointing_same_losses_and_really_on(tiny_sd, tiny_config, tmp_path, device, tol):
    from lora_trainer.train.runtime import Runtime

    def run(on: bool):
        cfg = copy.deepcopy(tiny_config)
        cfg.gradient_checkpointing = on
        cfg.max_train_steps = 3
        cfg.save_precision = "float"
        cfg.output_dir = str(tmp_path / str(on))
        parts = copy.deepcopy(tiny_sd)
        calls = [0]
        # a pre-hook: the recomputation may stop early, before a forward hook would fire
        parts.unet.up_blocks[0].resnets[0].register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        result = train(cfg, make_sd_bundle(parts, device=device), runtime=Runtime(torch.device(device), "no"))
        assert not parts.unet.is_gradient_checkpointing  # switched off again afterwards
        return result, calls[0]

    off, calls_off = run(False)
    on, calls_on = run(True)
    assert calls_off == 3 and calls_on == 6  # recomputed in the backward pass
    assert on.losses == pytest.approx(off.losses, rel=tol)
    a, b = load_file(off.files[-1]), load_file(on.files[-1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol / 10, rtol=tol)


def test_stop_while_caching_latents_ends_without_files(tiny_sd, tiny_config):
    from lora_trainer.train.events import EventBus, StopControl

    stop = StopControl()
    seen = []

    def listener(ev):
        seen.append(type(ev).__name__)
        if isinstance(ev, CachingProgress) and ev.done > 0:
            stop.stop()

    result = train(tiny_config, make_sd_bundle(tiny_sd), EventBus(listener), stop)
    assert result.stopped and result.steps == 0 and result.files == []
    assert "StepEvent" not in seen and _no_hooks(tiny_sd)


def test_metadata_counts_batches_per_epoch(tiny_sd, tiny_config):
    tiny_config.train_batch_size = 3  # 8 samples -> 3 batches per epoch
    tiny_config.max_train_epochs = 1
    result = train(tiny_config, make_sd_bundle(tiny_sd))
    with safe_open(result.files[-1], "pt") as f:
        assert f.metadata()["ss_num_batches_per_epoch"] == "3"
