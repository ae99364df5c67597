"""LDM <-> diffusers name mapping (lora_trainer.model.ldm_names).

Ground truth is diffusers' own single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``StableDiffusionPipeline.from_single_file``) and the
numerical behaviour of the original ``ldm`` modules.  Everything is tiny and CPU only.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lora_trainer.model.ldm_names import (
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    convert_unet_state_dict,
    kohya_unet_name_map,
    kohya_unet_stems,
    rename_key,
    text_encoder_from_ldm_state_dict,
    text_encoder_to_ldm_state_dict,
    to_a1111_checkpoint,
    unet_config_from_ldm_state_dict,
    unet_diffusers_to_ldm_names,
    unet_ldm_to_diffusers_names,
    vae_diffusers_to_ldm_names,
    vae_diffusers_to_ldm_state_dict,
    vae_ldm_to_diffusers_state_dict,
    webui_fixed_ldm_path,
    webui_stride_fits,
)

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

# --------------------------------------------------------------------------- configs

# SD1-style: attention_head_dim is really the head count; conv proj_in/out.
UNET_2LEVEL: dict[str, Any] = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,  # LDM hard-codes GroupNorm(32, C)
)
UNET_SD1_3LEVEL: dict[str, Any] = dict(
    sample_size=8,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=32,
)
# SD2-style: linear proj_in/out, per-level head counts (= fixed head dim 16 in LDM),
# attention only on the deeper levels, transformer depth 2.
UNET_SD2_3LEVEL: dict[str, Any] = dict(
    sample_size=8,
    block_out_channels=(32, 64, 96),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=(2, 4, 6),
    use_linear_projection=True,
    transformer_layers_per_block=2,
    norm_num_groups=32,
)
UNET_CONFIGS = {"2level": UNET_2LEVEL, "sd1_3level": UNET_SD1_3LEVEL, "sd2_3level": UNET_SD2_3LEVEL}

# Real-size configs, only ever instantiated on the meta device.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD21_UNET: dict[str, Any] = dict(
    SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,  # LDM hard-codes GroupNorm(32, C)
    sample_size=16,
)

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU forwards are far faster single-threaded (and immune to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet():
    """ldm prints a lot while building modules."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    """Make every parameter distinct (norm weights are 1/0 and zero-inits are 0 by default)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _make_unet(cfg: dict[str, Any], seed: int = 0):
    torch.manual_seed(seed)
    return _perturb(diffusers.UNet2DConditionModel(**cfg), seed)


