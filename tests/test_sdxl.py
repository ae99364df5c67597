"""SDXL in the shared core: the tiny SDXL model, its SGM single file, kohya names checked against
diffusers' own converters and loader, metadata, training and clean removal."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.errors import ConfigError
from lora_trainer.model.sdxl import (
    SDXLCond,
    encode_sdxl_text,
    make_sdxl_bundle,
    sdxl_unet_name_map,
    to_sgm_checkpoint,
)
from lora_trainer.network import LoRANetwork
from lora_trainer.network.targets import UNET_ATTENTION_CONTAINERS, UNET_CONV_CONTAINERS, find_targets
from lora_trainer.train.events import EventBus, StepEvent
from lora_trainer.train.loop import train

PROMPT = "ohwx, ring, blue background"


@pytest.fixture(scope="module")
def _tiny_sdxl_master(tmp_path_factory):
    from lora_trainer.model.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(seed=0, tokenizer_dir=tmp_path_factory.mktemp("tokxl"))


@pytest.fixture
def tiny_sdxl(_tiny_sdxl_master):
    return copy.deepcopy(_tiny_sdxl_master)


def _randomize(network: LoRANetwork, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)


def _outputs(parts, x, t, sizes=((64, 48, 4, 0, 64, 64),)):
    """Conditioning and UNet output computed as diffusers' SDXL pipeline does, independently of the bundle."""
    with torch.no_grad():
        cond = encode_sdxl_text(parts.text_encoder, parts.text_encoder_2, parts.tokenizer, parts.tokenizer_2, [PROMPT], "cpu")
        time_ids = torch.tensor([list(s) for s in sizes], dtype=torch.float32)
        out = parts.unet(
            x, t, encoder_hidden_states=cond.hidden, added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}
        ).sample
    return cond, out


def _pipeline(parts):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=parts.unet,
        scheduler=EulerDiscreteScheduler.from_config(parts.scheduler_config),
    )


# ------------------------------------------------------------------------------------------ model


def test_bundle_conditioning_matches_the_diffusers_pipeline(tiny_sdxl):
    """encode_text: penultimate states of both encoders concatenated + te2 text_embeds, as diffusers."""
    pipe = _pipeline(tiny_sdxl)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        bundle = make_sdxl_bundle(tiny_sdxl)
        cond = bundle.encode_text([PROMPT])
    torch.testing.assert_close(cond.hidden, pe)
    torch.testing.assert_close(cond.pooled, pooled)
    # time ids: original size + crop top-left + target size, as the pipeline's _get_add_time_ids
    ids = pipe._get_add_time_ids((80, 64), (8, 0), (64, 64), dtype=torch.float32, text_encoder_projection_dim=32)
    c = bundle.condition(cond, [(80, 64, 8, 0, 64, 64)])
    torch.testing.assert_close(c.time_ids, ids)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        a = bundle.predict(x, t, c)
        b = bundle.predict(x, t, cond)  # no sizes: the latents' own square size, uncropped
        ref = _outputs(tiny_sdxl, x, t, sizes=((64, 64, 0, 0, 64, 64),))[1]
    assert not torch.allclose(a, b, atol=1e-4), "size conditioning must reach the UNet"
    torch.testing.assert_close(b, ref)


