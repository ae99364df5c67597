"""What only a CUDA GPU can check: the fp16 loss scaler and bf16 autocast on the device they are for, half-precision
base weights under float32 LoRA weights, xformers, and the A1111 adapter on real ``ldm`` modules in half precision
(with and without --medvram moving them between the CPU and the GPU). Gradient checkpointing on CUDA is the
``cuda`` case of tests/test_loop.py's checkpointing test.

Every test here is skipped without a GPU (CI has none); ``benchmarks/gpu_check.sh`` runs this file on a lent GPU.
tests/test_precision.py runs the same paths on a CPU; its helpers are shared here."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import test_host_a1111 as fake
import torch
from test_precision import learned_direction_cosine, record_scaler_steps, train_on_half_base_weights

from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.train.loop import train
from lora_trainer.train.runtime import Runtime

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False); run benchmarks/gpu_check.sh on one"
)

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def _a1111_master(tmp_path_factory):
    return fake.build_fake_sd_model(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def a1111_env(monkeypatch, tmp_path, _a1111_master):
    """tests/test_host_a1111.py's fake A1111 holding a fresh copy of the SD1 model (ldm UNet, HF CLIP, KL VAE)."""
    return fake.fake_host_env(monkeypatch, tmp_path, _a1111_master, "cond_stage_model")