def _ldm_unet_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """LDM UNetModel arguments equivalent to a (SD1/SD2-style) diffusers UNet config."""
    boc = list(config["block_out_channels"])
    heads = config["attention_head_dim"]
    kwargs: dict[str, Any] = dict(
        image_size=config["sample_size"],
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=boc[0],
        channel_mult=[c // boc[0] for c in boc],
        num_res_blocks=config["layers_per_block"],
        attention_resolutions=[2**i for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t],
        use_spatial_transformer=True,
        transformer_depth=config["transformer_layers_per_block"],
        # this ldm's SpatialTransformer indexes context_dim[d] per depth (SD2-repo quirk)
        context_dim=[config["cross_attention_dim"]] * config["transformer_layers_per_block"],
        legacy=False,
        use_linear_in_transformer=config["use_linear_projection"],
    )
    if isinstance(heads, int):
        kwargs["num_heads"] = heads
    else:  # per-level head counts <=> constant head dim
        dims = {c // h for c, h in zip(boc, heads)}
        assert len(dims) == 1
        kwargs["num_head_channels"] = dims.pop()
    return kwargs


def _param_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


_KINDS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def _kind(module: nn.Module) -> type:
    return next(k for k in _KINDS if isinstance(module, k))


def _fake_ldm_checkpoint(diffusers_sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    ldm = convert_unet_state_dict(diffusers_sd, unet_diffusers_to_ldm_names(config))
    return {LDM_UNET_PREFIX + k: v for k, v in ldm.items()}


def _assert_same_state_dict(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(set(want) - set(got)) == []  # missing
    assert sorted(set(got) - set(want)) == []  # extra
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert bad == []


# --------------------------------------------------------------------------- UNet: names


def test_sd15_examples() -> None:
    cfg = {**SD15_UNET, "in_channels": 4, "out_channels": 4}
    m = unet_ldm_to_diffusers_names(cfg)
    expected = {
        "input_blocks.0.0": "conv_in",
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.1.0.in_layers.0": "down_blocks.0.resnets.0.norm1",
        "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
        "input_blocks.1.0.emb_layers.1": "down_blocks.0.resnets.0.time_emb_proj",
        "input_blocks.1.0.out_layers.3": "down_blocks.0.resnets.0.conv2",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.8.1.transformer_blocks.0.ff.net.2": "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2",
        "input_blocks.11.0.out_layers.0": "down_blocks.3.resnets.1.norm2",
        "middle_block.0.in_layers.2": "mid_block.resnets.0.conv1",
        "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
        "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.0.skip_connection": "up_blocks.1.resnets.2.conv_shortcut",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0": (
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"
        ),
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    for ldm, diff in expected.items():
        assert m[ldm] == diff, ldm
    for absent in ("input_blocks.1.0.skip_connection", "input_blocks.12.0.op", "output_blocks.11.2.conv"):
        assert absent not in m
    assert "input_blocks.9.0.op" in m and "input_blocks.10.1.proj_in" not in m
    inv = unet_diffusers_to_ldm_names(cfg)
    assert len(inv) == len(m) and all(inv[d] == ldm for ldm, d in m.items())


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_real_size_unet_matches_diffusers_converter(name: str) -> None:
    """Full-size key sets on the meta device; tensors are fake scalars (the converter only renames)."""
    cfg = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}[name]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**cfg)
    config = dict(unet.config)
    keys = list(unet.state_dict())
    fake = {k: torch.tensor(float(i)) for i, k in enumerate(keys)}
    back = single_file_utils.convert_ldm_unet_checkpoint(_fake_ldm_checkpoint(fake, config), config)
    _assert_same_state_dict(back, fake)
    modules = {k.rsplit(".", 1)[0] for k in keys}
    assert modules == set(unet_diffusers_to_ldm_names(config))


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_real_size_ldm_unet_module_bijection(name: str) -> None:
    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    cfg = {"sd15": SD15_UNET, "sd21": SD21_UNET}[name]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**cfg)
        with _quiet():
            ldm_unet = openaimodel.UNetModel(**_ldm_unet_kwargs(dict(unet.config)))
    _check_module_bijection(ldm_unet, unet, dict(unet.config))


# --------------------------------------------------------------------------- UNet: kohya names


def _tiny_world_unet() -> dict[str, Any]:
    path = Path(__file__).resolve().parents[1] / "lora_trainer" / "assets" / "tiny_world" / "unet" / "config.json"
    return json.loads(path.read_text())


def _layouts() -> dict[str, tuple[dict[str, Any], bool]]:
    """Configs and whether the WebUIs' fixed SD1.5 arithmetic fits them."""
    from lora_trainer.model.tiny import TINY_UNET

    return {
        "sd15": (SD15_UNET, True),
        "sd21": (SD21_UNET, True),
        "sd1_3level": (UNET_SD1_3LEVEL, True),  # SD1.5's layout, one level fewer
        "2level": (UNET_2LEVEL, False),  # one ResBlock per level
        "sd2_3level": (UNET_SD2_3LEVEL, False),  # attention in the first up level: its upsampler moves
        "tiny": (TINY_UNET, False),
        "tiny_world": (_tiny_world_unet(), False),
    }


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd1_3level", "2level", "sd2_3level", "tiny", "tiny_world"])
def test_webui_stride_fits_sd1_and_sd2_layouts_only(name: str) -> None:
    config, fits = _layouts()[name]
    assert webui_stride_fits(config) is fits
    diffusers_to_ldm = unet_diffusers_to_ldm_names(config)
    by_diffusers = kohya_unet_name_map(config, "diffusers")
    by_ldm = kohya_unet_name_map(config, "ldm")
    for d, ldm in diffusers_to_ldm.items():
        want = d if fits else ldm  # diffusers names kept exactly on SD1/SD2's layout
        assert by_diffusers(d) == by_ldm(ldm) == want
    stems = kohya_unet_stems(config)
    assert len(stems) == 2 * len(diffusers_to_ldm)  # both styles of every layer
    assert set(stems.values()) == {"lora_unet_" + by_ldm(ldm).replace(".", "_") for ldm in diffusers_to_ldm.values()}
    with pytest.raises(KeyError, match="not part of this SD1/SD2 UNet layout"):
        by_diffusers("down_blocks.9.attentions.0.proj_in")


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_real_size_sd1_sd2_lora_names_stay_diffusers_paths(name: str) -> None:
    """kohya's own names for SD1.x/SD2.x (the diffusers paths), LoCon included, unchanged."""
    from lora_trainer.model.sd import sd_unet_targets
    from lora_trainer.network.targets import UNET_ATTENTION_CONTAINERS, UNET_CONV_CONTAINERS, find_targets

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**{"sd15": SD15_UNET, "sd21": SD21_UNET}[name])
    plain = [t.lora_name for t in find_targets(unet, "lora_unet", UNET_ATTENTION_CONTAINERS, UNET_CONV_CONTAINERS)]
    assert [t.lora_name for t in sd_unet_targets(unet, True)] == plain and len(plain) == 192 + 86
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in plain


