"""The training configuration: TOML in and out, ``--set`` overrides, and validation errors that
name the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from lora_trainer.config import OUTPUT_NAME_EXTRA_BYTES, TrainConfig, field_names, parse_optimizer_args
from lora_trainer.errors import ConfigError
from lora_trainer.filenames import MAX_COMPONENT_BYTES

LONGEST_NAME = MAX_COMPONENT_BYTES - OUTPUT_NAME_EXTRA_BYTES


def _non_defaults() -> TrainConfig:
    """A config where every field differs from its default (so a field dropped on the way shows)."""
    return TrainConfig(
        pretrained_model='C:\\models\\sd "v1.5" ümlaut.safetensors',
        model_config_dir="/configs/sd15",
        prediction_type="v_prediction",
        train_data_dir="/data/my set",
        caption_extension=".caption",
        resolution=768,
        alpha_background="#102030",
        shuffle_caption=True,
        keep_tokens=2,
        caption_dropout_rate=0.05,
        caption_tag_dropout_rate=0.1,
        network_type="LoCon",
        network_dim=64,
        network_alpha=0.5,
        conv_dim=4,
        conv_alpha=2.0,
        train_text_encoder=False,
        optimizer="Prodigy",
        optimizer_args="decouple=True weight_decay=0.01 betas=0.9,0.999",
        learning_rate=1.0,
        unet_lr=3e-5,
        text_encoder_lr=1e-06,
        lr_scheduler="polynomial",
        lr_scheduler_num_cycles=5,
        lr_scheduler_power=2.5,
        lr_warmup_steps=0.1,
        train_batch_size=3,
        max_train_epochs=7,
        max_train_steps=123,
        gradient_accumulation_steps=4,
        gradient_checkpointing=True,
        mixed_precision="bf16",
        attention="xformers",
        cache_latents=False,
        cache_latents_to_disk=True,
        cache_text_encoder_outputs=True,
        text_encoder2_lr=3e-5,
        enable_bucket=True,
        min_bucket_reso=320,
        max_bucket_reso=768,
        bucket_reso_steps=32,
        bucket_no_upscale=True,
        seed=0,
        noise_offset=0.0357,
        min_snr_gamma=5.0,
        clip_skip=2,
        output_dir="out dir",
        output_name="my lora (v2) [test]",
        save_every_n_epochs=3,
        save_precision="bf16",
        logging_dir="logs",
        save_state=False,
        save_last_n_states=3,
        resume="latest",
        validation_loss=False,
        validation_split=0.2,
        grid_after_training=False,
        grid_each_epoch=True,
        grid_weights="0, 0.5, 1",
        grid_prompt="ohwx woman, smiling",
        grid_negative_prompt="blurry",
        grid_seed=77,
        grid_steps=12,
        grid_cfg_scale=5.5,
    )


def test_every_field_differs_from_default_in_the_fixture():
    cfg, default = _non_defaults().to_dict(), TrainConfig().to_dict()
    same = [k for k in field_names() if cfg[k] == default[k]]
    assert same == []  # keeps the round trip below meaningful when fields are added


def test_toml_round_trip(tmp_path):
    cfg = _non_defaults().validate()
    path = tmp_path / "c.toml"
    cfg.save(path)
    back = TrainConfig.load(path)
    assert back == cfg
    for name in field_names():  # same value and same type (1.0 must not come back as int 1)
        assert type(getattr(back, name)) is type(getattr(cfg, name)), name
    # the file is sectioned and commented
    text = path.read_text(encoding="utf-8")
    assert "[network]" in text and "[optimizer]" in text and "\n# " in text


def test_default_toml_round_trip(tmp_path):
    TrainConfig().save(tmp_path / "d.toml")
    assert TrainConfig.load(tmp_path / "d.toml") == TrainConfig()


def test_flat_and_sectioned_toml_load_the_same(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text(
        'optimizer = "Lion"\nnetwork_dim = 16\nresolution = 640\ntrain_text_encoder = false\nunet_lr = 2e-4\n',
        encoding="utf-8",
    )
    sectioned = tmp_path / "sec.toml"
    sectioned.write_text(
        '[optimizer]\noptimizer = "Lion"\nunet_lr = 2e-4\n\n[network]\nnetwork_dim = 16\ntrain_text_encoder = false\n'
        "\n[dataset]\nresolution = 640\n",
        encoding="utf-8",
    )
    a, b = TrainConfig.load(flat), TrainConfig.load(sectioned)
    assert a == b
    assert (a.optimizer, a.network_dim, a.resolution, a.train_text_encoder, a.unet_lr) == ("Lion", 16, 640, False, 2e-4)
    # the rest keeps its defaults
    assert a.network_alpha == TrainConfig().network_alpha


def test_unknown_key_names_it_with_a_hint(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[network]\nnetwork_dimm = 16\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(path)
    msg = str(e.value)
    assert "network_dimm" in msg and "did you mean network_dim?" in msg
    assert e.value.field == "network_dimm"


def test_unknown_top_level_key_and_unknown_section():
    with pytest.raises(ConfigError, match=r"learning_rat.*did you mean learning_rate\?"):
        TrainConfig.from_dict({"learning_rat": 1e-4})
    with pytest.raises(ConfigError, match="trainig"):
        TrainConfig.from_dict({"trainig": {"seed": 1}})


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("network_dim = = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="valid TOML"):
        TrainConfig.load(bad)
    with pytest.raises(ConfigError, match="nope.toml"):
        TrainConfig.load(tmp_path / "nope.toml")


def test_set_overrides_convert_types():
    cfg = TrainConfig().with_overrides(
        [
            "network_dim=64",
            "unet_lr=1e-3",
            "network_alpha=8",  # an int string for a float field
            "train_text_encoder=false",
            "gradient_checkpointing=yes",
            "optimizer=Lion",
            "output_name=my lora",
            "optimizer_args=decouple=True weight_decay=0.01",  # '=' in the value
            " seed = 7 ",
        ]
    )
    assert cfg.network_dim == 64 and type(cfg.network_dim) is int
    assert cfg.unet_lr == 1e-3 and type(cfg.unet_lr) is float
    assert cfg.network_alpha == 8.0 and type(cfg.network_alpha) is float
    assert cfg.train_text_encoder is False and cfg.gradient_checkpointing is True
    assert cfg.optimizer == "Lion" and cfg.output_name == "my lora"
    assert cfg.optimizer_args == "decouple=True weight_decay=0.01"
    assert cfg.seed == 7
    # the original is not modified
    assert TrainConfig().network_dim == 32


def test_set_quoted_string_like_toml():
    cfg = TrainConfig().with_overrides(['output_name="my lora"', "alpha_background='#000000'"]).validate()
    assert cfg.output_name == "my lora" and cfg.alpha_background == "#000000"


@pytest.mark.parametrize(
    "pair, field",
    [("network_dim=abc", "network_dim"), ("unet_lr=fast", "unet_lr"), ("cache_latents=maybe", "cache_latents"),
     ("network_dim=3.5", "network_dim"), ("seed=true", "seed")],
)
def test_set_non_convertible_value(pair, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig().with_overrides([pair])
    assert e.value.field == field
    value = pair.split("=", 1)[1]
    assert f"'{field}'" in str(e.value) and value in str(e.value) and "type" in str(e.value)


def test_set_unknown_key_and_missing_equals():
    with pytest.raises(ConfigError, match=r"netwrk_dim.*did you mean network_dim\?"):
        TrainConfig().with_overrides(["netwrk_dim=4"])
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig().with_overrides(["network_dim"])


# field, value, words the "allowed" part must contain
INVALID = [
    ("optimizer", "adamw", ["AdamW", "Prodigy"]),
    ("lr_scheduler", "cosine_restarts", ["cosine_with_restarts"]),
    ("mixed_precision", "fp32", ["no", "bf16"]),
    ("network_type", "LoHa", ["Standard", "LoCon"]),
    ("network_dim", 0, [">= 1"]),
    ("network_dim", 2048, ["<= 1024"]),
    ("resolution", 32, [">= 64"]),
    ("resolution", 500, ["multiple of 8"]),
    ("caption_dropout_rate", 1.5, ["<= 1"]),
    ("learning_rate", -1e-4, [">= 0"]),
    ("noise_offset", float("nan"), ["finite"]),
    ("output_name", "sub/lora", ["no folder separators"]),
    ("output_name", "..", ["no folder separators"]),
    ("output_name", "../lora", ["no folder separators"]),
    ("output_name", "", ["letters, digits"]),
    ("caption_extension", "txt", ["starting with a dot"]),
    ("caption_extension", ".", ["starting with a dot"]),
    ("alpha_background", "white", ["#rrggbb"]),
    ("alpha_background", "#fff", ["#rrggbb"]),
    ("optimizer_args", "decouple", ["decouple", "no '='"]),
    ("optimizer_args", "weight decay=0.1", ["weight", "no '='"]),
    ("optimizer_args", "1x=2", ["1x", "Python name"]),
    # upper bounds: each size option, one past what is allowed
    ("resolution", 100_000, ["<= 4096"]),
    ("resolution", 4104, ["<= 4096"]),
    ("min_bucket_reso", 8192, ["<= 4096"]),
    ("max_bucket_reso", 8192, ["<= 4096"]),
    ("bucket_reso_steps", 2048, ["<= 1024"]),
    ("train_batch_size", 257, ["<= 256"]),
    ("gradient_accumulation_steps", 257, ["<= 256"]),
    ("network_dim", 1025, ["<= 1024"]),
    ("network_alpha", 1025.0, ["<= 1024"]),
    ("conv_dim", 1025, ["<= 1024"]),
    ("conv_alpha", 1e9, ["<= 1024"]),
    ("max_train_epochs", 10_001, ["<= 10000"]),
    ("max_train_steps", 1_000_001, ["<= 1000000"]),
    ("lr_warmup_steps", 1e7, ["<= 1000000"]),
    ("lr_scheduler_num_cycles", 1001, ["<= 1000"]),
    ("save_every_n_epochs", 10_001, ["<= 10000"]),
    ("keep_tokens", 226, ["<= 225"]),
    ("seed", 2**32, ["<= 4294967295"]),
    ("grid_seed", 2**63, ["<= 4294967295"]),
    ("grid_weights", ",".join(["1"] * 21), ["1 to 20"]),
    ("grid_prompt", "tag, " * 1000, ["at most 4096 characters", "it has 5000"]),
    ("pretrained_model", "x" * 5000, ["at most 4096"]),
    ("caption_extension", "." + "t" * 20, ["at most 16"]),
    # output_name: valid on Windows too, and short enough for every file written from it
    ("output_name", "a" * (LONGEST_NAME + 1), [f"at most {LONGEST_NAME} bytes", f"it has {LONGEST_NAME + 1}"]),
    ("output_name", "con", ["Windows device name"]),
    ("output_name", "CON", ["Windows device name"]),
    ("output_name", "nul.tar", ["Windows device name"]),
    ("output_name", "Com1", ["Windows device name"]),
    ("output_name", "lpt9 .x", ["Windows device name"]),
    ("output_name", "lora.", ["end with a dot"]),
    ("output_name", "lora ", ["end with a dot or a space"]),
]


@pytest.mark.parametrize("field, value, allowed", INVALID, ids=[f"{f}={v!r}"[:60] for f, v, _ in INVALID])
def test_invalid_values_name_field_value_and_allowed(field, value, allowed):
    cfg = dataclasses.replace(TrainConfig(), **{field: value})
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    assert e.value.field == field
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."  # long values are cut
    assert msg.startswith(f"Invalid value for '{field}': {shown}")
    for word in allowed:
        assert word in msg, (word, msg)


def test_valid_edge_values_pass():
    ok = dataclasses.replace(
        TrainConfig(),
        resolution=64,
        network_dim=1024,
        caption_dropout_rate=1.0,
        output_name="a..b (1) [x]",
        caption_extension=".TXT",
        alpha_background="#AbCdEf",
        noise_offset=0.0,
    )
    assert ok.validate() is ok


def test_upper_bounds_themselves_pass():
    ok = dataclasses.replace(
        TrainConfig(),
        resolution=4096,
        max_bucket_reso=4096,
        train_batch_size=256,
        network_dim=1024,
        network_alpha=1024.0,
        max_train_epochs=10_000,
        max_train_steps=1_000_000,
        seed=2**32 - 1,
        output_name="a" * LONGEST_NAME,
        grid_weights=",".join(["1"] * 20),
    )
    assert ok.validate() is ok


def test_longest_output_name_fits_every_file_written_from_it(tmp_path):
    """The epoch file, the grid with a 12-digit number and their temporary files, written for real:
    one byte more and the longest of them passes the file system's 255 bytes."""
    from lora_trainer.config import OUTPUT_NAME_EXTRA_BYTES
    from lora_trainer.filenames import MAX_COMPONENT_BYTES
    from lora_trainer.files import write_file

    name = dataclasses.replace(TrainConfig(), output_name="a" * (MAX_COMPONENT_BYTES - OUTPUT_NAME_EXTRA_BYTES)).validate().output_name
    for file in (f"{name}-000001.safetensors", f"{name}_grid-{10**11}.png"):
        write_file(tmp_path / file, b"x")
        assert (tmp_path / file).is_file()
    with pytest.raises(OSError):
        write_file(tmp_path / f"{name}a_grid-{10**11}.png", b"x")