@pytest.fixture(autouse=True)
def _deterministic_cudnn(monkeypatch):
    """The host checks compare outputs bit for bit before and after training: cuDNN must pick the same kernels."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def _fp32_reference(parts, cfg):
    """The same run in float32 on the GPU, into its own folder."""
    cfg = copy.deepcopy(cfg)
    cfg.output_dir += "-fp32"
    return train(cfg, make_sd_bundle(copy.deepcopy(parts), device=CUDA), runtime=Runtime(CUDA, "no"))


def _finite(result, steps: int) -> bool:
    return result.steps == steps and len(result.losses) > 0 and all(math.isfinite(x) for x in result.losses)


# --------------------------------------------------------------------------- mixed precision


def test_fp16_with_the_loss_scaler_learns_what_fp32_learns(tiny_sd, tiny_config):
    """fp16 base weights, fp16 autocast, scaled losses, on the device the scaler is for: every step is taken with
    a scaled loss (none skipped for inf/nan gradients), and the LoRA learns the direction a float32 run learns."""
    tiny_config.max_train_steps = 3
    reference = _fp32_reference(tiny_sd, tiny_config)
    runtime = Runtime(CUDA, "fp16")
    steps = record_scaler_steps(runtime)
    result, lora_dtypes = train_on_half_base_weights(tiny_sd, tiny_config, runtime, torch.float16, device="cuda")
    assert _finite(result, 3) and lora_dtypes == {torch.float32}
    assert len(steps) == 3 and all(s > 1 for s in steps)  # the losses were scaled
    assert runtime.scaler.get_scale() == steps[0]  # no step found inf/nan gradients (that halves the scale)
    assert next(tiny_sd.unet.parameters()).dtype == torch.float16
    assert learned_direction_cosine(result.files[-1], reference.files[-1]) > 0.99


def test_bf16_autocast_on_float32_weights_learns_what_fp32_learns(tiny_sd, tiny_config):
    """bf16 autocast over float32 base weights (the standalone trainer's bf16): no scaler, float32 LoRA weights,
    and the learned direction of a float32 run (bf16 keeps 8 bits of mantissa: a looser bound than fp16's)."""
    tiny_config.max_train_steps = 3
    reference = _fp32_reference(tiny_sd, tiny_config)
    runtime = Runtime(CUDA, "bf16")
    assert runtime.scaler is None
    result, lora_dtypes = train_on_half_base_weights(tiny_sd, tiny_config, runtime, torch.float32, device="cuda")
    assert _finite(result, 3) and lora_dtypes == {torch.float32}
    assert learned_direction_cosine(result.files[-1], reference.files[-1]) > 0.9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_weights_stay_half_and_the_lora_float32(tiny_sd, tiny_config, dtype):
    """The hosts keep their weights in half precision on the GPU: the LoRA's weights (and so the optimizer state)
    are float32, the base weights stay as the host has them, and the run's losses are finite."""
    tiny_config.max_train_steps = 2
    runtime = Runtime(CUDA, "fp16" if dtype == torch.float16 else "bf16")
    result, lora_dtypes = train_on_half_base_weights(tiny_sd, tiny_config, runtime, dtype, device="cuda")
    assert _finite(result, 2) and lora_dtypes == {torch.float32}
    for module in (tiny_sd.unet, tiny_sd.text_encoder):
        assert {p.dtype for p in module.parameters()} == {dtype}
        assert next(module.parameters()).device.type == "cuda"


# --------------------------------------------------------------------------- attention, checkpointing


def test_xformers_attention_is_used_and_trains_as_sdpa(tiny_sd, tiny_config, monkeypatch):
    """attention = xformers goes through xformers' kernel (counted), and the run's losses are SDPA's up to the
    kernels' rounding."""
    pytest.importorskip("xformers.ops", reason="xformers is not installed (carry a wheel in .whl/ to test it)")
    import xformers.ops

    tiny_config.max_train_steps = 3
    sdpa = _fp32_reference(tiny_sd, tiny_config)
    calls = [0]
    kernel = xformers.ops.memory_efficient_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(xformers.ops, "memory_efficient_attention", counted)
    tiny_config.attention = "xformers"
    result = train(tiny_config, make_sd_bundle(tiny_sd, device=CUDA), runtime=Runtime(CUDA, "no"))
    assert _finite(result, 3) and calls[0] > 0
    assert result.losses == pytest.approx(sdpa.losses, rel=1e-3, abs=1e-5)


def _as_a1111_loads(sd) -> None:
    """What A1111 does to a loaded model without --no-half: the weights in fp16, except ``alphas_cumprod``, which
    it keeps in float32 (the noise schedule in fp16 shifts every timestep's noise level)."""
    alphas = sd.alphas_cumprod
    sd.half()
    sd.alphas_cumprod = alphas
    sd.to(CUDA)


@pytest.fixture
def cuda_probe(monkeypatch):
    """The fake host's probe inputs (a latent, a timestep), where and as A1111 would compute them."""
    monkeypatch.setattr(fake, "PROBE_X", fake.PROBE_X.to(CUDA, torch.float16))
    monkeypatch.setattr(fake, "PROBE_T", fake.PROBE_T.to(CUDA))


def _autocast():
    """A1111 computes under torch.autocast in its dtype (devices.autocast)."""
    return torch.autocast("cuda", dtype=torch.float16)


def test_a1111_fp16_on_cuda_trains_and_leaves_the_host_as_it_was(a1111_env, tiny_config, cuda_probe, monkeypatch):
    """The A1111 adapter on real ldm modules held in fp16 on the GPU: the run computes in fp16 with the loss
    scaler, every adapter learns with finite weights, and the host's weights, flags, hooks and
    outputs are bit for bit as before."""
    from lora_trainer.hosts import a1111
    from lora_trainer.train.events import EventBus, StopControl

    sd = a1111_env.sd
    _as_a1111_loads(sd)
    with _autocast():
        before = fake._snapshot(sd)
    runtimes: list[Runtime] = []
    monkeypatch.setattr(a1111, "Runtime", lambda *a, **k: runtimes.append(Runtime(*a, **k)) or runtimes[-1])
    a1111.A1111Host().run(tiny_config, EventBus(), StopControl())

    # the config asks for no mixed precision: the fp16 weights decide, and fp16 needs the scaler
    assert tiny_config.mixed_precision == "no" and len(runtimes) == 1
    assert runtimes[0].device.type == "cuda" and runtimes[0].mixed_precision == "fp16"
    assert runtimes[0].scaler is not None and runtimes[0].scaler.get_scale() > 1
    tensors, _ = fake._file(a1111_env.lora_dir / "t.safetensors")
    dead = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.float().abs().sum() > 0]
    assert not dead, f"no gradient reached {dead[:3]}"
    assert all(torch.isfinite(v).all() for v in tensors.values())
    with _autocast():
        after = fake._snapshot(sd)
    fake._assert_host_unchanged(before, after)
    assert next(sd.model.diffusion_model.parameters()).dtype == torch.float16
    assert sd.alphas_cumprod.dtype == torch.float32


class CudaLowVram(fake.FakeLowVram):
    """A1111's --medvram for real: a part that is out is on the CPU, one that is in is on the GPU."""

    def to_cpu(self, module: torch.nn.Module) -> None:
        self.moves.append(("cpu", type(module).__name__))
        module.to("cpu")

    def to_gpu(self, module: torch.nn.Module) -> None:
        self.moves.append(("gpu", type(module).__name__))
        module.to(CUDA)

    def is_out(self, module: torch.nn.Module) -> bool:
        return any(t.device.type == "cpu" for t in self._tensors(module))

    def real(self, t: torch.Tensor) -> torch.Tensor:
        return t.data.cpu()


def test_a1111_medvram_fp16_on_cuda_trains_and_gives_the_placement_back(a1111_env, tiny_config, cuda_probe, monkeypatch):
    """--medvram with real moves between the CPU and the GPU, weights in fp16: the UNet is on the GPU at every
    step, every adapter learns, and afterwards the parts are where they were and a generation gives the same
    numbers."""
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import EventBus, StepEvent, StopControl

    sd = a1111_env.sd
    _as_a1111_loads(sd)
    monkeypatch.setattr(fake, "FakeLowVram", CudaLowVram)
    a1111_env.lv = fake.install_fake_lowvram(monkeypatch, a1111_env)
    sys.modules["modules.devices"].device = CUDA  # setup_for_low_vram left the rest of the model there
    lv, moves = a1111_env.lv.lowvram, a1111_env.lv.fake
    with _autocast():
        generated = fake._host_generation(sd)
        sd.cond_stage_model([""])  # as A1111 after loading a model: the text encoder is in
    assert torch.isfinite(generated).all()
    before = fake._placement(sd, a1111_env.lv)
    assert before["out"] == {"vae": True, "unet": True, "text": False}
    unet_in: list[bool] = []

    def listener(ev):
        if isinstance(ev, StepEvent):
            unet_in.append(not moves.is_out(sd.model))

    A1111Host().run(tiny_config, EventBus(listener), StopControl())

    assert unet_in and all(unet_in)
    tensors, _ = fake._file(a1111_env.lora_dir / "t.safetensors")
    dead = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and not v.float().abs().sum() > 0]
    assert not dead, f"no gradient reached {dead[:3]}"
    fake._assert_placement_as_before(before, fake._placement(sd, a1111_env.lv))
    assert lv.module_in_gpu is before["module_in_gpu"]
    with _autocast():
        assert torch.equal(fake._host_generation(sd), generated), "a generation gives the same numbers as before training"