def test_webui_fixed_arithmetic_on_sd15() -> None:
    """The WebUIs' reading of diffusers names, checked on SD1.5 where it is right by construction."""
    expected = {
        "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",  # no attention in SD1.5's first up level
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.11.1.transformer_blocks.0.ff.net.2",
        "up_blocks.2.resnets.0.conv1": "output_blocks.6.0.in_layers.2",
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_2": "time_embed.2",
    }
    mapping = unet_diffusers_to_ldm_names({**SD15_UNET, "in_channels": 4, "out_channels": 4})
    for d, ldm in expected.items():
        assert webui_fixed_ldm_path(d).replace(".", "_") == ldm.replace(".", "_") == mapping[d].replace(".", "_"), d
    assert webui_fixed_ldm_path("down_blocks.0.resnets.0.norm1") == "input_blocks.1.0.norm1"  # only the four convs
    assert webui_fixed_ldm_path("text_model.encoder.layers.0.mlp.fc1") is None


def test_webui_fixed_arithmetic_misreads_one_resblock_per_level() -> None:
    """The tiny model (one ResBlock per level): the fixed arithmetic reads the up level's first attention
    as its second and the second as a block that does not exist; the LDM names say where they are."""
    from lora_trainer.model.tiny import TINY_UNET

    mapping = unet_diffusers_to_ldm_names(TINY_UNET)
    assert mapping["up_blocks.1.attentions.0.proj_in"] == "output_blocks.2.1.proj_in"
    assert webui_fixed_ldm_path("up_blocks.1.attentions.0.proj_in") == "output_blocks.3.1.proj_in"
    assert webui_fixed_ldm_path("up_blocks.1.attentions.1.proj_in") == "output_blocks.4.1.proj_in"
    assert "output_blocks.4.1.proj_in" not in mapping.values()
    assert kohya_unet_name_map(TINY_UNET, "diffusers")("up_blocks.1.attentions.0.proj_in") == "output_blocks.2.1.proj_in"


