"""Our files load in third-party code: diffusers' load_lora_weights consumes every key and gives
the same UNet and text-encoder outputs as our own hooked model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.config import TrainConfig
from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.model.tiny import TINY_UNET
from lora_trainer.network import LoRANetwork
from lora_trainer.train.loop import train


def _randomize(network: LoRANetwork, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)


def _pipeline(parts):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDPMScheduler.from_config(parts.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _outputs(parts, ids, x, t):
    with torch.no_grad():
        cond = parts.text_encoder(ids)[0]
        return cond, parts.unet(x, t, encoder_hidden_states=cond).sample


# A tiny UNet with SD1.5's block layout (two ResBlocks per level, no attention in the last down and the
# first up level): the WebUIs' fixed SD1.5 arithmetic fits it, so its files carry diffusers names. The
# plain tiny model (one ResBlock per level) does not fit it: its files carry LDM names.
SD15_LAYOUT_UNET = {
    **TINY_UNET,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# diffusers' remap of SGM block names (lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers) reads
# an output block's second part as an attention: the upsampler of an up level without attention (the
# tiny model's first) becomes up_blocks.0.attentions.1.conv, a layer that does not exist.
SGM_UPSAMPLER = "lora_unet_output_blocks_1_1_conv"


def _sgm_remap(stems: list[str], unet_config) -> dict[str, str]:
    """Where diffusers puts each LDM-named stem: its block remap renumbers the blocks, its key
    conversion later renames input/middle/output blocks to down/mid/up blocks."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    remapped = _maybe_map_sgm_blocks_to_diffusers({f"{s}.lora_down.weight": s for s in stems}, unet_config)
    words = (("input_blocks", "down_blocks"), ("middle_block", "mid_block"), ("output_blocks", "up_blocks"))
    out = {}
    for key, stem in remapped.items():
        new = key.partition(".")[0]
        for old, diffusers in words:
            new = new.replace(old, diffusers)
        out[stem] = new
    return out


