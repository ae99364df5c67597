"""One typed training configuration: TOML in and out, ``--set key=value`` overrides, validation.

Field names follow kohya sd-scripts where one exists, so users recognise them from the guides.
This module must not import torch or a host: the UI and the CLI validate a config before any
model is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .errors import ConfigError
from .filenames import name_problem

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "DAdaptAdam", "Prodigy", "Lion")
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
NETWORK_TYPES = ("Standard", "LoCon")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISION = ("fp16", "bf16", "float")
ATTENTION = ("sdpa", "xformers")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
_OUTPUT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-()\[\]]*$")

# Upper bounds of the size options. A value past one is a typo or a test of the limits, and would
# otherwise be found late (a multi-GB cache, a file name the file system refuses) or never (a run of
# years). Each is generous for real use.
MAX_RESOLUTION = 4096
"""SDXL is trained at 1024, its buckets and some fine-tunes reach 2048; twice that leaves room. One
4096 px image is 192 MiB as float pixels and a 4 MiB latent: the run is already heavy there."""
MAX_BUCKET_STEPS = 1024
"""kohya uses 64; a step as large as a quarter of the largest resolution leaves a handful of buckets."""
MAX_RANK = 1024
"""kohya users train dim up to 256, sometimes 512; 1024 is close to full rank for SD's widest layers
(1280 channels). Alpha above the rank scales the update past 1x, so it shares the bound."""
MAX_BATCH = 256
"""Guides use 1-8, large GPUs 32-64; a larger batch is gradient accumulation's job."""
MAX_ACCUMULATION = 256
"""Batch x accumulation = 65536 images per optimizer step, far past any LoRA recipe."""
MAX_EPOCHS = 10_000
"""Guides train 10-100 epochs; epoch files are named with six digits (``-000001``)."""
MAX_STEPS = 1_000_000
"""LoRA runs take hundreds to tens of thousands of steps; a million, at one step a second, is 12 days."""
MAX_CYCLES = 1_000
"""A restart every few steps at most is already no schedule."""
MAX_POWER = 100.0
"""Polynomial decay uses powers around 1; 100 drops the lr to nothing after the first steps."""
MAX_SEED = 2**32 - 1
"""The WebUIs' seed range (A1111 and Forge draw 32-bit seeds); torch's generators take it."""
MAX_SNR_GAMMA = 1_000.0
"""The paper uses 5; SD's largest SNR (at t = 0) is about 1200, so a gamma near it weights nothing."""
MAX_KEEP_TOKENS = 225
"""A caption's tags cannot outnumber the 225 tokens of kohya's longest (3 x 75) caption."""
MAX_GRID_WEIGHTS = 20
"""Rows of the grid: each is one image per epoch file; guides use 4-6 weights."""
MAX_TEXT = 4096
"""Any text option (paths, prompts, optimizer_args): 4096 bytes is Linux's longest path, and an
A1111 prompt this long is over 700 tokens."""
OUTPUT_NAME_EXTRA_BYTES = 49
"""Bytes the longest file named after output_name adds to it: the temporary file a grid is written to
(files.write_file), ``.<name>_grid-<n>.png.<8 hex>.lora_trainer.tmp`` (37 + the digits of n), and an
epoch file's ``.<name>-000001.safetensors.<8 hex>.lora_trainer.tmp`` (46); 49 leaves n up to 12 digits."""