def test_sgm_single_file_loads_in_diffusers(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lora_trainer.model.loading import load_sd
    from lora_trainer.model.sdxl import DiffusersSDXL
    from lora_trainer.model.tiny_sdxl import save_sdxl_diffusers_folder, save_sdxl_single_file

    folder = save_sdxl_diffusers_folder(tiny_sdxl, tmp_path / "tiny-sdxl")
    path = save_sdxl_single_file(tiny_sdxl, tmp_path / "tiny-sdxl.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(tiny_sdxl, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(ours) == set(theirs), name
        for k in ours:
            assert torch.equal(ours[k].float(), theirs[k].float()), (name, k)
    # pooled output through the loaded second encoder (text_projection orientation)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = _outputs(tiny_sdxl, x, torch.tensor([3])), _outputs(pipe, x, torch.tensor([3]))
    torch.testing.assert_close(a[0].pooled, b[0].pooled)
    torch.testing.assert_close(a[1], b[1])
    # our loader: both the single file (detected by its keys) and the folder give SDXL parts
    for source in (path, folder):
        parts = load_sd(source, folder if source == path else None)
        assert isinstance(parts, DiffusersSDXL)
        assert make_sdxl_bundle(parts).base_model_version == "sdxl_base_v1-0"


def test_unet_lora_names_are_sgm_names_as_diffusers_converts_them(tiny_sdxl):
    """Every lora_unet_ name, '.'-joined, is an SGM module path whose weight diffusers' own
    convert_ldm_unet_checkpoint turns back into the very diffusers layer the LoRA wraps."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_sdxl.unet
    ckpt = to_sgm_checkpoint(tiny_sdxl)
    converted = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    name_map = sdxl_unet_name_map(dict(unet.config))
    diffusers_targets = find_targets(unet, "x", UNET_ATTENTION_CONTAINERS, UNET_CONV_CONTAINERS)
    ours = make_sdxl_bundle(tiny_sdxl).unet_targets(True)
    assert len(ours) == len(diffusers_targets) > 0
    paths = {id(m): n for n, m in unet.named_modules()}
    for t in ours:
        d = paths[id(t.module)]
        sgm = name_map(d)
        assert t.lora_name == "lora_unet_" + sgm.replace(".", "_")
        assert sgm.startswith(("input_blocks.", "middle_block.", "output_blocks.")), sgm
        w = ckpt["model.diffusion_model." + sgm + ".weight"]
        assert torch.equal(w, t.module.weight)
        assert torch.equal(converted[d + ".weight"], w)


def test_real_sdxl_target_counts():
    """722 UNet + 72 TE1 + 192 TE2 modules on SDXL base (built on the meta device: no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.model.sdxl import sdxl_text_encoder_targets, sdxl_unet_targets

    unet_cfg = {
        "sample_size": 128,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280)
        )
    names = [t.lora_name for t in sdxl_unet_targets(unet, False)]
    assert len(names) == 722
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in names
    assert "lora_unet_output_blocks_0_1_proj_out" in names
    te = [t.lora_name for t in sdxl_text_encoder_targets(te1, te2)]
    assert sum(n.startswith("lora_te1_") for n in te) == 72
    assert sum(n.startswith("lora_te2_") for n in te) == 192
    assert "lora_te2_text_model_encoder_layers_31_self_attn_v_proj" in te
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in te


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("network_type", ["Standard", "LoCon"])
def test_diffusers_loads_every_key_and_matches(tiny_sdxl, tiny_config, tmp_path, network_type):
    pytest.importorskip("peft")
    cfg = tiny_config
    cfg.network_type = network_type
    cfg.conv_dim, cfg.conv_alpha = 3, 1.5
    cfg.max_train_epochs = 1
    cfg.save_precision = "float"
    reference = copy.deepcopy(tiny_sdxl)
    result = train(cfg, make_sdxl_bundle(tiny_sdxl))
    network = result.network
    _randomize(network)
    path = tmp_path / "lora.safetensors"
    from lora_trainer.network.save import save_lora_file

    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    save_lora_file(path, network.kohya_state_dict(torch.float32), meta)
    sd = load_file(path)
    modules = {k.split(".")[0] for k in sd}
    n_unet = sum(m.startswith("lora_unet_") for m in modules)
    n_te1 = sum(m.startswith("lora_te1_") for m in modules)
    n_te2 = sum(m.startswith("lora_te2_") for m in modules)
    assert n_unet + n_te1 + n_te2 == len(modules)
    assert n_te1 == n_te2 == 2 * 6
    assert any("_self_attn_q_proj" in m for m in modules if m.startswith("lora_te2_"))
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for m in modules if m.startswith("lora_unet_"))
    if network_type == "LoCon":
        assert any(m.endswith("_in_layers_2") for m in modules)
        assert any(m.endswith("_op") for m in modules)

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    base_cond, base_out = _outputs(reference, x, t)
    network.attach()
    try:
        ours_cond, ours_out = _outputs(tiny_sdxl, x, t)
        network.set_multiplier(0.5)
        ours_half = _outputs(tiny_sdxl, x, t)[1]
    finally:
        network.detach()
        network.set_multiplier(1.0)
    assert not torch.allclose(ours_out, base_out, atol=1e-3)
    assert not torch.allclose(ours_cond.hidden, base_cond.hidden, atol=1e-3)
    assert not torch.allclose(ours_cond.pooled, base_cond.pooled, atol=1e-3)

    pipe = _pipeline(reference)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours")
    theirs_cond, theirs_out = _outputs(reference, x, t)
    torch.testing.assert_close(theirs_cond.hidden, ours_cond.hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_cond.pooled, ours_cond.pooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_out, ours_out, atol=1e-5, rtol=1e-4)
    pipe.set_adapters(["ours"], adapter_weights=[0.5])
    torch.testing.assert_close(_outputs(reference, x, t)[1], ours_half, atol=1e-5, rtol=1e-4)

    from peft.tuners.lora import LoraLayer

    counts = tuple(
        sum(isinstance(m, LoraLayer) for m in getattr(reference, n).modules()) for n in ("unet", "text_encoder", "text_encoder_2")
    )
    assert counts == (n_unet, n_te1, n_te2)


def test_metadata_and_separate_text_encoder_rates(tiny_sdxl, tiny_config):
    cfg = tiny_config
    cfg.text_encoder_lr, cfg.text_encoder2_lr = 5e-4, 2e-4
    cfg.max_train_epochs = 1
    events = EventBus()
    steps: list[StepEvent] = []
    events.subscribe(lambda e: steps.append(e) if isinstance(e, StepEvent) else None)
    result = train(cfg, make_sdxl_bundle(tiny_sdxl), events)
    assert steps and steps[0].lrs == {
        "unet": pytest.approx(1e-3),
        "text_encoder": pytest.approx(5e-4),
        "text_encoder2": pytest.approx(2e-4),
    }
    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_v2"] == "False"
    assert json.loads(meta["ss_text_encoder_lr"]) == [5e-4, 2e-4]
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}


