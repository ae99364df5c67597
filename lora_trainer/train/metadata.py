"""The ``__metadata__`` every LoRA file carries (kohya ``ss_*`` keys and ``modelspec.*``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ..config import TrainConfig
from ..model.bundle import ModelBundle


@dataclass
class RunInfo:
    session_id: str
    started_at: float
    num_images: int
    num_samples: int
    epochs: int
    total_steps: int
    dataset_dirs: dict
    tag_frequency: dict
    world_size: int = 1
    batches_per_epoch: int = 0
    cache_latents: bool = True
    bucket_info: dict | None = None
    """kohya's ``ss_bucket_info`` when aspect-ratio buckets are on."""


def build_metadata(
    cfg: TrainConfig, bundle: ModelBundle, run: RunInfo, *, output_name: str, epoch: int, step: int
) -> dict[str, str]:
    now = time.time()
    network_args: dict[str, str] = {}
    if cfg.network_type == "LoCon":
        network_args = {"conv_dim": str(cfg.conv_dim), "conv_alpha": str(cfg.conv_alpha), "algo": "locon"}
    v2 = bundle.family == "sd2"
    meta = {
        "ss_session_id": run.session_id,
        "ss_training_started_at": str(run.started_at),
        "ss_training_finished_at": str(now),
        "ss_output_name": output_name,
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "ss_base_model_version": bundle.base_model_version,
        "ss_v2": str(v2),
        "ss_sd_model_name": bundle.model_name,
        "ss_new_sd_model_hash": bundle.model_hash or "",
        "ss_vae_name": bundle.vae_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.network_dim),
        "ss_network_alpha": str(cfg.network_alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_num_train_images": str(run.num_samples),
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": str(run.batches_per_epoch),
        "ss_num_epochs": str(run.epochs),
        "ss_max_train_steps": str(run.total_steps),
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_total_batch_size": str(cfg.train_batch_size * cfg.gradient_accumulation_steps * run.world_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.effective_unet_lr),
        "ss_text_encoder_lr": str(cfg.effective_text_encoder_lr if cfg.train_text_encoder else 0.0),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": cfg.optimizer + (f"({cfg.optimizer_args})" if cfg.optimizer_args else ""),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": "False",
        "ss_seed": str(cfg.seed),
        "ss_noise_offset": str(cfg.noise_offset) if cfg.noise_offset else "None",
        "ss_min_snr_gamma": str(cfg.min_snr_gamma) if cfg.min_snr_gamma else "None",
        "ss_clip_skip": str(cfg.clip_skip),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(cfg.caption_tag_dropout_rate),
        "ss_cache_latents": str(run.cache_latents),
        "ss_enable_bucket": str(cfg.enable_bucket),
        "ss_max_token_length": "None",
        "ss_prior_loss_weight": "1.0",
        "ss_dataset_dirs": json.dumps(run.dataset_dirs, ensure_ascii=False),
        "ss_tag_frequency": json.dumps(run.tag_frequency, ensure_ascii=False),
        "ss_training_comment": "trained with lora_trainer",
        # modelspec (Stability AI's model metadata standard)
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": bundle.modelspec_architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if bundle.family == "sdxl"
        else "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if bundle.prediction_type == "v_prediction" else "epsilon",
        "modelspec.encoder_layer": str(cfg.clip_skip),
    }
    if cfg.enable_bucket:
        meta["ss_min_bucket_reso"] = str(cfg.min_bucket_reso)
        meta["ss_max_bucket_reso"] = str(cfg.max_bucket_reso)
        meta["ss_bucket_no_upscale"] = str(cfg.bucket_no_upscale)
        if run.bucket_info is not None:
            meta["ss_bucket_info"] = json.dumps(run.bucket_info)
    if bundle.family == "sdxl" and cfg.train_text_encoder:
        meta["ss_text_encoder_lr"] = json.dumps([cfg.effective_text_encoder_lr, cfg.effective_text_encoder2_lr])
    return meta