def _f(default: Any, section: str, help: str, **extra: Any) -> Any:
    """A dataclass field that carries its TOML section and a one-line help text."""
    meta = {"section": section, "help": help, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # model
    pretrained_model: str = _f("", "model", "Base model: a single-file .safetensors/.ckpt (A1111 layout) or a diffusers folder")
    model_config_dir: str = _f("", "model", "Folder with diffusers configs and tokenizer, for single files whose configs are not built in")
    prediction_type: str = _f("auto", "model", "Training target", choices=PREDICTION_TYPES)
    # dataset
    train_data_dir: str = _f("", "dataset", "Folder holding <repeats>_<name>/ sub-folders of images and captions")
    caption_extension: str = _f(".txt", "dataset", "Extension of caption files next to each image", max_len=16)
    resolution: int = _f(512, "dataset", "Training resolution in pixels (square)", min=64, max=MAX_RESOLUTION, multiple=8)
    alpha_background: str = _f("#ffffff", "dataset", "Colour transparent pixels are composed over (#rrggbb)")
    shuffle_caption: bool = _f(False, "dataset", "Shuffle comma-separated tags each step")
    keep_tokens: int = _f(0, "dataset", "Leading tags never shuffled or dropped", min=0, max=MAX_KEEP_TOKENS)
    caption_dropout_rate: float = _f(0.0, "dataset", "Probability of training an image with an empty caption", min=0.0, max=1.0)
    caption_tag_dropout_rate: float = _f(0.0, "dataset", "Probability of dropping each tag (after keep_tokens)", min=0.0, max=1.0)
    enable_bucket: bool = _f(False, "dataset", "Aspect-ratio buckets: train each image near its own shape instead of a centre square")
    min_bucket_reso: int = _f(256, "dataset", "Smallest bucket side in pixels", min=32, max=MAX_RESOLUTION, multiple=8)
    max_bucket_reso: int = _f(1024, "dataset", "Largest bucket side in pixels", min=64, max=MAX_RESOLUTION, multiple=8)
    bucket_reso_steps: int = _f(64, "dataset", "Bucket sides are multiples of this (64 as kohya)", min=8, max=MAX_BUCKET_STEPS, multiple=8)
    bucket_no_upscale: bool = _f(False, "dataset", "Never enlarge an image to fill a bucket: small images get smaller buckets")
    validation_loss: bool = _f(True, "dataset", "Measure a validation loss after every epoch (fixed noise and timesteps)")
    validation_split: float = _f(
        0.0, "dataset", "Fraction of images held out for the validation loss (0 = measure on training images)", min=0.0, max=0.5
    )
    # network
    network_type: str = _f("Standard", "network", "LoRA kind: Standard (attention + MLP) or LoCon (+ 3x3 convs)", choices=NETWORK_TYPES)
    network_dim: int = _f(32, "network", "LoRA rank", min=1, max=MAX_RANK)
    network_alpha: float = _f(16.0, "network", "LoRA alpha (scale = alpha / rank)", min=0.0, max=MAX_RANK)
    conv_dim: int = _f(8, "network", "LoCon rank of 3x3 convolutions", min=1, max=MAX_RANK)
    conv_alpha: float = _f(1.0, "network", "LoCon alpha of 3x3 convolutions", min=0.0, max=MAX_RANK)
    train_text_encoder: bool = _f(True, "network", "Train LoRA on the text encoder too (off = network_train_unet_only)")
    # optimizer
    optimizer: str = _f("AdamW", "optimizer", "Optimizer", choices=OPTIMIZERS)
    optimizer_args: str = _f("", "optimizer", "Extra optimizer arguments, kohya style: 'decouple=True weight_decay=0.01 betas=0.9,0.999'")
    learning_rate: float = _f(1e-4, "optimizer", "Base learning rate (used where unet_lr / text_encoder_lr are 0)", min=0.0)
    unet_lr: float = _f(1e-4, "optimizer", "UNet learning rate", min=0.0)
    text_encoder_lr: float = _f(5e-5, "optimizer", "Text encoder learning rate", min=0.0)
    text_encoder2_lr: float = _f(0.0, "optimizer", "SDXL second text encoder learning rate (0 = same as text_encoder_lr)", min=0.0)
    lr_scheduler: str = _f("cosine_with_restarts", "optimizer", "Learning-rate schedule", choices=SCHEDULERS)
    lr_scheduler_num_cycles: int = _f(3, "optimizer", "Restarts of cosine_with_restarts", min=1, max=MAX_CYCLES)
    lr_scheduler_power: float = _f(1.0, "optimizer", "Power of the polynomial schedule", min=0.0, max=MAX_POWER)
    lr_warmup_steps: float = _f(0.0, "optimizer", "Warm-up steps (a value below 1 is a fraction of all steps)", min=0.0, max=MAX_STEPS)
    # training
    train_batch_size: int = _f(1, "training", "Images per step", min=1, max=MAX_BATCH)
    max_train_epochs: int = _f(10, "training", "Epochs (ignored when max_train_steps is set)", min=1, max=MAX_EPOCHS)
    max_train_steps: int = _f(0, "training", "Total optimizer steps (0 = from epochs)", min=0, max=MAX_STEPS)
    gradient_accumulation_steps: int = _f(1, "training", "Batches accumulated per optimizer step", min=1, max=MAX_ACCUMULATION)
    gradient_checkpointing: bool = _f(False, "training", "Trade compute for memory")
    mixed_precision: str = _f("no", "training", "Compute precision", choices=MIXED_PRECISION)
    attention: str = _f("sdpa", "training", "Attention kernel", choices=ATTENTION)
    cache_latents: bool = _f(True, "training", "Encode every image once before training")
    cache_latents_to_disk: bool = _f(False, "training", "Keep the latent cache in .npz files next to the images")
    cache_text_encoder_outputs: bool = _f(
        False, "training", "Encode every caption once before training (needs train_text_encoder, shuffle and dropout off)"
    )
    seed: int = _f(42, "training", "Random seed (same seed, same file: see the README for when)", min=0, max=MAX_SEED)
    noise_offset: float = _f(0.0, "training", "Noise offset (0 = off; 0.05-0.1 typical)", min=0.0, max=1.0)
    min_snr_gamma: float = _f(0.0, "training", "Min-SNR weighting gamma (0 = off; 5 typical)", min=0.0, max=MAX_SNR_GAMMA)
    clip_skip: int = _f(1, "training", "Use the output of the n-th last text-encoder layer", min=1, max=12)
    # output
    output_dir: str = _f("output", "output", "Folder the LoRA files are written to")
    output_name: str = _f("lora", "output", "File name of the LoRA (epoch files get -000001 ...)")
    save_every_n_epochs: int = _f(1, "output", "Save a LoRA file every n epochs (0 = only the final one)", min=0, max=MAX_EPOCHS)
    save_precision: str = _f("fp16", "output", "Precision of the saved LoRA", choices=SAVE_PRECISION)
    logging_dir: str = _f("", "output", "TensorBoard folder (empty = no logging)")
    save_state: bool = _f(
        True,
        "output",
        "Save the training state (weights, optimizer, random generators, position) with each LoRA file and at "
        "Stop and save, so train --resume continues the same run",
    )
    resume: str = _f(
        "",
        "output",
        "Continue a stopped run of this output_name: 'latest' (its latest training state) or a state's path "
        "(empty = a new run)",
    )
    save_last_n_states: int = _f(1, "output", "Training states kept per output_name (older ones are removed)", min=1, max=MAX_EPOCHS)
    # grid (epochs x LoRA weights, built at the end of training)
    grid_after_training: bool = _f(True, "grid", "Build the epochs x weights grid when training ends")
    grid_each_epoch: bool = _f(
        False, "grid", "Add the grid's column for each saved epoch as soon as it is saved (training pauses for it)"
    )
    grid_weights: str = _f("0, 0.4, 0.6, 0.8, 1.0", "grid", "LoRA weights of the grid's rows, comma-separated")
    grid_prompt: str = _f("", "grid", "Prompt of the grid (empty = trigger word and the most frequent tags)")
    grid_negative_prompt: str = _f("", "grid", "Negative prompt of the grid")
    grid_seed: int = _f(1234, "grid", "Seed of every grid cell (one fixed seed)", min=0, max=MAX_SEED)
    grid_steps: int = _f(20, "grid", "Sampling steps per grid cell", min=1, max=150)
    grid_cfg_scale: float = _f(7.0, "grid", "CFG scale of the grid", min=1.0, max=30.0)

    # ---------------------------------------------------------------- helpers
    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` for the first invalid field; return self when all are valid."""
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        self._check_output_name()
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise ConfigError("caption_extension", self.caption_extension, "an extension starting with a dot, e.g. .txt")
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", self.alpha_background):
            raise ConfigError("alpha_background", self.alpha_background, "a colour as #rrggbb, e.g. #ffffff")
        if self.optimizer_args:
            parse_optimizer_args(self.optimizer_args)  # raises ConfigError with the offending part
        self.grid_weight_list()  # raises ConfigError for a bad list
        if self.mixed_precision == "fp16" and self.save_precision == "bf16":
            pass  # allowed: kohya allows it too
        return self

    def _check_output_name(self) -> None:
        if not _OUTPUT_NAME_RE.match(self.output_name) or self.output_name in (".", ".."):
            raise ConfigError(
                "output_name",
                self.output_name,
                "letters, digits, space and _ . - ( ) [ ], starting with a letter or digit (no folder separators)",
            )
        problem = name_problem(self.output_name, OUTPUT_NAME_EXTRA_BYTES)
        if problem:
            raise ConfigError("output_name", self.output_name, problem)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """Sectioned TOML, one commented line per field."""
        out: list[str] = []
        section = None
        for f in fields(self):
            sec = f.metadata["section"]
            if sec != section:
                if out:
                    out.append("")
                out.append(f"[{sec}]")
                section = sec
            out.append(f"# {f.metadata['help']}")
            out.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(out) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a flat or sectioned mapping; unknown keys are an error (a typo must not pass)."""
        flat: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        sections = {f.metadata["section"] for f in fields(cls)}
        for key, value in data.items():
            if isinstance(value, dict) and key in sections:
                for k, v in value.items():
                    flat[k] = v
            else:
                flat[key] = value
        unknown = sorted(set(flat) - names)
        if unknown:
            hints = []
            for u in unknown:
                close = _closest(u, names)
                hints.append(f"{u}" + (f" (did you mean {close}?)" if close else ""))
            raise ConfigError(
                unknown[0], flat[unknown[0]], f"a known option; unknown in {source}: {', '.join(hints)}"
            )
        cfg = cls()
        for f in fields(cls):
            if f.name in flat:
                setattr(cfg, f.name, coerce(f, flat[f.name]))
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config", str(p), "an existing TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", str(p), f"valid TOML ({e})") from None
        return cls.from_dict(data, source=str(p))

    def with_overrides(self, pairs: list[str]) -> TrainConfig:
        """Apply ``key=value`` strings (the CLI's ``--set``); values are parsed like TOML values."""
        data = self.to_dict()
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError("--set", pair, "key=value, e.g. --set network_dim=64")
            key, value = pair.split("=", 1)
            key = key.strip()
            if key not in data:
                close = _closest(key, data)
                raise ConfigError(key, value, "a known option" + (f" (did you mean {close}?)" if close else ""))
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]  # a quoted TOML-style string: --set 'output_name="my lora"'
            data[key] = value
        return TrainConfig.from_dict(data, source="--set")

    # derived values ---------------------------------------------------------
    def grid_weight_list(self) -> list[float]:
        try:
            weights = [float(w) for w in self.grid_weights.replace(";", ",").split(",") if w.strip()]
        except ValueError:
            weights = []
        if not weights or len(weights) > MAX_GRID_WEIGHTS or any(not (-5.0 <= w <= 5.0) for w in weights):
            raise ConfigError("grid_weights", self.grid_weights, f"1 to {MAX_GRID_WEIGHTS} comma-separated numbers between -5 and 5, e.g. 0, 0.4, 0.6, 0.8, 1.0")
        return weights

    @property
    def effective_unet_lr(self) -> float:
        return self.unet_lr or self.learning_rate

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate

    @property
    def effective_text_encoder2_lr(self) -> float:
        return self.text_encoder2_lr or self.effective_text_encoder_lr


def _closest(name: str, candidates: Any) -> str | None:
    import difflib

    m = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return m[0] if m else None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert ``value`` (from TOML, JSON or a CLI string) to the field's type, or raise ConfigError."""
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            s = str(value).strip()
            return int(float(s)) if re.fullmatch(r"[+-]?\d+(\.0*)?", s) else int(s)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f.name, value, f"a value of type {typ}") from None
    raise ConfigError(f.name, value, f"a value of type {typ}")


def _check_field(f: dataclasses.Field, value: Any) -> None:
    m = f.metadata
    if "choices" in m and value not in m["choices"]:
        # accept a case-insensitive match by correcting nothing: tell the user the exact spelling
        raise ConfigError(f.name, value, "one of " + ", ".join(m["choices"]))
    if isinstance(value, str) and len(value) > m.get("max_len", MAX_TEXT):
        raise ConfigError(f.name, value, f"a text of at most {m.get('max_len', MAX_TEXT)} characters (it has {len(value)})")
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ConfigError(f.name, value, "a finite number")
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f.name, value, f"a number >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise ConfigError(f.name, value, f"a number <= {hi}" + (f" and >= {lo}" if lo is not None else ""))
    if "multiple" in m and value % m["multiple"]:
        raise ConfigError(f.name, value, f"a multiple of {m['multiple']}")


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """Parse kohya-style ``key=value`` pairs separated by spaces (or commas between pairs).

    ``betas=0.9,0.999`` becomes a tuple, ``True``/``False``/``None`` become Python values,
    numbers become numbers, anything else stays a string.
    """
    result: dict[str, Any] = {}
    parts: list[str] = []
    for word in text.split():
        # "a=1,b=2" holds two pairs; "betas=0.9,0.999" one pair with a tuple value
        pieces = word.split(",")
        parts.append(pieces[0])
        for piece in pieces[1:]:
            if not piece:
                continue  # "a=1, b=2": a comma before a space
            if "=" in piece:
                parts.append(piece)
            else:
                parts[-1] += "," + piece
    for part in parts:
        if "=" not in part:
            raise ConfigError("optimizer_args", text, f"space-separated key=value pairs; '{part}' has no '='")
        key, raw = part.split("=", 1)
        if not key.isidentifier():
            raise ConfigError("optimizer_args", text, f"key=value pairs with a Python name as key; got '{key}'")
        values = [_parse_scalar(v) for v in raw.split(",")] if "," in raw else None
        result[key] = tuple(values) if values is not None else _parse_scalar(raw)
    return result


def _parse_scalar(raw: str) -> Any:
    low = raw.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low == "none":
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw.strip("\"'")


RESUME_MAY_CHANGE = (
    "max_train_epochs",
    "max_train_steps",
    "save_every_n_epochs",
    "save_precision",
    "save_state",
    "save_last_n_states",
    "logging_dir",
    "validation_loss",
    "train_data_dir",  # the dataset itself is compared by its files, sizes, captions and repeats
    "output_dir",
    "resume",
    *(f.name for f in fields(TrainConfig) if f.metadata.get("section") == "grid"),
)
"""Options a resumed run may set otherwise: how long it runs (the learning-rate schedule is then laid over the
new length), what and where it saves and logs, the grid. Every other option defines the run, and a resume
that changes one is refused. Bit-identical files need none changed but the save and grid options."""


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