def test_unet_only_training_has_no_text_encoder_keys(tiny_sdxl, tiny_config):
    cfg = tiny_config
    cfg.train_text_encoder = False
    cfg.max_train_epochs = 1
    result = train(cfg, make_sdxl_bundle(tiny_sdxl))
    keys = load_file(result.files[-1])
    assert keys and all(k.startswith("lora_unet_") for k in keys)


def test_training_leaves_model_bit_identical(tiny_sdxl, tiny_config):
    before = {n: copy.deepcopy(getattr(tiny_sdxl, n).state_dict()) for n in ("unet", "text_encoder", "text_encoder_2")}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10])
    out_before = _outputs(tiny_sdxl, x, t)
    result = train(tiny_config, make_sdxl_bundle(tiny_sdxl))
    assert result.steps > 0 and all(p.exists() for p in result.files)
    assert all(math.isfinite(v) for v in result.losses)
    for n, sd in before.items():
        after = getattr(tiny_sdxl, n).state_dict()
        assert all(torch.equal(sd[k], after[k]) for k in sd), n
        assert not any(m._forward_hooks for m in getattr(tiny_sdxl, n).modules())
    out_after = _outputs(tiny_sdxl, x, t)
    assert torch.equal(out_before[1], out_after[1])
    assert torch.equal(out_before[0].pooled, out_after[0].pooled)


def test_size_conditioning_of_each_image_reaches_the_bundle(tiny_sdxl, tiny_config, tmp_path):
    from PIL import Image

    data = tmp_path / "wide"
    sub = data / "1_ohwx ring"
    sub.mkdir(parents=True)
    Image.new("RGB", (96, 64), (200, 10, 10)).save(sub / "wide.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(sub / "square.png")
    cfg = tiny_config
    cfg.train_data_dir = str(data)
    cfg.max_train_epochs = 1
    bundle = make_sdxl_bundle(tiny_sdxl)
    seen: list = []
    orig = bundle.condition
    bundle.condition = lambda cond, sizes: (seen.extend(sizes), orig(cond, sizes))[1]
    train(cfg, bundle)
    # wide: 96x64 resized to 96x64 (short side 64), centre crop 64x64 at left 16
    assert sorted(set(seen)) == [(64, 64, 0, 0, 64, 64), (64, 96, 0, 16, 64, 64)]


# ------------------------------------------------------------------------------------------ text-encoder cache


def test_text_encoder_cache_refuses_what_it_cannot_cache(tiny_config):
    from lora_trainer.train.loop import preflight

    cfg = tiny_config
    cfg.cache_text_encoder_outputs = True
    for field, value in (("train_text_encoder", True), ("shuffle_caption", True), ("caption_dropout_rate", 0.1), ("caption_tag_dropout_rate", 0.1)):
        c = copy.deepcopy(cfg)
        c.train_text_encoder = False
        setattr(c, field, value)
        with pytest.raises(ConfigError, match="cache_text_encoder_outputs"):
            preflight(c)


def test_text_encoder_cache_gives_the_same_file(tiny_sdxl, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TRAINER_DETERMINISTIC", "1")
    files = []
    for cached in (False, True):
        cfg = copy.deepcopy(tiny_config)
        cfg.train_text_encoder = False
        cfg.max_train_epochs = 1
        cfg.cache_text_encoder_outputs = cached
        cfg.output_dir = str(tmp_path / f"out{cached}")
        files.append(train(cfg, make_sdxl_bundle(copy.deepcopy(tiny_sdxl))).files[-1])
    a, b = load_file(files[0]), load_file(files[1])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_sdxl_cond_concatenates():
    a = SDXLCond(torch.zeros(1, 3, 4), torch.zeros(1, 2))
    b = SDXLCond(torch.ones(2, 3, 4), torch.ones(2, 2))
    c = SDXLCond.cat([a, b])
    assert c.hidden.shape == (3, 3, 4) and c.pooled.shape == (3, 2) and c.time_ids is None


def test_standalone_host_builds_the_tiny_sdxl():
    from lora_trainer.config import TrainConfig
    from lora_trainer.hosts.standalone import BUILTIN_TINY_SDXL, StandaloneHost
    from lora_trainer.train.runtime import Runtime

    cfg = TrainConfig(pretrained_model=BUILTIN_TINY_SDXL)
    bundle = StandaloneHost().model_bundle(cfg, Runtime(torch.device("cpu"), "no"))
    assert bundle.family == "sdxl" and bundle.base_model_version == "sdxl_base_v1-0"
    assert any(t.lora_name.startswith("lora_te2_") for t in bundle.text_encoder_targets())
    assert isinstance(bundle.encode_text(["a"]), SDXLCond)
