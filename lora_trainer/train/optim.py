"""Build the optimizer chosen in the config, kohya sd-scripts style.

Public API
----------
``check_optimizer_args(name, optimizer_args)``
    Refuses arguments the optimizer does not take, without building it (before a model loads).
``build_optimizer(name, param_groups, optimizer_args, lr)``
    The optimizer for torch-style ``param_groups`` (dicts with ``"params"`` and usually ``"lr"``;
    each group's lr is kept, ``lr`` is the default for groups without one). Exception:
    DAdaptAdam and Prodigy raise at their first step when groups have different non-zero lrs,
    so there every non-zero group lr becomes the first one (kohya: "only the first one will
    take effect"), with a logged warning.
``optimizer_is_adaptive(name, args)``
    True where the optimizer picks its own step size (D-Adaptation, Prodigy, Adafactor with
    ``relative_step=True``): a UI can suggest ``lr = 1.0`` or grey out the lr fields.
``optimizer_notes(name, lrs, args)``
    Human-readable warnings about the combination (``build_optimizer`` logs them too).
``current_lrs(optimizer)``
    The learning rate per param group to show in logs: ``d * lr`` for D-Adaptation / Prodigy
    (as kohya logs it), the computed relative step for Adafactor with ``relative_step=True``.

Adafactor
---------
``transformers.optimization.Adafactor`` refuses a constructor ``lr`` together with
``relative_step=True``. What we do:

* Missing ``scale_parameter``, ``relative_step`` and ``warmup_init`` default to ``False`` (the
  usual kohya preset ``scale_parameter=False relative_step=False warmup_init=False``; note that
  kohya's CLI itself defaults an omitted ``relative_step`` to True, transformers all but
  ``warmup_init`` to True). Adafactor is then an ordinary fixed-lr optimizer and each group's lr is
  used, like AdamW.
* ``warmup_init=True`` forces ``relative_step=True`` (as kohya does; transformers would raise).
* With ``relative_step=True`` the constructor gets ``lr=None``. kohya removes the group lrs and
  switches to an ``AdafactorSchedule``; Adafactor never reads a group's ``"lr"`` in that mode, so we
  leave the numbers in place (any LambdaLR then keeps working) and log that they are ignored.
  ``schedulers.build_scheduler`` returns a constant schedule for such an optimizer, and
  ``current_lrs`` reports the step size Adafactor really uses.

This module imports no optional package at import time; each is imported when chosen and a
missing one raises :class:`~lora_trainer.errors.MissingPackageError` with the pip command.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..config import OPTIMIZERS, parse_optimizer_args
from ..errors import ConfigError, MissingPackageError

logger = logging.getLogger(__name__)

# name -> (module to import, class name in it, pip name)
_SOURCES: dict[str, tuple[str, str, str]] = {
    "AdamW": ("torch.optim", "AdamW", "torch"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers"),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}

_ADAFACTOR_DEFAULTS: dict[str, Any] = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
_ADAPTIVE_LR_FLOOR = 0.1  # below this D-Adaptation / Prodigy lrs are almost certainly a mistake


def canonical_optimizer_name(name: str) -> str:
    """The spelling from ``config.OPTIMIZERS`` for ``name`` (case-insensitive), or ConfigError."""
    for known in OPTIMIZERS:
        if known.lower() == str(name).strip().lower():
            return known
    raise ConfigError("optimizer", name, "one of " + ", ".join(OPTIMIZERS))


def _as_kwargs(optimizer_args: str | dict[str, Any] | None) -> dict[str, Any]:
    if optimizer_args is None:
        return {}
    if isinstance(optimizer_args, str):
        return parse_optimizer_args(optimizer_args)
    if isinstance(optimizer_args, dict):
        return dict(optimizer_args)
    raise ConfigError("optimizer_args", optimizer_args, "a 'key=value key=value' string or a mapping")


def _adafactor_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {**_ADAFACTOR_DEFAULTS, **kwargs}
    if out.get("warmup_init") and not out.get("relative_step"):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True (as kohya does)")
        out["relative_step"] = True
    return out


def optimizer_is_adaptive(name: str, args: str | dict[str, Any] | None = None) -> bool:
    """Whether the optimizer chooses its own step size, so the configured lr is not the real one.

    True for D-Adaptation (``DAdapt*``), Prodigy, and Adafactor with ``relative_step=True`` (after
    the defaults described in the module docstring; ``warmup_init=True`` implies it).
    """
    low = str(name).strip().lower()
    if low.startswith(("dadapt", "prodigy")):
        return True
    if low == "adafactor":
        return bool(_adafactor_kwargs(_as_kwargs(args)).get("relative_step"))
    return False


def optimizer_notes(name: str, lrs: list[float], args: str | dict[str, Any] | None = None) -> list[str]:
    """Warnings worth showing the user for this optimizer and these group learning rates."""
    notes: list[str] = []
    low = str(name).strip().lower()
    if low.startswith(("dadapt", "prodigy")):
        low_lrs = [x for x in lrs if x is not None and x < _ADAPTIVE_LR_FLOOR]
        if low_lrs:
            notes.append(
                f"{name} adapts the step size itself and expects a learning rate around 1.0; "
                f"got {', '.join(f'{x:g}' for x in low_lrs)}. Set learning_rate, unet_lr and text_encoder_lr to 1.0 "
                "(or use a smaller value only as a deliberate scale)."
            )
        nonzero = [x for x in lrs if x]
        if len(set(nonzero)) > 1:
            notes.append(
                f"{name} estimates one step size for all parameter groups and refuses different learning "
                f"rates per group (other than 0): only the first one, {nonzero[0]:g}, takes effect (as in kohya). "
                "Set unet_lr and text_encoder_lr to the same value (1.0)."
            )
    elif low == "adafactor" and optimizer_is_adaptive(name, args):
        notes.append(
            "Adafactor with relative_step=True computes its own step size: learning_rate, unet_lr and "
            "text_encoder_lr are ignored and the lr schedule is constant."
        )
    return notes


def _import_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    module_name, class_name, pip_name = _SOURCES[name]
    package = module_name.split(".")[0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MissingPackageError(package, f"The {name} optimizer", pip_name) from e
    return getattr(module, class_name)


def _accepted_keywords(cls: Callable[..., Any]) -> list[str] | None:
    """Keyword arguments ``cls`` takes besides params and lr; None when it takes ``**kwargs``."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - C classes without a signature
        return None
    names: list[str] = []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            continue
        if p.name in ("self", "params", "lr"):
            continue
        names.append(p.name)
    return names