@pytest.mark.parametrize("network_type", ["Standard", "LoCon"])
@pytest.mark.parametrize("layout", ["sd15", "tiny"])
def test_diffusers_loads_every_key_and_matches(tiny_sd, tiny_config, tmp_path, network_type, layout):
    """SD1.5's layout: diffusers names, which diffusers' ``load_lora_weights`` reads as they are.
    Another layout: LDM names, which diffusers' SD1 pipeline remaps only when given the UNet's config
    (``unet_config=``, as its SDXL pipeline does by itself), and then onto the right layers except
    the upsampler of an up level without attention with LoCon (see SGM_UPSAMPLER)."""
    import copy

    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel

    from lora_trainer.model.ldm_names import webui_stride_fits

    if layout == "sd15":
        torch.manual_seed(0)
        tiny_sd.unet = UNet2DConditionModel(**SD15_LAYOUT_UNET)
    ldm_names = not webui_stride_fits(dict(tiny_sd.unet.config))
    assert ldm_names == (layout == "tiny")
    cfg = tiny_config
    cfg.network_type = network_type
    cfg.conv_dim, cfg.conv_alpha = 3, 1.5
    cfg.max_train_epochs = 1
    cfg.save_precision = "float"
    reference = copy.deepcopy(tiny_sd)  # untouched copy for diffusers
    bundle = make_sd_bundle(tiny_sd)
    result = train(cfg, bundle)
    network = result.network
    _randomize(network)  # make the LoRA large enough that a dropped key would show
    stems = [m.lora_name for m in network.loras]
    unet_style = "lora_unet_input_blocks_" if ldm_names else "lora_unet_down_blocks_"
    assert any(s.startswith(unet_style) for s in stems)
    load_kwargs = {}
    if ldm_names:
        load_kwargs["unet_config"] = reference.unet.config
        remap = _sgm_remap([s for s in stems if s.startswith("lora_unet_")], reference.unet.config)
        if network_type == "LoCon":
            assert remap.pop(SGM_UPSAMPLER) == "lora_unet_up_blocks_0_attentions_1_conv"  # no such layer
            with torch.no_grad():  # leave that module out of the comparison below
                next(m for m in network.loras if m.lora_name == SGM_UPSAMPLER).lora_up.weight.zero_()
        # every other stem lands in the block (resnet, attention, sampler) its diffusers path names
        from lora_trainer.model.ldm_names import unet_ldm_to_diffusers_names

        block = re.compile(r"lora_unet_((?:down|up)_blocks_\d+_[a-z]+_\d+|mid_block_[a-z]+_\d+)_")
        to_diffusers = {
            "lora_unet_" + ldm.replace(".", "_"): "lora_unet_" + d.replace(".", "_")
            for ldm, d in unet_ldm_to_diffusers_names(dict(reference.unet.config)).items()
        }
        assert {s: block.match(n)[1] for s, n in remap.items()} == {s: block.match(to_diffusers[s])[1] for s in remap}
    path = tmp_path / "lora.safetensors"
    from lora_trainer.network.save import save_lora_file

    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    save_lora_file(path, network.kohya_state_dict(torch.float32), meta)

    sd = load_file(path)
    n_unet = len({k.split(".")[0] for k in sd if k.startswith("lora_unet_")})
    n_te = len({k.split(".")[0] for k in sd if k.startswith("lora_te_")})
    assert n_te == 2 * 6  # 2 CLIP layers x (q, k, v, out, fc1, fc2)
    if network_type == "Standard":
        # counted from the model, not hard-coded:
        n_transformers = sum(type(m).__name__ == "Transformer2DModel" for m in tiny_sd.unet.modules())
        assert n_unet == n_transformers * 12
    else:
        conv1, down, up = ("in_layers_2", "_0_op", "_conv") if ldm_names else ("conv1", "_downsamplers_0_conv", "_upsamplers_0_conv")
        assert any(k.split(".")[0].endswith(conv1) for k in sd)
        assert any(k.split(".")[0].endswith(down) for k in sd)
        assert any(k.split(".")[0].endswith(up) and "_transformer_blocks_" not in k for k in sd)
        conv = [k for k in sd if k.endswith(f"{conv1}.lora_down.weight")][0]
        assert sd[conv].shape[0] == 3 and sd[conv].shape[2:] == (3, 3)

    ids = tiny_sd.tokenizer(["ohwx, ring, blue background"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    base_cond, base_out = _outputs(reference, ids, x, t)

    network.attach()
    try:
        ours_cond, ours_out = _outputs(tiny_sd, ids, x, t)
        network.set_multiplier(0.5)
        ours_half = _outputs(tiny_sd, ids, x, t)[1]
    finally:
        network.detach()
        network.set_multiplier(1.0)
    assert not torch.allclose(ours_out, base_out, atol=1e-3), "the LoRA must change the output"
    assert not torch.allclose(ours_cond, base_cond, atol=1e-3)

    if ldm_names:  # without the UNet's config diffusers' SD1 pipeline does not remap LDM names
        with pytest.raises(ValueError, match="not found in the base model"):
            _pipeline(copy.deepcopy(reference)).load_lora_weights(str(path.parent), weight_name=path.name)
    pipe = _pipeline(reference)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours", **load_kwargs)
    theirs_cond, theirs_out = _outputs(reference, ids, x, t)
    torch.testing.assert_close(theirs_cond, ours_cond, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_out, ours_out, atol=1e-5, rtol=1e-4)
    pipe.set_adapters(["ours"], adapter_weights=[0.5])
    torch.testing.assert_close(_outputs(reference, ids, x, t)[1], ours_half, atol=1e-5, rtol=1e-4)

    # every LoRA layer of the file became a peft layer in diffusers (but the one it cannot place)
    from peft.tuners.lora import LoraLayer

    peft_unet = sum(isinstance(m, LoraLayer) for m in reference.unet.modules())
    peft_te = sum(isinstance(m, LoraLayer) for m in reference.text_encoder.modules())
    dropped = int(ldm_names and network_type == "LoCon")
    assert (peft_unet, peft_te) == (n_unet - dropped, n_te)


def test_metadata_and_keys(tiny_sd, tiny_config):
    cfg = tiny_config
    cfg.save_precision = "fp16"
    cfg.max_train_epochs = 2
    result = train(cfg, make_sd_bundle(tiny_sd))
    names = [p.name for p in result.files]
    assert names == ["t-000001.safetensors", "t.safetensors"]
    with safe_open(result.files[0], "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float16}
    for k in keys:
        assert k.startswith(("lora_unet_", "lora_te_")), k
        assert k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")), k
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["ss_output_name"] == "t-000001"
    assert meta["ss_epoch"] == "1"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora"
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert dirs == {"2_ohwx ring": {"n_repeats": 2, "img_count": 4}}
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["2_ohwx ring"]["ohwx"] == 4
    # sshs hashes as A1111 computes them: sha256 of the bytes after the header
    import hashlib

    data = result.files[0].read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    with safe_open(result.files[1], "pt") as f:
        assert f.metadata()["ss_output_name"] == "t"
    # alpha is stored per module, as a scalar
    sd = load_file(result.files[0])
    alphas = {float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas == {2.0}
    assert all(v.ndim == 0 for k, v in sd.items() if k.endswith(".alpha"))


def test_removal_leaves_model_bit_identical(tiny_sd, tiny_config):
    import copy

    before = copy.deepcopy(tiny_sd.unet.state_dict())
    ids = tiny_sd.tokenizer(["a ring"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10])
    out_before = _outputs(tiny_sd, ids, x, t)
    grads_before = [p.requires_grad for p in tiny_sd.unet.parameters()]
    train(tiny_config, make_sd_bundle(tiny_sd))
    after = tiny_sd.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    out_after = _outputs(tiny_sd, ids, x, t)
    assert torch.equal(out_before[0], out_after[0]) and torch.equal(out_before[1], out_after[1])
    assert not any(m._forward_hooks for m in tiny_sd.unet.modules())
    assert not any(m._forward_hooks for m in tiny_sd.text_encoder.modules())
    assert [p.requires_grad for p in tiny_sd.unet.parameters()] == grads_before


def test_existing_output_is_never_overwritten(tiny_sd, tiny_config):
    from lora_trainer.errors import ConfigError

    tiny_config.max_train_epochs = 1
    train(tiny_config, make_sd_bundle(tiny_sd))
    final = tiny_config.output_dir + "/t.safetensors"
    stamp = open(final, "rb").read()
    with pytest.raises(ConfigError, match="t.safetensors exists"):
        train(tiny_config, make_sd_bundle(tiny_sd))
    assert open(final, "rb").read() == stamp


def test_same_seed_same_file(tiny_sd, tiny_config, tmp_path, monkeypatch):
    import copy

    monkeypatch.setenv("LORA_TRAINER_DETERMINISTIC", "1")
    a = copy.deepcopy(tiny_sd)
    cfg2 = TrainConfig(**{**tiny_config.to_dict(), "output_dir": str(tmp_path / "second")})
    r1 = train(tiny_config, make_sd_bundle(tiny_sd))
    r2 = train(cfg2, make_sd_bundle(a))
    assert [p.read_bytes() for p in r1.files] == [p.read_bytes() for p in r2.files]
    cfg3 = TrainConfig(**{**tiny_config.to_dict(), "output_dir": str(tmp_path / "third"), "seed": 2})
    r3 = train(cfg3, make_sd_bundle(copy.deepcopy(a)))
    assert r3.files[-1].read_bytes() != r1.files[-1].read_bytes()


def test_canonical_writer_is_read_by_safetensors():
    from safetensors.torch import load as st_load

    from lora_trainer.network.save import safetensors_bytes, serialize_lora

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.lora_up.weight": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "a.lora_down.weight": torch.randn(2, 5, 3, 3, generator=g).half(),
        "a.alpha": torch.tensor(4.0),
        "c.x": torch.randn(7, generator=g),
    }
    data = serialize_lora(tensors, {"ss_epoch": "1", "modelspec.title": "x"})
    back = st_load(data)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    # the header carries the metadata and the hashes, and the bytes are canonical
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"]["ss_epoch"] == "1" and len(header["__metadata__"]["sshs_model_hash"]) == 64
    assert serialize_lora(dict(reversed(list(tensors.items()))), {"modelspec.title": "x", "ss_epoch": "1"}) == data
    assert safetensors_bytes(tensors) != safetensors_bytes({**tensors, "c.x": tensors["c.x"] + 1})
