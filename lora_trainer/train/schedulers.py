"""Learning-rate schedules with the semantics of diffusers' ``get_scheduler`` as kohya calls it.

The multipliers are written out here (``lr_lambda``) so that training works on hosts without
diffusers; the tests compare them step by step with ``diffusers.optimization``.

Semantics (``step`` is the scheduler's step count: 0 before the first ``scheduler.step()``):

* warm-up: ``step / warmup`` for ``step < warmup`` (so the very first optimizer step uses lr 0
  when there is a warm-up, as in diffusers / kohya).
* ``constant``: always 1. Warm-up is ignored, as in diffusers (kohya raises an error when a
  warm-up is set for ``constant``; we log a hint to use ``constant_with_warmup`` instead).
* ``constant_with_warmup``: warm-up, then 1.
* ``linear``: warm-up, then linearly to 0 at ``total``.
* ``cosine``: warm-up, then half a cosine to 0 at ``total`` (``num_cycles`` is not used, as in
  kohya, which does not pass it for ``cosine``).
* ``cosine_with_restarts``: warm-up, then ``num_cycles`` half cosines with hard restarts; 0 from
  ``total`` on.
* ``polynomial``: warm-up, then ``(lr_init - lr_end) * remaining**power + lr_end`` with
  ``lr_end = 1e-7`` absolute, as diffusers' ``get_polynomial_decay_schedule_with_warmup``; ``lr_end``
  after ``total``. diffusers converts ``lr_end`` with ``optimizer.defaults["lr"]`` for every group;
  we convert it with each group's own initial lr, so the U-Net and text-encoder groups both end at
  1e-7. A group whose lr is not above ``lr_end`` (diffusers raises) decays to 0 instead.

``warmup_steps`` below 1 is a fraction of ``total_steps`` rounded to the nearest step (half up);
from 1 on it is a number of steps (kohya truncates the fraction with ``int()``; see
:func:`resolve_warmup_steps`).

Adafactor with ``relative_step=True`` computes its own step size (kohya switches to
transformers' ``AdafactorSchedule``, which only reports it); here such an optimizer gets a
constant schedule whatever ``name`` says, and ``optim.current_lrs`` reports the real step size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config import SCHEDULERS
from ..errors import ConfigError

logger = logging.getLogger(__name__)

POLYNOMIAL_LR_END = 1e-7


def resolve_warmup_steps(warmup_steps: float, total_steps: int) -> int:
    """Warm-up in steps: a value below 1 is that fraction of ``total_steps`` (rounded half up)."""
    if warmup_steps is None or warmup_steps <= 0 or (isinstance(warmup_steps, float) and math.isnan(warmup_steps)):
        return 0
    if warmup_steps < 1:
        return math.floor(warmup_steps * max(0, total_steps) + 0.5)
    return int(warmup_steps)


def lr_lambda(
    name: str,
    step: int,
    total: int,
    warmup: int,
    cycles: int = 1,
    power: float = 1.0,
    *,
    lr_init: float | None = None,
    lr_end: float = POLYNOMIAL_LR_END,
) -> float:
    """The lr multiplier of schedule ``name`` at ``step`` (``warmup`` already in steps).

    ``lr_init`` and ``lr_end`` matter only for ``polynomial``: with ``lr_init`` given the schedule
    ends at the absolute ``lr_end`` (diffusers' semantics); without it, or when ``lr_init`` is not
    above ``lr_end``, it decays to 0.
    """
    if name == "constant":
        return 1.0
    if name not in SCHEDULERS:
        raise ConfigError("lr_scheduler", name, "one of " + ", ".join(SCHEDULERS))
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if name == "constant_with_warmup":
        return 1.0
    decay_steps = max(1, total - warmup)
    progress = float(step - warmup) / float(decay_steps)
    if name == "linear":
        return max(0.0, float(total - step) / float(decay_steps))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))
    # polynomial
    if lr_init is None or not lr_init > lr_end:
        lr_init, lr_end = 1.0, 0.0
    if step > total:
        return lr_end / lr_init
    remaining = 1.0 - progress
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _make_lambda(
    name: str, total: int, warmup: int, cycles: int, power: float, lr_init: float | None
) -> Callable[[int], float]:
    def fn(step: int) -> float:
        return lr_lambda(name, step, total, warmup, cycles, power, lr_init=lr_init)

    return fn


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner).__name__ == "Adafactor" and bool(getattr(inner, "defaults", {}).get("relative_step"))


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: float,
    num_cycles: int = 1,
    power: float = 1.0,
) -> LambdaLR:
    """A ``LambdaLR`` for schedule ``name`` (one of ``config.SCHEDULERS``) over ``total_steps``.

    Call ``scheduler.step()`` once after each optimizer step. Each param group keeps its own base
    lr. Raises ConfigError only for an unknown name.
    """
    if name not in SCHEDULERS:
        raise ConfigError("lr_scheduler", name, "one of " + ", ".join(SCHEDULERS))
    total = max(0, int(total_steps))
    warmup = resolve_warmup_steps(warmup_steps, total)
    cycles = max(1, int(num_cycles))

    if _is_relative_step_adafactor(optimizer):
        logger.info("Adafactor with relative_step=True sets its own step size; lr_scheduler %s is not used", name)
        return LambdaLR(optimizer, lambda _step: 1.0)

    if name == "constant" and warmup > 0:
        logger.warning(
            "lr_scheduler 'constant' ignores lr_warmup_steps (%d steps); use 'constant_with_warmup' for a warm-up",
            warmup,
        )
    if warmup > total > 0:
        logger.warning("lr_warmup_steps (%d) is longer than the whole training (%d steps)", warmup, total)

    lambdas = [
        _make_lambda(name, total, warmup, cycles, power, group.get("initial_lr", group["lr"]))
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lambdas)


__all__ = ["POLYNOMIAL_LR_END", "build_scheduler", "lr_lambda", "resolve_warmup_steps"]
