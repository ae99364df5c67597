"""The LDM side (what A1111 and Forge hold): the `ldm` UNet with the same weights gives the same
output as the diffusers UNet when our LoRA is applied to it by its LDM module names, and both sides
name the file's modules alike (diffusers paths on SD1/SD2's own layout, LDM paths on others)."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.model.ldm import ldm_unet_lora_targets
from lora_trainer.model.ldm_names import convert_unet_state_dict, unet_diffusers_to_ldm_names
from lora_trainer.model.sd import sd_unet_targets
from lora_trainer.network import LoRANetwork
from tests.test_ldm_names import UNET_CONFIGS, _ldm_unet_kwargs, _make_unet, _quiet

openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("network_type", ["Standard", "LoCon"])
@pytest.mark.parametrize("name", ["sd1_3level", "sd2_3level"])
def test_lora_on_ldm_unet_matches_diffusers(name, network_type):
    locon = network_type == "LoCon"
    unet = _make_unet(UNET_CONFIGS[name], seed=1)
    config = dict(unet.config)
    with _quiet():
        ldm_unet = openaimodel.UNetModel(**_ldm_unet_kwargs(config)).eval()
    ldm_unet.load_state_dict(convert_unet_state_dict(unet.state_dict(), unet_diffusers_to_ldm_names(config)), strict=True)

    # our LoRA on the diffusers UNet, with non-zero weights
    torch.manual_seed(0)
    diff_net = LoRANetwork.create(
        sd_unet_targets(unet, locon),
        4,
        2.0,
        3 if locon else None,
        1.0,
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in diff_net.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.3)
    file_sd = diff_net.kohya_state_dict()

    # the same file applied to the LDM UNet by its own module names; the config is inferred
    # from the LDM weights, as a host adapter does it
    ldm_net = LoRANetwork.create(ldm_unet_lora_targets(ldm_unet, locon), 4, 2.0, 3 if locon else None, 1.0)
    ldm_net.load_kohya_state_dict(file_sd)  # strict: every key has exactly one LDM module
    assert len(ldm_net.loras) == len(diff_net.loras)
    # sd1_3level has SD1.5's layout (diffusers names); sd2_3level has attention in its first up level
    style = "lora_unet_down_blocks_" if name == "sd1_3level" else "lora_unet_input_blocks_"
    assert any(m.lora_name.startswith(style) for m in ldm_net.loras)
    if locon:
        assert any(m.lora_down.weight.ndim == 4 for m in ldm_net.loras)

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, config["cross_attention_dim"], generator=gen)
    depth = config["transformer_layers_per_block"]
    with torch.no_grad():
        base = ldm_unet(x, t, context=[ctx] * depth)
        diff_net.attach()
        ldm_net.attach()
        want = unet(x, t, encoder_hidden_states=ctx).sample
        got = ldm_unet(x, t, context=[ctx] * depth)
        diff_net.detach()
        ldm_net.detach()
        after = ldm_unet(x, t, context=[ctx] * depth)
    assert (want - base).abs().max() > 1e-2, "the LoRA must change the output"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(after, base), "removing the LoRA restores the LDM UNet bit for bit"