def _check_keywords(name: str, cls: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    if "lr" in kwargs:
        raise ConfigError(
            "optimizer_args",
            f"lr={kwargs['lr']}",
            "no lr here; set the learning rate with learning_rate / unet_lr / text_encoder_lr",
        )
    accepted = _accepted_keywords(cls)
    if accepted is None:
        return
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ConfigError(
            "optimizer_args",
            ", ".join(unknown),
            f"keyword arguments {name} accepts: {', '.join(accepted)}",
        )


def check_optimizer_args(name: str, optimizer_args: str | dict[str, Any]) -> None:
    """Refuse an argument the optimizer does not take, before a model is loaded (preflight): the same
    check :func:`build_optimizer` makes, which comes only after the model and the cache. Imports the
    optimizer's package, so a missing one is reported here too (MissingPackageError)."""
    name = canonical_optimizer_name(name)
    _check_keywords(name, _import_optimizer_class(name), _as_kwargs(optimizer_args))


def _copy_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for g in param_groups:
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError("param_groups must be a list of dicts with a 'params' entry")
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if params:
            groups.append({**g, "params": params})
    if not groups:
        raise ValueError("No trainable parameters: every parameter group is empty")
    return groups


def build_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    optimizer_args: str | dict[str, Any],
    lr: float,
) -> torch.optim.Optimizer:
    """Create optimizer ``name`` for ``param_groups``, keeping each group's own ``"lr"``.

    ``optimizer_args`` is a kohya-style string (``"weight_decay=0.01 betas=0.9,0.999"``) or a dict
    of keyword arguments; ``lr`` is the default for groups without an ``"lr"`` entry.
    DAdaptAdam / Prodigy get one lr for all non-zero groups (see the module docstring).

    Raises ConfigError for an unknown optimizer, an argument the optimizer does not accept (the
    message lists the accepted ones) or a value it rejects, and MissingPackageError when the
    optional package the optimizer lives in is not installed. Empty groups are dropped.
    """
    name = canonical_optimizer_name(name)
    user_kwargs = _as_kwargs(optimizer_args)
    cls = _import_optimizer_class(name)
    _check_keywords(name, cls, user_kwargs)
    kwargs = dict(user_kwargs)
    groups = _copy_groups(param_groups)
    group_lrs = [float(g.get("lr", lr)) for g in groups]

    ctor_lr: float | None = lr
    if name in ("DAdaptAdam", "Prodigy"):
        # both raise at the first step when groups have different non-zero lrs: use the first
        # one everywhere (kohya: "only the first one will take effect"); 0 keeps a group frozen
        nonzero = [x for x in group_lrs if x]
        if nonzero:
            ctor_lr = nonzero[0]
            for g in groups:
                if g.get("lr", lr):
                    g["lr"] = ctor_lr
    if name == "Adafactor":
        kwargs = _adafactor_kwargs(kwargs)
        if kwargs["relative_step"]:
            # transformers: "Cannot combine manual `lr` and `relative_step=True`". The group lrs
            # stay as numbers (ignored by Adafactor in this mode, harmless for schedulers).
            for g in groups:
                g.setdefault("lr", lr)
            ctor_lr = None

    for note in optimizer_notes(name, group_lrs, kwargs):
        logger.warning(note)
    group_lrs = [float(g.get("lr", ctor_lr or 0.0)) for g in groups]

    try:
        optimizer = cls(groups, lr=ctor_lr, **kwargs)
    except (TypeError, ValueError) as e:
        if not user_kwargs:
            raise
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in user_kwargs.items())
        raise ConfigError("optimizer_args", shown, f"values {name} accepts ({e})") from e
    logger.info("optimizer %s, group lrs %s, args %s", name, group_lrs, kwargs)
    return optimizer


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return str(v)


