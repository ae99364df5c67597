"""SDXL on the standalone host: the sampler's SDXL conditioning and the epochs x weights grid."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.grid import GridSpec, build_grid, cell_at
from lora_trainer.hosts.standalone import StandaloneGenerator, StandaloneHost
from lora_trainer.model.sdxl import make_sdxl_bundle
from lora_trainer.train.events import EventBus, GridSaved, Message, StopControl
from lora_trainer.train.loop import train
from lora_trainer.world.sample import Sampler


@pytest.fixture(scope="module")
def _tiny_sdxl_master(tmp_path_factory):
    from lora_trainer.model.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(seed=0, tokenizer_dir=tmp_path_factory.mktemp("tokxl"))


@pytest.fixture
def tiny_sdxl(_tiny_sdxl_master):
    return copy.deepcopy(_tiny_sdxl_master)


@pytest.fixture
def three_epochs(tiny_sdxl, tiny_config):
    tiny_config.max_train_epochs = 3
    tiny_config.unet_lr = tiny_config.text_encoder_lr = 5e-3
    result = train(tiny_config, make_sdxl_bundle(tiny_sdxl))
    assert [p.name for p in result.files] == ["t-000001.safetensors", "t-000002.safetensors", "t.safetensors"]
    return tiny_sdxl, [str(p) for p in result.files]


def test_sampler_matches_the_diffusers_sdxl_pipeline(tiny_sdxl):
    """Two encoders' penultimate states + te2's pooled projection + time_ids (original = target size,
    crop 0): the sampler's DDIM latents are those of diffusers' SDXL pipeline with a trailing DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    sampler = Sampler.from_parts(tiny_sdxl)
    assert sampler.sdxl and sampler.resolution == 64 and sampler.scaling == pytest.approx(0.13025)
    prompts = ["ohwx, a ring on a blue background", "a red circle on a green background"]
    ours = sampler.latents(prompts, seed=3, steps=4, guidance=4.0, negative="blurry")
    sched = DDIMScheduler.from_config(
        tiny_sdxl.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_sdxl.vae,
        text_encoder=tiny_sdxl.text_encoder,
        text_encoder_2=tiny_sdxl.text_encoder_2,
        tokenizer=tiny_sdxl.tokenizer,
        tokenizer_2=tiny_sdxl.tokenizer_2,
        unet=tiny_sdxl.unet,
        scheduler=sched,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(
            prompts,
            negative_prompt=["blurry"] * 2,
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=4.0,
            latents=sampler.initial_noise(2, 3),
            output_type="latent",
        ).images
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
    # the pictures: decoded with SDXL's scaling factor, deterministic, seeded per picture
    a = sampler.images(prompts, seed=3, steps=4)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a[1], sampler.images(prompts[1:], seed=4, steps=4)[0])


def test_sdxl_grid_weight_zero_row_is_the_base_model(three_epochs, tmp_path):
    parts, files = three_epochs
    gen = StandaloneGenerator(parts)
    names = {t.lora_name for t in gen._targets()}
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)  # SGM module names
    spec = GridSpec(files=files, weights=[0, 0.5, 1.0], seeds=[7], prompt="ohwx, ring", steps=4,
                    cfg_scale=3.0, width=64, height=64, sampler_name="DDIM")
    result = build_grid(spec, gen, out_path=tmp_path / "grid.png")
    imgs = [np.asarray(i) for i in result.images]
    assert len(imgs) == 9
    row0, row2 = imgs[0:3], imgs[6:9]
    # weight 0 is the base model: the same image in every column, bit for bit
    assert all(np.array_equal(row0[0], x) for x in row0[1:])
    # different epochs at weight 1 differ, and weight 1 differs from weight 0
    assert not np.array_equal(row2[0], row2[2])
    assert not np.array_equal(row0[2], row2[2])
    # the LoRA is applied only inside a cell: the base model is untouched afterwards
    base = Sampler.from_parts(parts).images(["ohwx, ring"], seed=7, steps=4, guidance=3.0)[0]
    assert np.array_equal(base, row0[0])
    assert cell_at(result, spec, result.image.width - 5, result.image.height - 5).tag() == "<lora:t:1>"


def test_standalone_host_builds_sdxl_grids(tiny_sdxl, tiny_config):
    """The two places that refused SDXL: the grid after training and the "Build grid" button."""
    tiny_config.grid_after_training = True
    tiny_config.grid_weights = "0, 1"
    tiny_config.grid_steps = 3
    host = StandaloneHost(tiny_sdxl)
    seen = []
    bus = EventBus(seen.append)
    host.run(tiny_config, bus, StopControl())
    grids = [e.path for e in seen if isinstance(e, GridSaved)]
    warnings = [e.text for e in seen if isinstance(e, Message) and e.level == "warning"]
    assert len(grids) == 1 and not any("SDXL" in w for w in warnings), warnings
    with Image.open(grids[0]) as im:
        assert im.size[0] > 2 * 64 and im.size[1] > 2 * 64
    lora_dir = Path(tiny_config.output_dir)
    files = sorted(str(p) for p in lora_dir.glob("t*.safetensors"))
    assert len(files) == 2
    seen.clear()
    host.build_grid(tiny_config, files, bus, StopControl())
    again = [e.path for e in seen if isinstance(e, GridSaved)]
    assert len(again) == 1 and again[0] != grids[0] and Path(again[0]).parent == lora_dir


def test_sdxl_grid_grows_a_column_per_epoch(tiny_sdxl, tiny_config):
    from lora_trainer.grid import read_grid_parameters

    cfg = tiny_config.with_overrides(["grid_each_epoch=true", "grid_weights=0, 1", "grid_steps=2"])
    columns = []
    bus = EventBus(lambda e: columns.append([c["epoch"] for c in read_grid_parameters(e.path)["columns"]])
                   if isinstance(e, GridSaved) else None)
    StandaloneHost(tiny_sdxl).run(cfg, bus, StopControl())
    assert columns == [[1], [1, 2]]