def _check_module_bijection(ldm_unet: nn.Module, unet: nn.Module, config: dict[str, Any]) -> None:
    mapping = unet_ldm_to_diffusers_names(config)
    ldm_mods = _param_modules(ldm_unet)
    diff_mods = _param_modules(unet)
    assert sorted(set(ldm_mods) - set(mapping)) == []
    assert sorted(set(mapping) - set(ldm_mods)) == []
    assert sorted(set(diff_mods) - set(mapping.values())) == []
    assert len(set(mapping.values())) == len(mapping)
    for ldm_name, diff_name in mapping.items():
        a, b = ldm_mods[ldm_name], diff_mods[diff_name]
        assert _kind(a) is _kind(b), (ldm_name, diff_name, type(a), type(b))
        assert a.weight.shape == b.weight.shape, (ldm_name, diff_name)
    lin_conv = [n for n, mod in ldm_mods.items() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    assert lin_conv and all(isinstance(diff_mods[mapping[n]], type(ldm_mods[n])) for n in lin_conv)


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_roundtrip_through_diffusers_converter(name: str) -> None:
    unet = _make_unet(UNET_CONFIGS[name])
    config = dict(unet.config)
    sd = unet.state_dict()
    checkpoint = _fake_ldm_checkpoint(sd, config)
    back = single_file_utils.convert_ldm_unet_checkpoint(dict(checkpoint), config)  # diffusers < 0.28 pops its input
    _assert_same_state_dict(back, sd)
    # our own LDM -> diffusers direction agrees as well
    ldm_sd = {k[len(LDM_UNET_PREFIX) :]: v for k, v in checkpoint.items()}
    _assert_same_state_dict(convert_unet_state_dict(ldm_sd, unet_ldm_to_diffusers_names(config)), sd)


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_config_inferred_from_ldm_state_dict(name: str) -> None:
    unet = _make_unet(UNET_CONFIGS[name])
    config = dict(unet.config)
    checkpoint = _fake_ldm_checkpoint(unet.state_dict(), config)
    inferred = unet_config_from_ldm_state_dict(checkpoint, prefix=LDM_UNET_PREFIX)
    for key, value in inferred.items():
        want = config[key]
        assert (list(want) if isinstance(want, tuple) else want) == value, key
    assert unet_ldm_to_diffusers_names(inferred) == unet_ldm_to_diffusers_names(config)


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_ldm_unet_behaves_like_diffusers(name: str) -> None:
    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    unet = _make_unet(UNET_CONFIGS[name], seed=1)
    config = dict(unet.config)
    with _quiet():
        ldm_unet = openaimodel.UNetModel(**_ldm_unet_kwargs(config)).eval()
    _check_module_bijection(ldm_unet, unet, config)

    ldm_sd = convert_unet_state_dict(unet.state_dict(), unet_diffusers_to_ldm_names(config))
    ldm_unet.load_state_dict(ldm_sd, strict=True)

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, config["cross_attention_dim"], generator=gen)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ctx).sample
        # ... and likewise wants one context per transformer block when depth > 1
        got = ldm_unet(x, t, context=[ctx] * config["transformer_layers_per_block"])
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_rename_key_and_unmapped_modes() -> None:
    mapping = unet_ldm_to_diffusers_names(dict(_make_unet(UNET_2LEVEL).config))
    lora = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight"
    assert rename_key(lora, mapping) == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_down.weight"
    assert rename_key("out.2", mapping) == "conv_out"
    assert rename_key("input_blocks.1.1", mapping) is None  # containers are not mapped
    sd = {"out.2.weight": torch.zeros(1), "alphas_cumprod": torch.zeros(1)}
    with pytest.raises(KeyError, match="alphas_cumprod"):
        convert_unet_state_dict(sd, mapping)
    assert set(convert_unet_state_dict(sd, mapping, unmapped="keep")) == {"conv_out.weight", "alphas_cumprod"}
    assert set(convert_unet_state_dict(sd, mapping, unmapped="drop")) == {"conv_out.weight"}


def test_unsupported_unet_config_is_rejected() -> None:
    cfg = {**UNET_2LEVEL, "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")}
    with pytest.raises(ValueError, match="unsupported"):
        unet_ldm_to_diffusers_names(cfg)


# --------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(3)
    return _perturb(diffusers.AutoencoderKL(**VAE_CONFIG), 3)