def _adafactor_relative_lr(opt: Any, group: dict[str, Any]) -> float:
    params = group["params"]
    if not params:
        return 0.0
    p = params[0]
    state = opt.state.get(p, {}) if hasattr(opt, "state") else {}
    if "step" not in state:
        # before the first step: what step 1 will use
        rms = float(p.detach().float().norm(2) / math.sqrt(max(1, p.numel())))
        state = {"step": 1, "RMS": rms}
    return float(opt._get_lr(group, state))


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each param group, as it should be logged.

    * D-Adaptation / Prodigy (a ``"d"`` entry in the group): ``d * lr``, like kohya.
    * Adafactor with ``relative_step=True``: the step size Adafactor computes for the group's
      first parameter (the last one used, or the first one it will use before any step).
    * anything else: the group's ``"lr"``.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    out: list[float] = []
    for group in inner.param_groups:
        lr = group.get("lr")
        if group.get("relative_step") and hasattr(inner, "_get_lr"):
            out.append(_adafactor_relative_lr(inner, group))
        elif "d" in group and lr is not None:
            out.append(float(group["d"]) * float(lr))
        else:
            out.append(float(lr) if lr is not None else 0.0)
    return out


__all__ = [
    "build_optimizer",
    "canonical_optimizer_name",
    "check_optimizer_args",
    "current_lrs",
    "optimizer_is_adaptive",
    "optimizer_notes",
]
