"""kohya_ss JSON import/export: the two real presets, mixed types, unknown keys, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.kohya_ss import EXTRA_KEY, export_kohya_ss, import_kohya_ss, save_kohya_ss

# Verbatim copies of two presets from bmaltais/kohya_ss (presets/lora/), as users have them on disk.
SDXL_FACE_JSON = r'''{
    "LoRA_type": "Standard",
    "adaptive_noise_scale": 0.00357,
    "additional_parameters": "",
    "block_alphas": "",
    "block_dims": "",
    "block_lr_zero_threshold": "",
    "bucket_no_upscale": false,
    "bucket_reso_steps": 32,
    "cache_latents": true,
    "cache_latents_to_disk": true,
    "caption_dropout_every_n_epochs": 0.0,
    "caption_dropout_rate": 0,
    "caption_extension": ".txt",
    "clip_skip": "1",
    "color_aug": false,
    "conv_alpha": 4,
    "conv_block_alphas": "",
    "conv_block_dims": "",
    "conv_dim": 4,
    "decompose_both": false,
    "dim_from_weights": false,
    "down_lr_weight": "",
    "enable_bucket": true,
    "epoch": 10,
    "factor": -1,
    "flip_aug": false,
    "full_bf16": false,
    "full_fp16": false,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": true,
    "keep_tokens": 1,
    "learning_rate": 0.0001,
    "lora_network_weights": "",
    "lr_scheduler": "cosine",
    "lr_scheduler_args": "",
    "lr_scheduler_num_cycles": "1",
    "lr_scheduler_power": "",
    "lr_warmup": 0,
    "max_bucket_reso": 2048,
    "max_data_loader_n_workers": "0",
    "max_resolution": "1024,1024",
    "max_timestep": 1000,
    "max_token_length": "75",
    "max_train_epochs": "",
    "max_train_steps": "",
    "mem_eff_attn": false,
    "mid_lr_weight": "",
    "min_bucket_reso": 64,
    "min_snr_gamma": 0,
    "min_timestep": 0,
    "mixed_precision": "bf16",
    "module_dropout": 0,
    "multires_noise_discount": 0,
    "multires_noise_iterations": 0,
    "network_alpha": 46,
    "network_dim": 92,
    "network_dropout": 0,
    "no_token_padding": false,
    "noise_offset": 0.0357,
    "noise_offset_type": "Original",
    "num_cpu_threads_per_process": 2,
    "optimizer": "AdamW8bit",
    "optimizer_args": "",
    "persistent_data_loader_workers": false,
    "prior_loss_weight": 1.0,
    "random_crop": false,
    "rank_dropout": 0,
    "save_every_n_epochs": 2,
    "save_every_n_steps": 0,
    "save_last_n_steps": 0,
    "save_last_n_steps_state": 0,
    "save_precision": "bf16",
    "scale_v_pred_loss_like_noise_pred": false,
    "scale_weight_norms": 1,
    "sdxl": true,
    "sdxl_cache_text_encoder_outputs": false,
    "sdxl_no_half_vae": true,
    "seed": "12345",
    "shuffle_caption": false,
    "stop_text_encoder_training_pct": 0,
    "text_encoder_lr": 0.0001,
    "train_batch_size": 1,
    "train_on_input": false,
    "training_comment": "Good for faces. Use 20 1024x1024 cropped images, 20 repeats, Blip captions, but 'woman' replaced with 'khls woman', https://civitai.com/user/dogu_cat/models",
    "unet_lr": 0.0001,
    "unit": 1,
    "up_lr_weight": "",
    "use_cp": false,
    "log_with": "",
    "v2": false,
    "v_parameterization": false,
    "v_pred_like_loss": 0,
    "vae_batch_size": 0,
    "weighted_captions": false,
    "xformers": "xformers"
}'''

SD15_OPTI_JSON = r'''{
    "LoRA_type": "Standard",
    "additional_parameters": "",
    "block_alphas": "",
    "block_dims": "",
    "block_lr_zero_threshold": "",
    "bucket_no_upscale": true,
    "bucket_reso_steps": 64.0,
    "cache_latents": true,
    "caption_dropout_every_n_epochs": 0.0,
    "caption_dropout_rate": 0,
    "caption_extension": ".txt",
    "clip_skip": 2,
    "color_aug": false,
    "conv_alpha": 1,
    "conv_alphas": "",
    "conv_dim": 1,
    "conv_dims": "",
    "down_lr_weight": "",
    "enable_bucket": false,
    "epoch": 1,
    "flip_aug": false,
    "full_fp16": false,
    "gradient_accumulation_steps": 1.0,
    "gradient_checkpointing": false,
    "keep_tokens": "0",
    "learning_rate": "0.0001",
    "lora_network_weights": "",
    "lr_scheduler": "constant",
    "lr_scheduler_num_cycles": "",
    "lr_scheduler_power": "",
    "lr_warmup": "0",
    "max_data_loader_n_workers": "1",
    "max_resolution": "512,650",
    "max_token_length": "75",
    "max_train_epochs": "",
    "mem_eff_attn": true,
    "mid_lr_weight": "",
    "min_snr_gamma": 0,
    "mixed_precision": "bf16",
    "network_alpha": 64,
    "network_dim": 64,
    "no_token_padding": false,
    "noise_offset": "0.05",
    "num_cpu_threads_per_process": 2,
    "optimizer": "AdamW8bit",
    "optimizer_args": "",
    "persistent_data_loader_workers": false,
    "prior_loss_weight": 1.0,
    "random_crop": false,
    "save_every_n_epochs": 1,
    "save_precision": "bf16",
    "seed": "1234",
    "shuffle_caption": false,
    "stop_text_encoder_training": 0,
    "text_encoder_lr": "5e-05",
    "train_batch_size": 3,
    "training_comment": "",
    "unet_lr": "0.0001",
    "up_lr_weight": "",
    "v2": false,
    "v_parameterization": false,
    "vae_batch_size": 0,
    "xformers": true
}'''


@pytest.fixture
def sdxl_file(tmp_path: Path) -> Path:
    p = tmp_path / "SDXL - LoRA face dogu_cat v1.0.json"
    p.write_text(SDXL_FACE_JSON, encoding="utf-8")
    return p


@pytest.fixture
def sd15_file(tmp_path: Path) -> Path:
    p = tmp_path / "sd15 - EDG_LoraOptiSettings.json"
    p.write_text(SD15_OPTI_JSON, encoding="utf-8")
    return p


def test_sdxl_face_preset_imports_with_its_values(sdxl_file: Path) -> None:
    cfg, unknown, notes = import_kohya_ss(sdxl_file)
    assert cfg.network_type == "Standard"
    assert (cfg.network_dim, cfg.network_alpha) == (92, 46.0)
    assert (cfg.conv_dim, cfg.conv_alpha) == (4, 4.0)
    assert cfg.resolution == 1024  # "1024,1024"
    assert cfg.max_train_epochs == 10 and cfg.max_train_steps == 0  # max_train_steps "" = from epochs
    assert cfg.train_batch_size == 1 and cfg.gradient_accumulation_steps == 1
    assert cfg.save_every_n_epochs == 2
    assert cfg.optimizer == "AdamW8bit" and cfg.optimizer_args == ""
    assert cfg.learning_rate == 1e-4 and cfg.unet_lr == 1e-4 and cfg.text_encoder_lr == 1e-4
    assert cfg.train_text_encoder is True
    assert cfg.lr_scheduler == "cosine"
    assert cfg.lr_scheduler_num_cycles == 1  # "1"
    assert cfg.lr_scheduler_power == 1.0  # "" = sd-scripts' default
    assert cfg.lr_warmup_steps == 0.0
    assert cfg.mixed_precision == "bf16" and cfg.save_precision == "bf16"
    assert cfg.cache_latents is True and cfg.cache_latents_to_disk is True
    assert cfg.gradient_checkpointing is True
    assert cfg.attention == "xformers"  # "xformers" (a string in newer kohya_ss)
    assert cfg.noise_offset == 0.0357 and cfg.min_snr_gamma == 0.0
    assert cfg.keep_tokens == 1 and cfg.shuffle_caption is False
    assert cfg.clip_skip == 1  # "1"
    assert cfg.seed == 12345  # "12345"
    assert cfg.caption_extension == ".txt" and cfg.caption_dropout_rate == 0.0
    assert cfg.prediction_type == "auto"  # v_parameterization false
    # keys without an equivalent are all listed, whatever their value
    for key in ("adaptive_noise_scale", "training_comment", "sdxl_no_half_vae", "bucket_reso_steps", "flip_aug",
                "scale_weight_norms", "multires_noise_iterations", "full_bf16", "max_bucket_reso"):
        assert key in unknown
    for key in ("network_dim", "LoRA_type", "max_resolution", "xformers", "lr_warmup", "epoch", "sdxl", "enable_bucket"):
        assert key not in unknown
    assert unknown == sorted(unknown)
    text = "\n".join(notes)
    assert "sdxl" in text and "enable_bucket" in text
    # values that change training but are not applied are named with their value
    assert "adaptive_noise_scale=0.00357" in text and "scale_weight_norms=1" in text
    assert "flip_aug" not in text  # false: nothing lost


def test_sd15_preset_with_strings_and_empty_values_imports(sd15_file: Path) -> None:
    cfg, unknown, notes = import_kohya_ss(sd15_file)
    assert (cfg.network_dim, cfg.network_alpha) == (64, 64.0)
    assert (cfg.conv_dim, cfg.conv_alpha) == (1, 1.0)
    assert cfg.learning_rate == 1e-4  # "0.0001"
    assert cfg.unet_lr == 1e-4 and cfg.text_encoder_lr == 5e-5  # "0.0001", "5e-05"
    assert cfg.train_text_encoder is True
    assert cfg.noise_offset == 0.05  # "0.05"
    assert cfg.keep_tokens == 0  # "0"
    assert cfg.gradient_accumulation_steps == 1  # 1.0
    assert cfg.lr_scheduler == "constant" and cfg.lr_scheduler_num_cycles == 1  # ""
    assert cfg.lr_warmup_steps == 0.0  # "0"
    assert cfg.clip_skip == 2 and cfg.seed == 1234
    assert cfg.train_batch_size == 3 and cfg.max_train_epochs == 1
    assert cfg.save_every_n_epochs == 1
    assert cfg.mixed_precision == "bf16" and cfg.save_precision == "bf16"
    assert cfg.attention == "xformers"  # true (a boolean in older kohya_ss)
    assert cfg.cache_latents is True and cfg.cache_latents_to_disk is False
    # "512,650" is not square: same pixel count, multiple of 8, and a note says so
    assert cfg.resolution == 576
    assert any("512,650" in n and "576" in n for n in notes)
    assert "stop_text_encoder_training" in unknown and "conv_dims" in unknown and "mem_eff_attn" not in unknown
    assert any("bucket_no_upscale=True" in n for n in notes)


def test_lr_warmup_is_a_percent_of_all_steps() -> None:
    cfg, _, _ = import_kohya_ss({"lr_warmup": "10", "lr_scheduler": "cosine"})
    assert cfg.lr_warmup_steps == 0.1  # our values below 1 are a fraction of all steps
    cfg, _, _ = import_kohya_ss({"lr_warmup": 5})
    assert cfg.lr_warmup_steps == 0.05
    with pytest.raises(ConfigError, match="lr_warmup"):
        import_kohya_ss({"lr_warmup": 150})


@pytest.mark.parametrize(
    ("lora_type", "expected"),
    [("Standard", "Standard"), ("Kohya LoCon", "LoCon"), ("LoCon", "LoCon"), ("LyCORIS/LoCon", "LoCon")],
)
def test_lora_types_map_to_network_type(lora_type: str, expected: str) -> None:
    cfg, _, notes = import_kohya_ss({"LoRA_type": lora_type, "conv_dim": "8", "conv_alpha": 2})
    assert cfg.network_type == expected and cfg.conv_dim == 8 and cfg.conv_alpha == 2.0
    assert any("LyCORIS" in n for n in notes) == (lora_type in ("LoCon", "LyCORIS/LoCon"))


@pytest.mark.parametrize("lora_type", ["LyCORIS/LoHa", "LyCORIS/LoKr", "Kohya DyLoRA", "LyCORIS/iA3", "LoRA-FA"])
def test_unsupported_lora_type_is_a_clear_error(lora_type: str) -> None:
    with pytest.raises(ConfigError) as e:
        import_kohya_ss({"LoRA_type": lora_type})
    assert "LoRA_type" in str(e.value) and "not supported" in str(e.value) and lora_type in str(e.value)


def test_text_encoder_lr_zero_means_unet_only_and_v_parameterization() -> None:
    cfg, _, notes = import_kohya_ss({"text_encoder_lr": 0, "unet_lr": "0.0002", "v_parameterization": True})
    assert cfg.train_text_encoder is False and cfg.unet_lr == 2e-4
    assert cfg.prediction_type == "v_prediction"
    assert any("UNet only" in n for n in notes)
    cfg, _, _ = import_kohya_ss({"network_train_unet_only": True, "text_encoder_lr": 1e-5})
    assert cfg.train_text_encoder is False
    cfg, _, _ = import_kohya_ss({"text_encoder_lr": "", "unet_lr": ""})  # both unset: both at learning_rate
    assert cfg.train_text_encoder is True and cfg.unet_lr == 0.0 and cfg.text_encoder_lr == 0.0


def test_optimizer_scheduler_and_attention_variants() -> None:
    cfg, _, notes = import_kohya_ss(
        {"optimizer": "DAdaptation", "optimizer_args": '"decouple=True" "weight_decay=0.01" "betas=0.9,0.999"',
         "lr_scheduler": "adafactor", "xformers": "sdpa"}
    )
    assert cfg.optimizer == "DAdaptAdam" and cfg.optimizer_args == "decouple=True weight_decay=0.01 betas=0.9,0.999"
    assert cfg.lr_scheduler == "constant" and cfg.attention == "sdpa"
    assert len(notes) == 2
    cfg, _, _ = import_kohya_ss({"optimizer": "adamw8bit", "xformers": "none"})
    assert cfg.optimizer == "AdamW8bit" and cfg.attention == "sdpa"
    with pytest.raises(ConfigError, match="optimizer"):
        import_kohya_ss({"optimizer": "SGDNesterov"})
    with pytest.raises(ConfigError, match="lr_scheduler"):
        import_kohya_ss({"lr_scheduler": "warmup_stable_decay"})


def test_bad_values_name_the_kohya_key() -> None:
    with pytest.raises(ConfigError, match="network_dim"):
        import_kohya_ss({"network_dim": "lots"})
    with pytest.raises(ConfigError, match="train_batch_size"):
        import_kohya_ss({"train_batch_size": 2.5})
    with pytest.raises(ConfigError, match="max_resolution"):
        import_kohya_ss({"max_resolution": "big"})
    with pytest.raises(ConfigError, match="network_dim"):  # validation: rank must be >= 1
        import_kohya_ss({"network_dim": 0})


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="existing"):
        import_kohya_ss(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="valid JSON"):
        import_kohya_ss(bad)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="object"):
        import_kohya_ss(bad)


def test_additional_parameters_are_applied_by_name_or_listed() -> None:
    cfg, _, notes = import_kohya_ss({"additional_parameters": "--lr_warmup_steps 50 --caption_tag_dropout_rate=0.1 --flip_aug --max_grad_norm 0"})
    assert cfg.lr_warmup_steps == 50 and cfg.caption_tag_dropout_rate == 0.1
    assert any("--flip_aug" in n and "--max_grad_norm=0" in n for n in notes)


def test_absent_keys_keep_the_base() -> None:
    base = TrainConfig(output_name="mine", network_dim=16)
    cfg, unknown, notes = import_kohya_ss({"network_alpha": 8}, base=base)
    assert cfg.output_name == "mine" and cfg.network_dim == 16 and cfg.network_alpha == 8.0
    assert unknown == [] and notes == []


@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(),
        TrainConfig(
            pretrained_model="/m/realisticVision.safetensors", train_data_dir="/p/img", output_dir="/p/model",
            logging_dir="/p/log", output_name="ohwx face", network_type="LoCon", network_dim=128, network_alpha=64.0,
            conv_dim=16, conv_alpha=8.0, train_text_encoder=False, optimizer="DAdaptAdam",
            optimizer_args="decouple=True weight_decay=0.01 betas=0.9,0.999", learning_rate=1.0, unet_lr=1.0,
            text_encoder_lr=0.5, lr_scheduler="polynomial", lr_scheduler_power=2.0, lr_warmup_steps=0.07,
            train_batch_size=2, max_train_epochs=12, max_train_steps=1500, gradient_accumulation_steps=2,
            gradient_checkpointing=True, mixed_precision="fp16", attention="xformers", cache_latents=False,
            cache_latents_to_disk=True, seed=7, noise_offset=0.05, min_snr_gamma=5.0, clip_skip=2, resolution=768,
            shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.05, caption_tag_dropout_rate=0.1,
            save_every_n_epochs=0, save_precision="bf16", prediction_type="v_prediction", alpha_background="#000000",
            caption_extension=".caption",
        ),
        TrainConfig(lr_warmup_steps=100, prediction_type="epsilon", text_encoder_lr=0.0, unet_lr=3e-4),
    ],
)
def test_round_trip_export_import(cfg: TrainConfig, tmp_path: Path) -> None:
    cfg.validate()
    data = export_kohya_ss(cfg)
    back, unknown, _notes = import_kohya_ss(data)
    assert back == cfg
    assert unknown == []
    # through a file, as kohya_ss would save and open it
    path = save_kohya_ss(cfg, tmp_path / "run.json")
    assert import_kohya_ss(path)[0] == cfg
    assert json.loads(path.read_text(encoding="utf-8"))["LoRA_type"] in ("Standard", "Kohya LoCon")


def test_export_uses_kohya_ss_keys_and_units() -> None:
    cfg = TrainConfig(resolution=768, lr_warmup_steps=0.1, train_text_encoder=False, max_train_epochs=8,
                      network_type="LoCon", attention="xformers")
    data = export_kohya_ss(cfg)
    assert data["max_resolution"] == "768,768"
    assert data["lr_warmup"] == 10  # percent
    assert data["text_encoder_lr"] == 0  # what tells kohya_ss "UNet only"
    assert data["epoch"] == 8 and data["max_train_steps"] == ""
    assert data["LoRA_type"] == "Kohya LoCon" and data["xformers"] == "xformers"
    assert data["enable_bucket"] is False
    # the text-encoder lr kohya_ss cannot hold travels in our own key
    assert data[EXTRA_KEY] == {"text_encoder_lr": cfg.text_encoder_lr}


def test_real_presets_survive_a_round_trip(sdxl_file: Path, sd15_file: Path) -> None:
    for f in (sdxl_file, sd15_file):
        cfg = import_kohya_ss(f)[0]
        assert import_kohya_ss(export_kohya_ss(cfg))[0] == cfg
