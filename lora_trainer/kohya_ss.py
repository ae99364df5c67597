"""Import and export the JSON configuration files of the kohya_ss GUI (bmaltais/kohya_ss, LoRA tab).

Most users start from a kohya_ss preset or a saved run, so importing one must not lose anything
quietly. :func:`import_kohya_ss` returns the :class:`~lora_trainer.config.TrainConfig`, the keys that
have no equivalent here (every one of them, whatever its value) and notes for values that are
translated or cannot be honoured (a non-square ``max_resolution``, ``sdxl: true``, buckets ...).

The files hold mixed types: numbers as strings (``"0.0001"``), ``""`` for "unset", floats for
integers (``1.0``) and, across versions, booleans or strings for the same key (``xformers``).
An unset value takes sd-scripts' own default (``lr_scheduler_num_cycles`` 1, ``network_alpha`` 1,
an unset ``unet_lr`` means ``learning_rate`` ...); a key absent from the file keeps our default.

:func:`export_kohya_ss` writes the inverse. Fields kohya_ss has no key for (or cannot hold
exactly) travel in an extra ``"lora_trainer"`` object, which kohya_ss ignores, so that
``import_kohya_ss(export_kohya_ss(cfg))[0] == cfg``. Does not import torch.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import OPTIMIZERS, SCHEDULERS, TrainConfig, coerce, parse_optimizer_args
from .errors import ConfigError

EXTRA_KEY = "lora_trainer"
"""Key of the object holding the fields kohya_ss cannot express (written by :func:`export_kohya_ss`)."""

# kohya_ss LoRA_type -> our network_type. "Kohya LoCon" is sd-scripts' networks.lora with conv_dim
# (LoRA-C3Lier), exactly our LoCon; "LoCon" / "LyCORIS/LoCon" run LyCORIS' locon algorithm, whose
# files use the same lora_down/lora_up/alpha keys.
LORA_TYPES: dict[str, str] = {
    "Standard": "Standard",
    "Kohya LoCon": "LoCon",
    "LoCon": "LoCon",
    "LyCORIS/LoCon": "LoCon",
}

# kohya_ss optimizer names accepted besides ours (matched case-insensitively), with a note.
_OPTIMIZER_ALIASES: dict[str, tuple[str, str]] = {
    "dadaptation": ("DAdaptAdam", "optimizer 'DAdaptation' is imported as DAdaptAdam"),
    "pagedadamw8bit": ("AdamW8bit", "optimizer 'PagedAdamW8bit' is imported as AdamW8bit (not paged)"),
}

# Keys that map one to one: kohya key -> (our field, sd-scripts' meaning of an unset "" / null value;
# None keeps our default).
_DIRECT: dict[str, tuple[str, Any]] = {
    "pretrained_model_name_or_path": ("pretrained_model", None),
    "train_data_dir": ("train_data_dir", None),
    "output_dir": ("output_dir", None),
    "logging_dir": ("logging_dir", ""),
    "output_name": ("output_name", None),
    "caption_extension": ("caption_extension", None),
    "network_dim": ("network_dim", None),
    "network_alpha": ("network_alpha", 1.0),
    "conv_dim": ("conv_dim", None),
    "conv_alpha": ("conv_alpha", 1.0),
    "train_batch_size": ("train_batch_size", 1),
    "save_every_n_epochs": ("save_every_n_epochs", 0),
    "save_state": ("save_state", None),
    "mixed_precision": ("mixed_precision", "no"),
    "save_precision": ("save_precision", None),
    "cache_latents": ("cache_latents", False),
    "cache_latents_to_disk": ("cache_latents_to_disk", False),
    "learning_rate": ("learning_rate", None),
    "unet_lr": ("unet_lr", 0.0),
    "lr_scheduler_num_cycles": ("lr_scheduler_num_cycles", 1),
    "lr_scheduler_power": ("lr_scheduler_power", 1.0),
    "optimizer_args": ("optimizer_args", ""),
    "gradient_checkpointing": ("gradient_checkpointing", False),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", 1),
    "noise_offset": ("noise_offset", 0.0),
    "min_snr_gamma": ("min_snr_gamma", 0.0),
    "shuffle_caption": ("shuffle_caption", False),
    "keep_tokens": ("keep_tokens", 0),
    "clip_skip": ("clip_skip", 1),
    "caption_dropout_rate": ("caption_dropout_rate", 0.0),
    "caption_tag_dropout_rate": ("caption_tag_dropout_rate", 0.0),
}

# Handled by code below (translated, or read for a note).
_SPECIAL = {
    "LoRA_type",
    "epoch",
    "max_train_epochs",
    "max_train_steps",
    "seed",
    "text_encoder_lr",
    "network_train_unet_only",
    "network_train_text_encoder_only",
    "lr_scheduler",
    "lr_warmup",
    "lr_warmup_steps",
    "optimizer",
    "max_resolution",
    "resolution",
    "xformers",
    "mem_eff_attn",
    "v_parameterization",
    "v2",
    "sdxl",
    "enable_bucket",
    "additional_parameters",
    "save_model_as",
    EXTRA_KEY,
}

# No equivalent, but they do not change what is trained (listed in unknown keys, no note).
_NO_EFFECT = {
    "training_comment",
    "num_cpu_threads_per_process",
    "max_data_loader_n_workers",
    "persistent_data_loader_workers",
    "vae_batch_size",
    "model_list",
    "log_with",
    "use_wandb",
    "wandb_api_key",
    "wandb_run_name",
    "save_state_on_train_end",
    "sample_every_n_steps",
    "sample_every_n_epochs",
    "sample_sampler",
    "sample_prompts",
    "num_processes",
    "num_machines",
    "multi_gpu",
    "gpu_ids",
    "main_process_port",
    "dynamo_backend",
    "training_preset",
    "lowram",
    "highvram",
}

# kohya_ss/sd-scripts defaults of keys without an equivalent: such a key holding its default is not noted.
_KOHYA_DEFAULTS: dict[str, Any] = {
    "max_token_length": 75,
    "prior_loss_weight": 1.0,
    "noise_offset_type": "Original",
    "max_timestep": 1000,
    "min_timestep": 0,
    "factor": -1,
    "unit": 1,
    "bucket_reso_steps": 64,
    "min_bucket_reso": 256,
    "max_bucket_reso": 2048,
    "max_grad_norm": 1.0,
    "LyCORIS_preset": "full",
    "rank_dropout_scale": False,
}

# sd-scripts options (in additional_parameters) that equal one of our fields by name.
_ADDITIONAL_FIELDS = {
    "lr_warmup_steps",
    "caption_tag_dropout_rate",
    "caption_dropout_rate",
    "noise_offset",
    "min_snr_gamma",
    "keep_tokens",
    "clip_skip",
    "seed",
    "lr_scheduler_power",
    "lr_scheduler_num_cycles",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "shuffle_caption",
    "cache_latents",
    "cache_latents_to_disk",
    "caption_extension",
    "network_train_unet_only",
}
_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _is_default_like(key: str, value: Any) -> bool:
    """True when a key without an equivalent holds a value that changes nothing (unset, off, its default)."""
    if _unset(value) or value is False or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "0.0", "false", "none"):
        return True
    if key in _KOHYA_DEFAULTS:
        d = _KOHYA_DEFAULTS[key]
        try:
            if isinstance(d, (int, float)) and not isinstance(d, bool):
                return float(value) == float(d)
        except (TypeError, ValueError):
            return False
        return value == d
    return False


def _number(key: str, value: Any) -> float:
    """A JSON number or a numeric string (``"5e-05"``) to float; ConfigError names the kohya key."""
    if isinstance(value, bool):
        raise ConfigError(key, value, "a number")
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, value, "a number (the kohya_ss file holds something else)") from None
    if math.isnan(out) or math.isinf(out):
        raise ConfigError(key, value, "a finite number")
    return out


def _to_field(key: str, field_name: str, value: Any) -> Any:
    f = _FIELDS[field_name]
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    if typ == "int":
        x = _number(key, value)
        if not x.is_integer():
            raise ConfigError(key, value, "a whole number")
        return int(x)
    if typ == "float":
        return _number(key, value)
    if typ == "bool" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return bool(value)
    try:
        return coerce(f, value)
    except ConfigError:
        raise ConfigError(key, value, f"a value of type {typ}") from None


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    s = str(value).strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off", ""):
        return False
    raise ConfigError(key, value, "true or false")


def _load(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        return dict(source), "the kohya_ss configuration"
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("kohya_ss config", str(path), "an existing kohya_ss JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("kohya_ss config", str(path), f"a readable UTF-8 JSON file ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("kohya_ss config", str(path), f"valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError("kohya_ss config", str(path), "a JSON object of options (the file holds something else)")
    return data, str(path)


def _parse_resolution(value: Any) -> tuple[int, int]:
    text = str(value).strip().replace("x", ",").replace(" ", "")
    parts = [p for p in text.split(",") if p]
    try:
        nums = [int(_number("max_resolution", p)) for p in parts]
    except ConfigError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) < 64:
        raise ConfigError("max_resolution", value, "'width,height' in pixels, e.g. '768,768'")
    return nums[0], nums[1]


def _parse_additional(text: str) -> tuple[dict[str, str | None], list[str]]:
    """``--name value`` / ``--name=value`` / ``--flag`` tokens to a dict; other tokens are returned apart."""
    try:
        tokens = shlex.split(text)
    except ValueError:
        tokens = text.split()
    out: dict[str, str | None] = {}
    stray: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and len(tok) > 2:
            name, eq, val = tok[2:].partition("=")
            if eq:
                out[name] = val
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                out[name] = tokens[i + 1]
                i += 1
            else:
                out[name] = None
        else:
            stray.append(tok)
        i += 1
    return out, stray


def import_kohya_ss(
    source: str | Path | Mapping[str, Any],
    base: TrainConfig | None = None,
) -> tuple[TrainConfig, list[str], list[str]]:
    """Read a kohya_ss LoRA JSON (a path or the parsed dict).

    Returns ``(config, unknown_keys, notes)``: ``unknown_keys`` are all keys of the file that have
    no equivalent here, sorted; ``notes`` say what was translated and which values will not be
    applied. Keys absent from the file keep the values of ``base`` (default: ``TrainConfig()``).
    Raises :class:`ConfigError` for a value that cannot be used (an unsupported ``LoRA_type``,
    optimizer or scheduler, a number that is not one), naming the kohya key.
    """
    data, where = _load(source)
    values: dict[str, Any] = (base or TrainConfig()).to_dict()
    notes: list[str] = []

    def has(key: str) -> bool:
        return key in data and not _unset(data[key])

    for key, (name, unset_value) in _DIRECT.items():
        if key not in data:
            continue
        raw = data[key]
        if _unset(raw):
            if unset_value is not None:
                values[name] = unset_value
            continue
        values[name] = _to_field(key, name, raw)
    if isinstance(data.get("optimizer_args"), str):
        # kohya_ss users sometimes quote each pair: "decouple=True" "weight_decay=0.01"
        values["optimizer_args"] = " ".join(t.strip("\"'") for t in data["optimizer_args"].split())

    # network type
    if has("LoRA_type"):
        lt = str(data["LoRA_type"]).strip()
        if lt not in LORA_TYPES:
            raise ConfigError(
                "LoRA_type",
                lt,
                f"one of {', '.join(LORA_TYPES)} (this trainer makes LoRA and LoCon files; LoHa, LoKr, DyLoRA, iA3, "
                "GLoRA, OFT, LoRA-FA and native fine-tuning are not supported)",
            )
        values["network_type"] = LORA_TYPES[lt]
        if lt in ("LoCon", "LyCORIS/LoCon"):
            notes.append(
                f"LoRA_type '{lt}' (LyCORIS locon) is trained as kohya's LoCon (LoRA-C3Lier): same file keys; "
                "LyCORIS-only options (preset, tucker, scalar, dropouts) are not applied"
            )

    # epochs and steps
    if has("max_train_epochs"):
        values["max_train_epochs"] = _to_field("max_train_epochs", "max_train_epochs", data["max_train_epochs"])
    elif has("epoch"):
        values["max_train_epochs"] = _to_field("epoch", "max_train_epochs", data["epoch"])
    if "max_train_steps" in data:
        steps = 0 if _unset(data["max_train_steps"]) else _to_field("max_train_steps", "max_train_steps", data["max_train_steps"])
        values["max_train_steps"] = steps
        if steps > 0:
            notes.append(
                f"max_train_steps = {steps} decides the length of the run here ({values['max_train_epochs']} epochs "
                "only when it is 0)"
            )

    # seed: "" means a random seed in kohya_ss
    if "seed" in data:
        if _unset(data["seed"]):
            notes.append(f"seed is empty (a random seed in kohya_ss); using seed {values['seed']} so runs repeat")
        else:
            values["seed"] = _to_field("seed", "seed", data["seed"])

    # learning rates and the text encoder: kohya_ss trains the UNet only when text_encoder_lr is 0 and unet_lr is not
    te_lr = 0.0 if _unset(data.get("text_encoder_lr")) else _number("text_encoder_lr", data["text_encoder_lr"])
    if "text_encoder_lr" in data:
        values["text_encoder_lr"] = te_lr
    unet_lr = float(values["unet_lr"]) if "unet_lr" in data else None
    if "network_train_unet_only" in data and not _unset(data["network_train_unet_only"]):
        values["train_text_encoder"] = not _bool("network_train_unet_only", data["network_train_unet_only"])
    elif "text_encoder_lr" in data and unet_lr is not None:
        values["train_text_encoder"] = not (te_lr == 0 and unet_lr != 0)
        if not values["train_text_encoder"]:
            notes.append("text_encoder_lr is 0 and unet_lr is not: the UNet only is trained (network_train_unet_only)")
    if has("network_train_text_encoder_only") and _bool("network_train_text_encoder_only", data["network_train_text_encoder_only"]):
        notes.append("network_train_text_encoder_only is not supported: the UNet and the text encoder are both trained")
    elif "text_encoder_lr" in data and unet_lr == 0 and te_lr != 0:
        notes.append(
            "unet_lr is 0 and text_encoder_lr is not (kohya_ss then trains the text encoder only): "
            "here the UNet is trained too, at learning_rate"
        )

    # scheduler and warm-up (kohya_ss: lr_warmup is a PERCENT of all steps)
    if has("lr_scheduler"):
        sched = str(data["lr_scheduler"]).strip()
        low = sched.lower()
        if low == "adafactor":
            values["lr_scheduler"] = "constant"
            notes.append("lr_scheduler 'adafactor' is imported as constant (Adafactor with relative_step sets its own lr)")
        else:
            match = next((s for s in SCHEDULERS if s == low), None)
            if match is None:
                raise ConfigError("lr_scheduler", sched, "one of " + ", ".join(SCHEDULERS) + " or adafactor")
            values["lr_scheduler"] = match
    if has("lr_warmup"):
        pct = _number("lr_warmup", data["lr_warmup"])
        if not 0 <= pct <= 100:
            raise ConfigError("lr_warmup", data["lr_warmup"], "a percentage of all steps, 0 to 100")
        frac = round(pct / 100.0, 12)
        if frac >= 1.0:
            frac = 0.999  # 1.0 would read as "one step"
            notes.append("lr_warmup 100% is imported as a warm-up of 99.9% of the steps")
        values["lr_warmup_steps"] = frac
    elif "lr_warmup" in data:
        values["lr_warmup_steps"] = 0.0
    if has("lr_warmup_steps"):  # some configs carry sd-scripts' own key
        values["lr_warmup_steps"] = _to_field("lr_warmup_steps", "lr_warmup_steps", data["lr_warmup_steps"])

    # optimizer
    if has("optimizer"):
        opt = str(data["optimizer"]).strip()
        match = next((o for o in OPTIMIZERS if o.lower() == opt.lower()), None)
        if match is None and opt.lower() in _OPTIMIZER_ALIASES:
            match, note = _OPTIMIZER_ALIASES[opt.lower()]
            notes.append(note)
        if match is None:
            raise ConfigError("optimizer", opt, "one of " + ", ".join(OPTIMIZERS))
        values["optimizer"] = match
    if values["optimizer_args"]:
        parse_optimizer_args(values["optimizer_args"])

    # resolution
    res_key = "max_resolution" if has("max_resolution") else ("resolution" if has("resolution") else None)
    if res_key:
        w, h = _parse_resolution(data[res_key])
        if w == h:
            side = w
        else:
            side = max(64, int(round(math.sqrt(w * h) / 8.0)) * 8)
            notes.append(
                f"{res_key} {w},{h} is not square: training here is square, at {side} px (about the same pixel count)"
            )
        if side % 8:
            side = int(round(side / 8.0)) * 8
            notes.append(f"{res_key} rounded to {side} px (a multiple of 8)")
        values["resolution"] = side
    if has("enable_bucket") and _bool("enable_bucket", data["enable_bucket"]):
        notes.append(
            "enable_bucket is on: aspect-ratio buckets are not supported yet; every image is resized and "
            "centre-cropped to a square (crop faces first with the Prepare tab)"
        )

    # attention
    xf = data.get("xformers")
    if isinstance(xf, str):
        values["attention"] = "xformers" if xf.strip().lower() in ("xformers", "true", "1") else "sdpa"
    elif xf is not None:
        values["attention"] = "xformers" if bool(xf) else "sdpa"
    if has("mem_eff_attn") and _bool("mem_eff_attn", data["mem_eff_attn"]) and values["attention"] != "xformers":
        notes.append("mem_eff_attn: PyTorch SDPA (memory-efficient) attention is used")

    # model family
    if "v_parameterization" in data and not _unset(data["v_parameterization"]):
        vp = _bool("v_parameterization", data["v_parameterization"])
        values["prediction_type"] = "v_prediction" if vp else "auto"
    if has("sdxl") and _bool("sdxl", data["sdxl"]):
        notes.append(
            "sdxl is on: this trainer trains SD1.x/2.x models for now; the SDXL-only options of the file "
            "(text-encoder output cache, no-half VAE, buckets) are not applied"
        )
    if has("v2") and _bool("v2", data["v2"]):
        notes.append("v2 is on: the model version is read from the checkpoint itself (set prediction_type if needed)")

    if has("save_model_as") and str(data["save_model_as"]).strip().lower() != "safetensors":
        notes.append(f"save_model_as '{data['save_model_as']}': LoRA files are always saved as .safetensors here")

    # additional_parameters: sd-scripts options by name
    extra_params = data.get("additional_parameters")
    if isinstance(extra_params, str) and extra_params.strip():
        opts, stray = _parse_additional(extra_params)
        skipped = list(stray)
        for name, val in opts.items():
            target = "train_text_encoder" if name == "network_train_unet_only" else name
            if name not in _ADDITIONAL_FIELDS:
                skipped.append(f"--{name}" + (f"={val}" if val is not None else ""))
                continue
            f = _FIELDS[target]
            if val is None:
                if f.type != "bool":
                    skipped.append(f"--{name}")
                    continue
                val = "true"
            v = _to_field(f"additional_parameters --{name}", target, val)
            values[target] = (not v) if name == "network_train_unet_only" else v
        if skipped:
            notes.append("additional_parameters not applied: " + " ".join(skipped))

    # our own fields that kohya_ss cannot hold (written by export_kohya_ss)
    extra = data.get(EXTRA_KEY)
    if extra is not None:
        if not isinstance(extra, dict):
            raise ConfigError(EXTRA_KEY, extra, "an object of lora_trainer options")
        for k, v in extra.items():
            if k not in _FIELDS:
                raise ConfigError(f"{EXTRA_KEY}.{k}", v, "a lora_trainer option name")
            values[k] = coerce(_FIELDS[k], v)

    known = set(_DIRECT) | _SPECIAL
    unknown = sorted(k for k in data if k not in known)
    applied_elsewhere = [k for k in unknown if k not in _NO_EFFECT and not _is_default_like(k, data[k])]
    if applied_elsewhere:
        notes.append(
            "set in the file but not supported here (not applied): "
            + ", ".join(f"{k}={data[k]!r}" for k in applied_elsewhere)
        )
    try:
        cfg = TrainConfig.from_dict(values, source=where).validate()
    except ConfigError as e:
        raise ConfigError(e.field, e.value, f"{e.allowed} (imported from {where})") from None
    return cfg, unknown, notes


def _num_out(x: float) -> float | int:
    """Integral floats as ints, as kohya_ss writes them (``64`` not ``64.0``) where the type allows."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


