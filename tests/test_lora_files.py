"""Our files load in third-party code: diffusers' load_lora_weights consumes every key and gives
the same UNet and text-encoder outputs as our own hooked model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.config import TrainConfig
from lora_trainer.model.sd import make_sd_bundle
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


@pytest.mark.parametrize("network_type", ["Standard", "LoCon"])
def test_diffusers_loads_every_key_and_matches(tiny_sd, tiny_config, tmp_path, network_type):
    import copy

    pytest.importorskip("peft")
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
        # 2 transformer blocks in down + 1 mid + 2 up... counted from the model, not hard-coded:
        n_transformers = sum(type(m).__name__ == "Transformer2DModel" for m in tiny_sd.unet.modules())
        assert n_unet == n_transformers * 12
    else:
        assert any("_resnets_" in k and "conv1" in k for k in sd)
        assert any("_downsamplers_0_conv" in k for k in sd)
        assert any("_upsamplers_0_conv" in k for k in sd)
        conv = [k for k in sd if k.endswith("conv1.lora_down.weight")][0]
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

    pipe = _pipeline(reference)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours")
    theirs_cond, theirs_out = _outputs(reference, ids, x, t)
    torch.testing.assert_close(theirs_cond, ours_cond, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs_out, ours_out, atol=1e-5, rtol=1e-4)
    pipe.set_adapters(["ours"], adapter_weights=[0.5])
    torch.testing.assert_close(_outputs(reference, ids, x, t)[1], ours_half, atol=1e-5, rtol=1e-4)

    # every LoRA layer of the file became a peft layer in diffusers
    from peft.tuners.lora import LoraLayer

    peft_unet = sum(isinstance(m, LoraLayer) for m in reference.unet.modules())
    peft_te = sum(isinstance(m, LoraLayer) for m in reference.text_encoder.modules())
    assert (peft_unet, peft_te) == (n_unet, n_te)


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
