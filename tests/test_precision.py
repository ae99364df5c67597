"""Mixed precision on every torch a supported host ships (A1111 1.10: torch 2.1.2, Forge: 2.3.1, standalone:
current): the fp16 loss scaler, bf16 autocast, half-precision base weights under float32 LoRA weights.

tools/test.sh runs this file under each host's pins. On a CPU each test runs what the installed torch can do
there (torch 2.1 has neither fp16 CPU kernels nor a CPU loss scaler); tests/test_cuda.py runs the same paths
on a GPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.train.loop import train
from lora_trainer.train.runtime import Runtime, grad_scaler


def _cpu_fp16_works() -> bool:
    """fp16 kernels and autocast on the CPU (torch 2.3 and later, roughly) and a CPU loss scaler."""
    if not hasattr(torch.amp, "GradScaler"):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch < 2.x disables fp16 CPU autocast with a warning
            with torch.autocast("cpu", dtype=torch.float16):
                torch.nn.Linear(4, 4).half()(torch.ones(1, 4, dtype=torch.float16)).sum()
        return True
    except (RuntimeError, UserWarning):
        return False


def test_an_fp16_runtime_builds_its_loss_scaler_on_every_supported_torch():
    """Inside A1111 (torch 2.1.2) an fp16 UNet on CUDA means fp16 training with a loss scaler; the scaler's
    class moved between torch versions. Building it needs no GPU (torch disables it, with a warning, when
    CUDA is absent), and a step goes through it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GradScaler is enabled, but CUDA is not available"
        runtime = Runtime(torch.device("cuda"), "fp16")
    assert runtime.scaler is not None and runtime.weight_dtype == torch.float16
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.5)
    runtime.backward((p * 2).sum())
    runtime.step(opt, [p], max_grad_norm=0.0)
    assert torch.equal(p.detach(), torch.zeros(3))


@pytest.mark.skipif(hasattr(torch.amp, "GradScaler"), reason="this torch has a loss scaler for every device")
def test_fp16_on_a_cpu_with_an_old_torch_is_refused_by_name():
    from lora_trainer.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        grad_scaler(torch.device("cpu"))
    assert e.value.field == "mixed_precision" and "bf16" in str(e.value)


def _fp16_cpu_runtime() -> Runtime:
    """A CPU runtime in fp16 with a live loss scaler. Users are refused fp16 on a CPU (it is slow and kohya
    refuses it too); the tests use it to run the scaler's code path without a GPU."""
    runtime = Runtime(torch.device("cpu"), "bf16")
    runtime.mixed_precision = "fp16"
    runtime.scaler = grad_scaler(torch.device("cpu"))
    return runtime


def record_scaler_steps(runtime: Runtime) -> list[float]:
    """The loss scale at each ``scaler.step`` call, recorded as the run goes."""
    steps: list[float] = []
    scaler_step = runtime.scaler.step
    runtime.scaler.step = lambda opt, *a, **k: (steps.append(runtime.scaler.get_scale()), scaler_step(opt, *a, **k))[1]
    return steps


def learned_direction_cosine(got_file, want_file) -> float:
    """Cosine between the ``lora_up`` weights of two LoRA files (same keys), as one vector.

    Adam moves each weight by about lr a step whatever the gradient's size, so a tiny gradient that half
    precision rounds to the other sign flips a weight: compare the learned direction as a whole."""
    got, want = load_file(str(got_file)), load_file(str(want_file))
    ups = [k for k in want if k.endswith("lora_up.weight")]
    assert ups and got.keys() == want.keys()
    g = torch.cat([got[k].float().flatten() for k in ups])
    w = torch.cat([want[k].float().flatten() for k in ups])
    assert g.abs().max() > 0, "the LoRA learned nothing"
    cosine = torch.nn.functional.cosine_similarity(g, w, dim=0).item()
    print(f"LoRA vs reference: cosine {cosine:.5f}, max diff {(g - w).abs().max().item():.2e}")
    return cosine


def train_on_half_base_weights(parts, cfg, runtime: Runtime, dtype: torch.dtype, device: str = "cpu"):
    """Train on base weights kept in ``dtype`` (as the hosts keep them); returns the result and the dtypes the
    LoRA's own weights had at each save."""
    from lora_trainer.train.events import EventBus

    lora_dtypes: set[torch.dtype] = set()
    bundle = make_sd_bundle(parts, device=device, dtype=dtype)
    result = train(cfg, bundle, EventBus(), runtime=runtime, after_save=lambda path, network: lora_dtypes.update(p.dtype for p in network.parameters()))
    return result, lora_dtypes


@pytest.mark.skipif(not _cpu_fp16_works(), reason=f"torch {torch.__version__} has no fp16 CPU kernels or CPU loss scaler")
def test_fp16_training_with_the_loss_scaler_learns_what_fp32_learns(tiny_sd, tiny_config):
    """fp16 base weights, fp16 autocast, scaled losses: the LoRA stays float32, every step is taken (none
    skipped for overflow), and the learned weights are those of a float32 run up to fp16 rounding."""
    import copy

    tiny_config.max_train_steps = 3
    tiny_config.train_text_encoder = False
    reference = train(copy.deepcopy(tiny_config), make_sd_bundle(copy.deepcopy(tiny_sd)))

    runtime = _fp16_cpu_runtime()
    steps = record_scaler_steps(runtime)
    tiny_config.output_dir += "-fp16"
    bundle = make_sd_bundle(tiny_sd, dtype=torch.float16)
    result = train(tiny_config, bundle, runtime=runtime)
    assert len(steps) == 3 and all(s > 1 for s in steps)  # the losses were scaled
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    assert runtime.scaler.get_scale() == steps[0]  # no step found inf/nan gradients (that halves the scale)
    assert learned_direction_cosine(result.files[-1], reference.files[-1]) > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_weights_train_float32_lora_weights(tiny_sd, tiny_config, dtype):
    """The hosts keep their weights in half precision; the LoRA's own weights (and so the optimizer state)
    stay float32, and the forward runs under autocast in the host's dtype."""
    if dtype == torch.float16 and not _cpu_fp16_works():
        pytest.skip(f"torch {torch.__version__} has no fp16 CPU kernels")
    runtime = Runtime(torch.device("cpu"), "bf16") if dtype == torch.bfloat16 else _fp16_cpu_runtime()
    tiny_config.max_train_steps = 2
    result, lora_dtypes = train_on_half_base_weights(tiny_sd, tiny_config, runtime, dtype)
    assert lora_dtypes == {torch.float32}
    assert next(tiny_sd.unet.parameters()).dtype == dtype  # the base weights stayed as the host has them
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