@pytest.mark.parametrize("name", ["console", "con_1", "nul-lora", "COM10", "LPT0", "my.con", "a.b"])
def test_names_that_only_look_like_windows_devices_pass(name):
    assert dataclasses.replace(TrainConfig(), output_name=name).validate().output_name == name


def test_huge_value_is_shortened_in_the_message():
    cfg = dataclasses.replace(TrainConfig(), output_name="x" * 30_000_000)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    assert len(msg) < 300 and "30000000 characters" in msg and e.value.field == "output_name"


def test_invalid_values_from_toml_and_set_are_caught_too(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[dataset]\nresolution = 500\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="multiple of 8"):
        TrainConfig.load(p).validate()
    with pytest.raises(ConfigError, match="'optimizer'"):
        TrainConfig().with_overrides(["optimizer=SGD"]).validate()


def test_parse_optimizer_args():
    args = parse_optimizer_args("decouple=True weight_decay=0.01 betas=0.9,0.999")
    assert args == {"decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.999)}
    assert type(args["decouple"]) is bool and type(args["betas"]) is tuple
    more = parse_optimizer_args("use_bias_correction=False d0=1e-6 safeguard_warmup=None eps=1 mode=fast")
    assert more == {"use_bias_correction": False, "d0": 1e-6, "safeguard_warmup": None, "eps": 1, "mode": "fast"}
    assert type(more["eps"]) is int
    assert parse_optimizer_args("") == {}
    # pairs separated by commas (as the docstring promises), and "a=1, b=2"
    assert parse_optimizer_args("decouple=True,weight_decay=0.01,betas=0.9,0.999") == args
    assert parse_optimizer_args("decouple=True, weight_decay=0.01, betas=0.9,0.999") == args