def _export_core(cfg: TrainConfig) -> dict[str, Any]:
    te_lr = cfg.text_encoder_lr
    if cfg.train_text_encoder and te_lr == 0 and cfg.unet_lr != 0:
        te_lr = cfg.effective_text_encoder_lr  # a 0 here would mean "UNet only" to kohya_ss
    if not cfg.train_text_encoder:
        te_lr = 0.0
    additional: list[str] = []
    warm = cfg.lr_warmup_steps
    lr_warmup: float | int = 0
    if 0 < warm < 1:
        lr_warmup = _num_out(round(warm * 100.0, 10))
    elif warm >= 1:
        additional.append(f"--lr_warmup_steps={int(warm)}")
    if cfg.caption_tag_dropout_rate:
        additional.append(f"--caption_tag_dropout_rate={cfg.caption_tag_dropout_rate!r}")
    return {
        "LoRA_type": "Standard" if cfg.network_type == "Standard" else "Kohya LoCon",
        "pretrained_model_name_or_path": cfg.pretrained_model,
        "v2": False,
        "v_parameterization": cfg.prediction_type == "v_prediction",
        "sdxl": False,
        "train_data_dir": cfg.train_data_dir,
        "output_dir": cfg.output_dir,
        "logging_dir": cfg.logging_dir,
        "output_name": cfg.output_name,
        "caption_extension": cfg.caption_extension,
        "max_resolution": f"{cfg.resolution},{cfg.resolution}",
        "enable_bucket": False,
        "network_dim": cfg.network_dim,
        "network_alpha": _num_out(cfg.network_alpha),
        "conv_dim": cfg.conv_dim,
        "conv_alpha": _num_out(cfg.conv_alpha),
        "network_train_unet_only": not cfg.train_text_encoder,
        "optimizer": cfg.optimizer,
        "optimizer_args": cfg.optimizer_args,
        "learning_rate": cfg.learning_rate,
        "unet_lr": cfg.unet_lr,
        "text_encoder_lr": te_lr,
        "lr_scheduler": cfg.lr_scheduler,
        "lr_scheduler_num_cycles": cfg.lr_scheduler_num_cycles,
        "lr_scheduler_power": cfg.lr_scheduler_power,
        "lr_warmup": lr_warmup,
        "train_batch_size": cfg.train_batch_size,
        "epoch": cfg.max_train_epochs,
        "max_train_steps": cfg.max_train_steps if cfg.max_train_steps else "",
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "mixed_precision": cfg.mixed_precision,
        "save_precision": cfg.save_precision,
        "xformers": cfg.attention,
        "cache_latents": cfg.cache_latents,
        "cache_latents_to_disk": cfg.cache_latents_to_disk,
        "seed": cfg.seed,
        "noise_offset": cfg.noise_offset,
        "min_snr_gamma": cfg.min_snr_gamma,
        "clip_skip": cfg.clip_skip,
        "shuffle_caption": cfg.shuffle_caption,
        "keep_tokens": cfg.keep_tokens,
        "caption_dropout_rate": cfg.caption_dropout_rate,
        "save_every_n_epochs": cfg.save_every_n_epochs,
        "save_model_as": "safetensors",
        "additional_parameters": " ".join(additional),
    }


def export_kohya_ss(cfg: TrainConfig) -> dict[str, Any]:
    """A kohya_ss LoRA JSON dict for ``cfg`` (``json.dump`` it to a file kohya_ss can open).

    What kohya_ss cannot hold exactly (``alpha_background``, ``model_config_dir``, an explicit
    ``epsilon`` prediction type, a text-encoder lr kept while the text encoder is off ...) goes
    into the ``"lora_trainer"`` object, so :func:`import_kohya_ss` gives ``cfg`` back.
    """
    cfg.validate()
    out = _export_core(cfg)
    back, _unknown, _notes = import_kohya_ss(dict(out), base=TrainConfig())
    extra = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if getattr(back, f.name) != getattr(cfg, f.name)}
    if extra:
        out[EXTRA_KEY] = extra
    return out


def save_kohya_ss(cfg: TrainConfig, path: str | Path) -> Path:
    """Write :func:`export_kohya_ss` as indented JSON (as kohya_ss saves its files)."""
    p = Path(path)
    p.write_text(json.dumps(export_kohya_ss(cfg), indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
