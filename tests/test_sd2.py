"""SD2 in the shared core: a tiny SD2-architecture model (OpenCLIP-H as HF CLIPTextModel, linear
projections, v-prediction from the scheduler config), kohya keys diffusers loads, metadata."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.model.sd import DiffusersSD, make_sd_bundle
from lora_trainer.model.tiny import SD_SCHEDULER, TINY_UNET, TINY_VAE, write_tiny_tokenizer
from lora_trainer.network import LoRANetwork
from lora_trainer.train.loop import train

TE_WIDTH = 48


def build_tiny_sd2(seed: int, tokenizer_dir, prediction_type: str = "v_prediction") -> DiffusersSD:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tiny_tokenizer(tokenizer_dir)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **{**TINY_UNET, "cross_attention_dim": TE_WIDTH, "use_linear_projection": True, "attention_head_dim": [2, 4]}
    )
    te = CLIPTextModel(  # OpenCLIP-H as diffusers keeps it: HF CLIPTextModel, gelu, the last layer dropped
        CLIPTextConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            hidden_size=TE_WIDTH,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=TE_WIDTH,
        )
    )
    sched = {**SD_SCHEDULER, "prediction_type": prediction_type}
    return DiffusersSD(
        unet=unet, vae=AutoencoderKL(**TINY_VAE), text_encoder=te, tokenizer=tok, scheduler_config=sched, family="sd2", name="tiny-sd2"
    )


@pytest.fixture(scope="module")
def _tiny_sd2_master(tmp_path_factory):
    return build_tiny_sd2(0, tmp_path_factory.mktemp("tok2"))


@pytest.fixture
def tiny_sd2(_tiny_sd2_master):
    return copy.deepcopy(_tiny_sd2_master)


def _outputs(parts, ids, x, t):
    with torch.no_grad():
        cond = parts.text_encoder(ids)[0]
        return cond, parts.unet(x, t, encoder_hidden_states=cond).sample


def test_v_prediction_and_metadata_from_the_scheduler(tiny_sd2, tiny_config, tmp_path):
    from lora_trainer.model.loading import load_sd
    from lora_trainer.model.tiny import save_diffusers_folder

    bundle = make_sd_bundle(tiny_sd2)
    assert bundle.prediction_type == "v_prediction"
    assert bundle.base_model_version == "sd_v2_v"
    assert make_sd_bundle(tiny_sd2, prediction_type="epsilon").base_model_version == "sd_v2"
    cfg = tiny_config
    cfg.max_train_epochs = 1
    result = train(cfg, bundle)
    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    # loading a diffusers folder: SD2 recognised, v-prediction read from its scheduler config
    folder = save_diffusers_folder(tiny_sd2, tmp_path / "tiny-sd2")
    parts = load_sd(folder)
    assert parts.family == "sd2"
    assert make_sd_bundle(parts).base_model_version == "sd_v2_v"


def test_diffusers_loads_every_key_and_matches(tiny_sd2, tiny_config, tmp_path):
    pytest.importorskip("peft")
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    cfg = tiny_config
    cfg.max_train_epochs = 1
    cfg.save_precision = "float"
    reference = copy.deepcopy(tiny_sd2)
    result = train(cfg, make_sd_bundle(tiny_sd2))
    network: LoRANetwork = result.network
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    from lora_trainer.network.save import save_lora_file

    path = tmp_path / "lora.safetensors"
    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    save_lora_file(path, network.kohya_state_dict(torch.float32), meta)
    sd = load_file(path)
    n_unet = len({k.split(".")[0] for k in sd if k.startswith("lora_unet_")})
    n_te = len({k.split(".")[0] for k in sd if k.startswith("lora_te_")})
    assert n_te == 2 * 6 and n_unet > 0
    # the tiny SD2 UNet has one ResBlock per level, not SD2's layout: LDM names (SD2 itself keeps diffusers names)
    assert any(k.startswith("lora_unet_input_blocks_1_1_proj_in") for k in sd)

    ids = tiny_sd2.tokenizer([ "ohwx, ring"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    base = _outputs(reference, ids, x, t)
    network.attach()
    try:
        ours = _outputs(tiny_sd2, ids, x, t)
    finally:
        network.detach()
    assert not torch.allclose(ours[1], base[1], atol=1e-3)
    pipe = StableDiffusionPipeline(
        vae=reference.vae,
        text_encoder=reference.text_encoder,
        tokenizer=reference.tokenizer,
        unet=reference.unet,
        scheduler=DDPMScheduler.from_config(reference.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # diffusers' SD1/SD2 pipeline remaps LDM-named UNet layers only when given the UNet's config
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours", unet_config=reference.unet.config)
    theirs = _outputs(reference, ids, x, t)
    torch.testing.assert_close(theirs[0], ours[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs[1], ours[1], atol=1e-5, rtol=1e-4)
    from peft.tuners.lora import LoraLayer

    assert sum(isinstance(m, LoraLayer) for m in reference.unet.modules()) == n_unet
    assert sum(isinstance(m, LoraLayer) for m in reference.text_encoder.modules()) == n_te


def test_sd2_single_file_in_a1111_layout_loads_offline(tiny_sd2, tmp_path):
    """An SD2 checkpoint as A1111 keeps it (OpenCLIP text tower under cond_stage_model.model. with
    fused q/k/v) loads with its diffusers folder as model_config_dir: same weights, SD2, v-prediction."""
    from safetensors.torch import save_file

    from lora_trainer.model.ldm_names import to_a1111_checkpoint
    from lora_trainer.model.loading import load_sd
    from lora_trainer.model.sdxl import openclip_from_hf_state_dict
    from lora_trainer.model.tiny import save_diffusers_folder

    folder = save_diffusers_folder(tiny_sd2, tmp_path / "tiny-sd2")
    ckpt = to_a1111_checkpoint(
        tiny_sd2.unet.state_dict(), tiny_sd2.vae.state_dict(), {}, dict(tiny_sd2.unet.config), dict(tiny_sd2.vae.config)
    )
    te = dict(tiny_sd2.text_encoder.state_dict())
    te["text_projection.weight"] = torch.eye(TE_WIDTH)  # OpenCLIP-H files carry it; SD2 does not use it
    openclip = openclip_from_hf_state_dict(te, prefix="cond_stage_model.model.")
    assert any(k.endswith("attn.in_proj_weight") for k in openclip)
    ckpt.update(openclip)
    path = tmp_path / "sd2-tiny.safetensors"
    save_file({k: v.detach().contiguous() for k, v in ckpt.items()}, str(path))

    parts = load_sd(path, folder)
    assert parts.family == "sd2"
    assert make_sd_bundle(parts).base_model_version == "sd_v2_v"
    for name in ("unet", "vae", "text_encoder"):
        ours = getattr(tiny_sd2, name).state_dict()
        loaded = getattr(parts, name).state_dict()
        for k, v in ours.items():
            if k.endswith("position_ids"):
                continue
            assert torch.equal(loaded[k].to(v.dtype), v), f"{name}: {k}"
