"""Optimizers and learning-rate schedules (lora_trainer.train.optim / .schedulers)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from lora_trainer.errors import ConfigError, MissingPackageError
from lora_trainer.train.optim import (
    build_optimizer,
    canonical_optimizer_name,
    current_lrs,
    optimizer_is_adaptive,
    optimizer_notes,
)
from lora_trainer.train.schedulers import (
    build_scheduler,
    lr_lambda,
    resolve_warmup_steps,
)

# optimizer name -> (import name of its optional package, a sensible lr)
OPTIMIZERS = {
    "AdamW": (None, 1e-2),
    "AdamW8bit": ("bitsandbytes", 1e-2),
    "Adafactor": ("transformers", 1e-2),
    "DAdaptAdam": ("dadaptation", 1.0),
    "Prodigy": ("prodigyopt", 1.0),
    "Lion": ("lion_pytorch", 1e-2),
}


def _two_groups(unet_lr: float = 1e-2, te_lr: float = 5e-3) -> tuple[nn.Module, nn.Module, list[dict]]:
    torch.manual_seed(0)
    unet, te = nn.Linear(8, 4), nn.Linear(8, 4)
    groups = [
        {"params": list(unet.parameters()), "lr": unet_lr},
        {"params": list(te.parameters()), "lr": te_lr},
    ]
    return unet, te, groups


def _step(opt: torch.optim.Optimizer, *modules: nn.Module) -> None:
    torch.manual_seed(1)
    x = torch.randn(16, 8)
    loss = sum((m(x) ** 2).mean() for m in modules)
    opt.zero_grad()
    loss.backward()
    opt.step()


# ------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_steps_and_keeps_group_lrs(name: str) -> None:
    package, lr = OPTIMIZERS[name]
    if package:
        pytest.importorskip(package)
    unet, te, groups = _two_groups(lr, lr / 2)
    before = [p.detach().clone() for p in [*unet.parameters(), *te.parameters()]]
    opt = build_optimizer(name, groups, "", lr)
    # D-Adaptation / Prodigy refuse different non-zero group lrs at step time: the first one is used
    expected = [lr, lr] if name in ("DAdaptAdam", "Prodigy") else [lr, lr / 2]
    assert [g["lr"] for g in opt.param_groups] == expected
    _step(opt, unet, te)
    after = [*unet.parameters(), *te.parameters()]
    assert all(not torch.equal(b, a) for b, a in zip(before, after)), name
    lrs = current_lrs(opt)
    assert len(lrs) == 2 and all(x > 0 for x in lrs)


def test_case_insensitive_name_and_unknown_name() -> None:
    assert canonical_optimizer_name("adamw8bit") == "AdamW8bit"
    _, _, groups = _two_groups()
    with pytest.raises(ConfigError) as e:
        build_optimizer("SGDish", groups, "", 1e-3)
    assert e.value.field == "optimizer" and "AdamW" in str(e.value)


def test_adamw_args_are_parsed_and_applied() -> None:
    _, _, groups = _two_groups()
    opt = build_optimizer("AdamW", groups, "weight_decay=0.05 betas=0.8,0.95 eps=1e-6 amsgrad=True", 1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.95)
        assert g["weight_decay"] == 0.05
        assert g["eps"] == 1e-6
        assert g["amsgrad"] is True
    # the same as a dict
    _, _, groups = _two_groups()
    opt = build_optimizer("AdamW", groups, {"weight_decay": 0.2}, 1e-3)
    assert opt.param_groups[0]["weight_decay"] == 0.2


def test_group_without_lr_uses_default_and_input_is_not_mutated() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    groups = [{"params": a.parameters()}, {"params": list(b.parameters()), "lr": 3e-4}]
    snapshot = [dict(g) for g in groups]
    opt = build_optimizer("AdamW", groups, "", 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 3e-4]
    assert groups[1] == snapshot[1] and "lr" not in groups[0]


def test_empty_groups() -> None:
    with pytest.raises(ValueError):
        build_optimizer("AdamW", [{"params": [], "lr": 1e-3}], "", 1e-3)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unknown_argument_is_named(name: str) -> None:
    package, lr = OPTIMIZERS[name]
    if package:
        pytest.importorskip(package)
    _, _, groups = _two_groups()
    with pytest.raises(ConfigError) as e:
        build_optimizer(name, groups, "weight_decay=0.01 bogus_option=3", lr)
    assert e.value.field == "optimizer_args"
    assert "bogus_option" in str(e.value)
    assert "weight_decay" in e.value.allowed  # the accepted keywords are listed


def test_lr_in_args_is_refused() -> None:
    _, _, groups = _two_groups()
    with pytest.raises(ConfigError) as e:
        build_optimizer("AdamW", groups, "lr=0.1", 1e-3)
    assert "learning_rate" in e.value.allowed


def test_bad_value_becomes_config_error() -> None:
    _, _, groups = _two_groups()
    with pytest.raises(ConfigError) as e:
        build_optimizer("AdamW", groups, "betas=2.0,0.999", 1e-3)
    assert e.value.field == "optimizer_args" and "betas" in str(e.value)


def test_malformed_args_string() -> None:
    _, _, groups = _two_groups()
    with pytest.raises(ConfigError):
        build_optimizer("AdamW", groups, "weight_decay", 1e-3)


@pytest.mark.parametrize(
    ("name", "module", "pip_name"),
    [
        ("AdamW8bit", "bitsandbytes", "bitsandbytes"),
        ("DAdaptAdam", "dadaptation", "dadaptation"),
        ("Prodigy", "prodigyopt", "prodigyopt"),
        ("Lion", "lion_pytorch", "lion-pytorch"),
        ("Adafactor", "transformers", "transformers"),
    ],
)
def test_missing_package(monkeypatch: pytest.MonkeyPatch, name: str, module: str, pip_name: str) -> None:
    for mod in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, module, None)
    _, _, groups = _two_groups()
    with pytest.raises(MissingPackageError) as e:
        build_optimizer(name, groups, "", 1.0)
    assert e.value.package == module
    assert f"pip install {pip_name}" in str(e.value)
    assert name in str(e.value)


# ------------------------------------------------------------------ Adafactor
def test_adafactor_defaults_fixed_lr() -> None:
    pytest.importorskip("transformers")
    unet, te, groups = _two_groups(1e-2, 4e-3)
    opt = build_optimizer("Adafactor", groups, "", 1e-2)
    g = opt.param_groups
    assert [x["lr"] for x in g] == [1e-2, 4e-3]
    assert not g[0]["relative_step"] and not g[0]["scale_parameter"] and not g[0]["warmup_init"]
    assert not optimizer_is_adaptive("Adafactor", "")
    _step(opt, unet, te)
    assert current_lrs(opt) == [1e-2, 4e-3]


@pytest.mark.parametrize("args", ["relative_step=True", "warmup_init=True", "relative_step=True scale_parameter=True"])
def test_adafactor_relative_step(args: str) -> None:
    pytest.importorskip("transformers")
    unet, te, groups = _two_groups(1e-4, 5e-5)
    before = unet.weight.detach().clone()
    opt = build_optimizer("Adafactor", groups, args, 1e-4)  # no "Cannot combine manual lr" error
    assert opt.defaults["lr"] is None and opt.param_groups[0]["relative_step"] is True
    assert optimizer_is_adaptive("Adafactor", args)
    sched = build_scheduler("cosine", opt, total_steps=10, warmup_steps=2)
    for _ in range(3):
        _step(opt, unet, te)
        sched.step()
    assert not torch.equal(before, unet.weight)
    lrs = current_lrs(opt)
    # the real relative step (min(1e-2, 1/sqrt(step)) or 1e-6 * step with warmup_init), not unet_lr
    assert all(x > 0 for x in lrs) and lrs[0] != 1e-4
    if "warmup_init" in args and "scale_parameter" not in args:
        assert lrs[0] == pytest.approx(3e-6)
    # a group without "lr" still gets a number, so any LambdaLR works
    opt = build_optimizer("Adafactor", [{"params": list(nn.Linear(2, 2).parameters())}], args, 1e-4)
    assert opt.param_groups[0]["lr"] == 1e-4
    assert build_scheduler("linear", opt, total_steps=10, warmup_steps=0).get_last_lr() == [1e-4]


# ------------------------------------------------------------------ adaptive optimizers
def test_adaptive_flags_and_notes(caplog: pytest.LogCaptureFixture) -> None:
    assert optimizer_is_adaptive("DAdaptAdam", "")
    assert optimizer_is_adaptive("Prodigy", {"decouple": True})
    assert not optimizer_is_adaptive("AdamW", "")
    assert not optimizer_is_adaptive("Lion", None)
    assert optimizer_notes("DAdaptAdam", [1e-4], "")
    assert not optimizer_notes("Prodigy", [1.0, 1.0], "")
    assert not optimizer_notes("AdamW", [1e-4], "")
    pytest.importorskip("dadaptation")
    _, _, groups = _two_groups(1e-4, 1e-4)
    with caplog.at_level(logging.WARNING, logger="lora_trainer.train.optim"):
        build_optimizer("DAdaptAdam", groups, "decouple=True weight_decay=0.01", 1e-4)
    assert "around 1.0" in caplog.text


@pytest.mark.parametrize("name", ["DAdaptAdam", "Prodigy"])
def test_current_lrs_reports_d_times_lr(name: str) -> None:
    pytest.importorskip(OPTIMIZERS[name][0])
    unet, te, groups = _two_groups(1.0, 1.0)
    opt = build_optimizer(name, groups, "", 1.0)
    for _ in range(3):
        _step(opt, unet, te)
    lrs = current_lrs(opt)
    assert lrs == [g["d"] * g["lr"] for g in opt.param_groups]
    assert lrs[0] > 0 and lrs[0] != 1.0  # d has moved away from d0 * lr


@pytest.mark.parametrize("name", ["DAdaptAdam", "Prodigy"])
def test_adaptive_optimizers_unify_group_lrs(name: str, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip(OPTIMIZERS[name][0])
    unet, te, groups = _two_groups(1.0, 0.5)
    with caplog.at_level(logging.WARNING, logger="lora_trainer.train.optim"):
        opt = build_optimizer(name, groups, "", 1e-4)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]
    assert "only the first one" in caplog.text
    _step(opt, unet, te)  # would raise RuntimeError with 1.0 / 0.5
    # a frozen (lr 0) group stays frozen
    unet, te, groups = _two_groups(1.0, 0.0)
    te_before = te.weight.detach().clone()
    opt = build_optimizer(name, groups, "", 1.0)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.0]
    _step(opt, unet, te)
    assert torch.equal(te_before, te.weight)


def test_prodigy_and_lion_args() -> None:
    pytest.importorskip("prodigyopt")
    pytest.importorskip("lion_pytorch")
    _, _, groups = _two_groups(1.0, 1.0)
    opt = build_optimizer("Prodigy", groups, "decouple=True weight_decay=0.01 use_bias_correction=True d_coef=2", 1.0)
    assert opt.param_groups[0]["d_coef"] == 2 and opt.param_groups[0]["use_bias_correction"] is True
    _, _, groups = _two_groups()
    opt = build_optimizer("Lion", groups, "betas=0.95,0.98 weight_decay=0.1", 1e-4)
    assert opt.param_groups[1]["betas"] == (0.95, 0.98) and opt.param_groups[1]["weight_decay"] == 0.1


# ------------------------------------------------------------------ schedulers
def _opt(lrs: tuple[float, ...] = (1e-3,), default_lr: float | None = None) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=default_lr if default_lr is not None else lrs[0])


def _trace(sched: torch.optim.lr_scheduler.LRScheduler, opt: torch.optim.Optimizer, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


CASES = [
    # name, total, warmup (steps), cycles, power
    ("constant", 50, 0, 1, 1.0),
    ("constant_with_warmup", 50, 7, 1, 1.0),
    ("linear", 50, 0, 1, 1.0),
    ("linear", 40, 10, 1, 1.0),
    ("cosine", 50, 0, 1, 1.0),
    ("cosine", 37, 5, 3, 1.0),
    ("cosine_with_restarts", 60, 0, 3, 1.0),
    ("cosine_with_restarts", 61, 6, 3, 1.0),
    ("cosine_with_restarts", 30, 3, 1, 1.0),
    ("polynomial", 50, 0, 1, 1.0),
    ("polynomial", 50, 5, 1, 2.0),
    ("polynomial", 33, 4, 1, 0.5),
]


@pytest.mark.parametrize(("name", "total", "warmup", "cycles", "power"), CASES)
def test_schedules_match_diffusers(name: str, total: int, warmup: int, cycles: int, power: float) -> None:
    opt_mod = pytest.importorskip("diffusers.optimization")
    ours_opt, ref_opt = _opt(), _opt()
    ours = build_scheduler(name, ours_opt, total_steps=total, warmup_steps=warmup, num_cycles=cycles, power=power)
    ref = opt_mod.get_scheduler(
        name, ref_opt, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles, power=power
    )
    steps = total + 10  # past the end too
    a, b = _trace(ours, ours_opt, steps), _trace(ref, ref_opt, steps)
    for step, (x, y) in enumerate(zip(a, b)):
        # compare multipliers (lr / base lr) to 1e-6 at every step
        assert x[0] / 1e-3 == pytest.approx(y[0] / 1e-3, abs=1e-6), (name, step)
        assert lr_lambda(name, step, total, warmup, cycles, power, lr_init=1e-3) == pytest.approx(
            y[0] / 1e-3, abs=1e-6
        )


def test_cosine_with_hard_restarts_three_cycles() -> None:
    opt_mod = pytest.importorskip("diffusers.optimization")
    total, warmup = 90, 9
    ours_opt, ref_opt = _opt((1e-4, 5e-5)), _opt((1e-4, 5e-5))
    ours = build_scheduler("cosine_with_restarts", ours_opt, total, warmup, num_cycles=3)
    ref = opt_mod.get_cosine_with_hard_restarts_schedule_with_warmup(ref_opt, warmup, total, num_cycles=3)
    a, b = _trace(ours, ours_opt, total + 5), _trace(ref, ref_opt, total + 5)
    for x, y in zip(a, b):
        assert x[0] / 1e-4 == pytest.approx(y[0] / 1e-4, abs=1e-6)
        assert x[1] / 5e-5 == pytest.approx(y[1] / 5e-5, abs=1e-6)
    # three restarts to the full lr after the warm-up
    peaks = [i for i in range(1, len(a)) if a[i][0] > a[i - 1][0] and i > warmup]
    assert len(peaks) == 2  # two jumps back up = three cycles


def test_warmup_fraction() -> None:
    opt_mod = pytest.importorskip("diffusers.optimization")
    assert resolve_warmup_steps(0.25, 40) == 10
    assert resolve_warmup_steps(0.1, 95) == 10  # 9.5 rounds up
    assert resolve_warmup_steps(0.0, 95) == 0
    assert resolve_warmup_steps(12, 95) == 12
    assert resolve_warmup_steps(12.0, 95) == 12
    for name in ("linear", "cosine", "cosine_with_restarts", "constant_with_warmup", "polynomial"):
        ours_opt, ref_opt = _opt(), _opt()
        ours = build_scheduler(name, ours_opt, total_steps=40, warmup_steps=0.25, num_cycles=2, power=2.0)
        ref = opt_mod.get_scheduler(
            name, ref_opt, num_warmup_steps=10, num_training_steps=40, num_cycles=2, power=2.0
        )
        for x, y in zip(_trace(ours, ours_opt, 45), _trace(ref, ref_opt, 45)):
            assert x[0] / 1e-3 == pytest.approx(y[0] / 1e-3, abs=1e-6), name


def test_polynomial_power_two_per_group_end_lr() -> None:
    opt_mod = pytest.importorskip("diffusers.optimization")
    total, warmup = 50, 5
    # a single group: identical to diffusers
    ours_opt, ref_opt = _opt((2e-4,)), _opt((2e-4,))
    ours = build_scheduler("polynomial", ours_opt, total, warmup, power=2.0)
    ref = opt_mod.get_polynomial_decay_schedule_with_warmup(ref_opt, warmup, total, power=2.0)
    for x, y in zip(_trace(ours, ours_opt, total + 3), _trace(ref, ref_opt, total + 3)):
        assert x[0] / 2e-4 == pytest.approx(y[0] / 2e-4, abs=1e-6)
    # two groups: each ends at the absolute 1e-7 (diffusers would use the default lr for both)
    opt = _opt((1e-4, 5e-5), default_lr=1e-4)
    sched = build_scheduler("polynomial", opt, total, warmup, power=2.0)
    trace = _trace(sched, opt, total + 3)
    assert trace[total][0] == pytest.approx(1e-7, rel=1e-6)
    assert trace[total][1] == pytest.approx(1e-7, rel=1e-6)
    assert trace[total + 2] == pytest.approx([1e-7, 1e-7], rel=1e-6)
    mid = warmup + (total - warmup) // 2
    remaining = 1 - (mid - warmup) / (total - warmup)
    assert trace[mid][1] == pytest.approx((5e-5 - 1e-7) * remaining**2 + 1e-7, rel=1e-9)


def test_polynomial_tiny_lr_does_not_raise() -> None:
    opt = _opt((1e-8,))
    sched = build_scheduler("polynomial", opt, 10, 0)
    trace = _trace(sched, opt, 12)
    assert trace[0][0] == pytest.approx(1e-8) and trace[10][0] == 0.0


def test_constant_ignores_warmup_without_error(caplog: pytest.LogCaptureFixture) -> None:
    opt = _opt()
    with caplog.at_level(logging.WARNING, logger="lora_trainer.train.schedulers"):
        sched = build_scheduler("constant", opt, 20, 5)
    assert all(x == [1e-3] for x in _trace(sched, opt, 25))
    assert "constant_with_warmup" in caplog.text


def test_unknown_scheduler() -> None:
    with pytest.raises(ConfigError) as e:
        build_scheduler("cosine_annealing", _opt(), 10, 0)
    assert e.value.field == "lr_scheduler"


def test_scheduler_state_dict_round_trip() -> None:
    opt = _opt((1e-4, 5e-5))
    sched = build_scheduler("cosine_with_restarts", opt, 30, 3, num_cycles=3)
    _trace(sched, opt, 11)
    state = sched.state_dict()
    opt2 = _opt((1e-4, 5e-5))
    sched2 = build_scheduler("cosine_with_restarts", opt2, 30, 3, num_cycles=3)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