def test_vae_roundtrip_through_diffusers_converter(vae) -> None:
    config = dict(vae.config)
    sd = vae.state_dict()
    ldm = vae_diffusers_to_ldm_state_dict(sd, config)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert ldm["decoder.mid.attn_1.norm.bias"].shape == (64,)
    assert torch.equal(ldm["decoder.up.1.block.0.conv1.weight"], sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(ldm["decoder.up.1.upsample.conv.weight"], sd["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(
        ldm["encoder.down.1.block.0.nin_shortcut.weight"], sd["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"]
    )
    assert torch.equal(ldm["encoder.norm_out.weight"], sd["encoder.conv_norm_out.weight"])
    assert {"quant_conv.weight", "post_quant_conv.bias", "encoder.down.0.downsample.conv.weight"} <= set(ldm)
    assert "encoder.down.1.downsample.conv.weight" not in ldm and "decoder.up.0.upsample.conv.weight" not in ldm

    back = single_file_utils.convert_ldm_vae_checkpoint({LDM_VAE_PREFIX + k: v for k, v in ldm.items()}, config)
    _assert_same_state_dict(back, sd)
    _assert_same_state_dict(vae_ldm_to_diffusers_state_dict(ldm, config), sd)
    assert {k.rsplit(".", 1)[0] for k in sd} == set(vae_diffusers_to_ldm_names(config))


class _LdmVae(nn.Module):
    """Same module names as ldm.models.autoencoder.AutoencoderKL (used if that cannot import)."""

    def __init__(self, ddconfig: dict[str, Any], embed_dim: int) -> None:
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)


def test_ldm_vae_behaves_like_diffusers(vae) -> None:
    pytest.importorskip("ldm.modules.diffusionmodules.model")
    config = dict(vae.config)
    boc = list(config["block_out_channels"])
    ddconfig = dict(
        double_z=True,
        z_channels=config["latent_channels"],
        resolution=config["sample_size"],
        in_channels=config["in_channels"],
        out_ch=config["out_channels"],
        ch=boc[0],
        ch_mult=[c // boc[0] for c in boc],
        num_res_blocks=config["layers_per_block"],
        attn_resolutions=[],
        dropout=0.0,
    )
    with _quiet():
        try:
            from ldm.models.autoencoder import AutoencoderKL as LdmAutoencoderKL

            ldm_vae: nn.Module = LdmAutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, config["latent_channels"])
        except ImportError:  # needs pytorch_lightning; the submodules are what matter
            ldm_vae = _LdmVae(ddconfig, config["latent_channels"])
    ldm_vae.eval()
    missing, unexpected = ldm_vae.load_state_dict(
        vae_diffusers_to_ldm_state_dict(vae.state_dict(), config), strict=False
    )
    assert missing == [] and [k for k in unexpected if not k.startswith("loss.")] == []

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 16, 16, generator=gen)
    z = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(
            ldm_vae.quant_conv(ldm_vae.encoder(x)), vae.quant_conv(vae.encoder(x)), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(ldm_vae.decoder(ldm_vae.post_quant_conv(z)), vae.decode(z).sample, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- text encoder


@pytest.fixture(scope="module")
def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(5)
    cfg = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
    )
    return CLIPTextModel(cfg).eval()


def test_text_encoder_keys(text_encoder) -> None:
    sd = dict(text_encoder.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as older transformers saved it
    ldm = text_encoder_to_ldm_state_dict(sd)
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in ldm
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in ldm
    assert "cond_stage_model.transformer.text_model.final_layer_norm.bias" in ldm
    assert not any(k.endswith("position_ids") for k in ldm)
    assert len(ldm) == len(sd) - 1
    want = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if hasattr(single_file_utils, "convert_ldm_clip_checkpoint"):  # diffusers 0.28 and later
        _assert_same_state_dict(single_file_utils.convert_ldm_clip_checkpoint(ldm), want)
    _assert_same_state_dict(text_encoder_from_ldm_state_dict(ldm), want)
    # a bare CLIPTextTransformer state dict gets "text_model." added
    bare = text_encoder_to_ldm_state_dict(text_encoder.text_model.state_dict())
    assert set(bare) == set(ldm)
    with pytest.raises(KeyError):
        text_encoder_to_ldm_state_dict({"logit_scale": torch.zeros(())})


# --------------------------------------------------------------------------- full checkpoint


def _write_tokenizer(folder: Path) -> None:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [f"{c}</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def test_a1111_checkpoint_loads_with_from_single_file(tmp_path: Path, vae, text_encoder) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    _write_tokenizer(tmp_path / "tok")
    tokenizer = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"))
    assert tokenizer("ab c").input_ids == [52, 0, 27, 28, 53]

    unet = _make_unet({**UNET_SD1_3LEVEL, "sample_size": 8}, seed=6)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "pipe")
    # keep only configs/tokenizer files, so every weight must come from the single file
    weights = [f for f in (tmp_path / "pipe").rglob("*") if f.suffix in (".safetensors", ".bin")]
    assert len(weights) == 3
    for f in weights:
        f.unlink()

    ckpt = to_a1111_checkpoint(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), dict(unet.config), dict(vae.config)
    )
    prefixes = {k.split(".", 2)[0] + "." + k.split(".", 2)[1] for k in ckpt}
    assert prefixes == {
        "model.diffusion_model",
        "first_stage_model.encoder",
        "first_stage_model.decoder",
        "first_stage_model.quant_conv",
        "first_stage_model.post_quant_conv",
        "cond_stage_model.transformer",
    }
    assert ckpt["first_stage_model.encoder.mid.attn_1.k.weight"].ndim == 4
    path = tmp_path / "model.safetensors"
    save_file(ckpt, str(path))
    assert set(load_file(str(path))) == set(ckpt)

    loaded = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(tmp_path / "pipe"), local_files_only=True, safety_checker=None
    )
    _assert_same_state_dict(loaded.unet.state_dict(), unet.state_dict())
    _assert_same_state_dict(loaded.vae.state_dict(), vae.state_dict())
    _assert_same_state_dict(loaded.text_encoder.state_dict(), text_encoder.state_dict())


# --------------------------------------------------------------------------- import hygiene


def test_module_does_not_import_diffusers_or_ldm() -> None:
    code = (
        "import sys, lora_trainer.model.ldm_names\n"
        "bad = [m for m in ('diffusers', 'ldm', 'transformers', 'sgm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
