"""The tiny world: the shipped pretrained models (SD1.5 architecture and its SDXL twin) draw their
prompts, and a LoRA visibly learns a character on each.

The scores are measured on fixed seeds with deterministic detectors (see lora_trainer/world/score.py).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lora_trainer.world.detect import find_concept, read_picture
from lora_trainer.world.drawing import (
    OHWX,
    SHAPES,
    SKS,
    Scene,
    concept_scene,
    random_box,
    random_scene,
    render,
    to_array,
)
from lora_trainer.world.model import ASSET_DIR, load_tiny_world, single_file
from lora_trainer.world.sample import Sampler
from lora_trainer.world.score import evaluate, world_accuracy


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the same reduction order on every machine (the scores are compared with fixed
    thresholds), and several times faster than two spinning threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return load_tiny_world()


@pytest.fixture(scope="module")
def sampler(world):
    return Sampler.from_parts(world)


def _train(world, tmp_path, concept, name: str, epochs: int = 2, model: str = "sd15"):
    """A short LoRA run on ``concept``'s kohya dataset with the demo's settings; returns the TrainResult."""
    from lora_trainer.demo import DEMO_IMAGES, DEMO_REPEATS, demo_config
    from lora_trainer.model.sd import make_sd_bundle
    from lora_trainer.model.sdxl import make_sdxl_bundle
    from lora_trainer.train.loop import train
    from lora_trainer.world.dataset import make_concept_dataset

    data = make_concept_dataset(tmp_path / name, concept, images=DEMO_IMAGES, repeats=DEMO_REPEATS, seed=0)
    cfg = demo_config(data, tmp_path / name / "Lora", epochs, model)
    cfg.output_name = name
    cfg.save_every_n_epochs = 0
    return train(cfg, (make_sdxl_bundle if model == "sdxl" else make_sd_bundle)(world))


# ----------------------------------------------------------------------------- the shipped model


def test_shipped_files_are_small_and_complete():
    files = [p for p in ASSET_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (ASSET_DIR / sub).is_dir(), sub
    assert single_file().is_file() and (ASSET_DIR / "README.md").is_file()


def test_folder_and_single_file_hold_the_same_weights(world):
    from lora_trainer.model.loading import file_sha256

    single = load_tiny_world(single=True)
    assert single.family == world.family == "sd1"
    assert single.sha256 == file_sha256(single_file())
    for a, b in ((world.unet, single.unet), (world.vae, single.vae), (world.text_encoder, single.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        keys = [k for k in sa if "position_ids" not in k]
        assert keys and set(keys) <= set(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in keys)
    assert world.vae.config.scaling_factor == single.vae.config.scaling_factor == pytest.approx(0.18215)
    prompt = "ohwx, a ring on a blue background"
    assert world.tokenizer(prompt).input_ids == single.tokenizer(prompt).input_ids
    # SD's shape: 8x downsampling to 4 latent channels
    x = torch.zeros(1, 3, 64, 64)
    assert tuple(world.vae.encode(x).latent_dist.mean.shape) == (1, 4, 8, 8)


def test_base_prompts_give_recognisable_pictures(sampler):
    acc = world_accuracy(sampler, n=12)
    assert acc.accuracy >= 0.75, acc
    assert acc.background >= 0.9 and acc.colour >= 0.9, acc


def test_sampler_is_deterministic(sampler):
    prompts = ["a red circle on a blue background", "a white cross on a black background"]
    a = sampler.images(prompts, seed=5, steps=8)
    b = sampler.images(prompts, seed=5, steps=8)
    c = sampler.images(prompts, seed=6, steps=8)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------------- detectors


def test_detectors_read_drawn_pictures():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(60)]
    assert all(read_picture(to_array(render(s))).matches(s.shape, s.colour, s.background) for s in scenes)
    ohwx = [to_array(render(concept_scene(rng, OHWX))) for _ in range(20)]
    sks = [to_array(render(concept_scene(rng, SKS))) for _ in range(20)]
    assert all(find_concept(im, OHWX).found for im in ohwx)
    assert all(find_concept(im, SKS).found for im in sks)
    assert not any(find_concept(im, OHWX).found for im in sks)  # the colours swapped is another character
    # neither the world's pictures nor a plain yellow ring nor a yellow circle is the character
    look_alikes = [to_array(render(s)) for s in scenes]
    look_alikes += [
        to_array(render(Scene("blue", random_box(rng, 0.5, 0.85), shape=shape, colour="yellow")))
        for shape in ("ring", "circle")
        for _ in range(10)
    ]
    assert not any(find_concept(im, OHWX).found for im in look_alikes)
    assert set(SHAPES) == {"circle", "square", "triangle", "cross", "ring"}


# ------------------------------------------------------------------------------ learning scores


@pytest.mark.slow
def test_lora_learns_the_character_and_the_score_shows_it(world, sampler, tmp_path):
    base = evaluate(sampler, OHWX, bleed=False)
    assert base.concept <= 0.1, "the base model must not draw the character"
    result = _train(world, tmp_path, OHWX, "ohwx")
    net = result.network
    w0 = evaluate(sampler, OHWX, net, weight=0.0, bleed=False)
    w1 = evaluate(sampler, OHWX, net, weight=1.0)
    assert w0.concept == base.concept  # weight 0 is the untrained base model, exactly
    assert w1.concept >= 0.5, w1
    assert w1.concept >= w0.concept + 0.4, (w0, w1)
    assert w1.bleed >= 0.6, w1  # other prompts of the world are still drawn
    # the saved file gives the same LoRA as the one in memory
    from safetensors.torch import load_file

    from lora_trainer.model.sd import make_sd_bundle
    from lora_trainer.network.lora import LoRANetwork

    bundle = make_sd_bundle(world)
    loaded = LoRANetwork.create(bundle.unet_targets(False) + bundle.text_encoder_targets(), 8, 8.0)
    loaded.load_kohya_state_dict(load_file(result.files[-1]))
    again = evaluate(sampler, OHWX, loaded, weight=1.0, bleed=False)
    assert abs(again.concept - w1.concept) <= 0.2
    assert not net.attached and not loaded.attached


@pytest.mark.slow
def test_a_lora_of_another_character_does_not_raise_the_score(world, sampler, tmp_path):
    """SKS is the same ring with the colours swapped. Its LoRA changes the pictures for the OHWX prompts
    a lot (both triggers are words the base model never saw, "a ring" is shared), yet the OHWX score
    stays at zero: the score measures the character, not any change."""
    result = _train(world, tmp_path, SKS, "sks")
    net = result.network
    before = evaluate(sampler, OHWX, net, weight=0.0, bleed=False)
    after = evaluate(sampler, OHWX, net, weight=1.0, bleed=False)
    change = np.abs(after.concept_images.astype(float) - before.concept_images.astype(float)).mean()
    assert change >= 8.0, f"the other LoRA should change the pictures (mean change {change:.1f}/255)"
    assert before.concept <= 0.1 and after.concept <= 0.1, (before, after)


# ------------------------------------------------------------------------------ the SDXL twin


@pytest.fixture(scope="module")
def world_xl():
    from lora_trainer.world.model import load_tiny_world_sdxl

    return load_tiny_world_sdxl()


@pytest.fixture(scope="module")
def sampler_xl(world_xl):
    return Sampler.from_parts(world_xl)


def test_sdxl_twin_files_are_small_and_complete():
    from lora_trainer.world.model import SDXL_ASSET_DIR, sdxl_single_file

    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (SDXL_ASSET_DIR / sub).is_dir(), sub
    assert sdxl_single_file().is_file() and (SDXL_ASSET_DIR / "README.md").is_file()
    assert (SDXL_ASSET_DIR / "build_info.json").is_file()
    every_asset = [p for p in ASSET_DIR.parent.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in every_asset) <= 20_000_000, "all shipped assets together at most 20 MB"


def test_sdxl_twin_folder_and_single_file_hold_the_same_weights(world_xl):
    from safetensors import safe_open

    from lora_trainer.model.loading import file_sha256
    from lora_trainer.world.model import load_tiny_world_sdxl, sdxl_single_file

    with safe_open(str(sdxl_single_file()), "pt") as f:  # the SGM layout A1111/Forge/ComfyUI read
        keys = set(f.keys())
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    single = load_tiny_world_sdxl(single=True)
    assert single.family == world_xl.family == "sdxl"
    assert single.sha256 == file_sha256(sdxl_single_file())
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(world_xl, name).state_dict(), getattr(single, name).state_dict()
        keys = [k for k in sa if "position_ids" not in k]
        assert keys and set(keys) <= set(sb), name
        assert all(torch.equal(sa[k], sb[k]) for k in keys), name
    assert world_xl.vae.config.scaling_factor == single.vae.config.scaling_factor == pytest.approx(0.13025)
    # SDXL's conditioning: two encoders of different widths, size conditioning in the additional embedding
    assert world_xl.unet.config.addition_embed_type == "text_time"
    assert world_xl.unet.config.cross_attention_dim == (
        world_xl.text_encoder.config.hidden_size + world_xl.text_encoder_2.config.hidden_size
    )


def test_sdxl_twin_vae_is_the_sd15_world_vae_rescaled(world, world_xl):
    """Same pictures, same scaled latents: ``latents * 0.13025`` of the twin are the SD1.5 world's
    ``latents * 0.18215`` (only quant_conv / post_quant_conv differ), and decoding agrees."""
    rng = random.Random(3)
    x = torch.from_numpy(np.stack([to_array(render(random_scene(rng))) for _ in range(8)])).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1.0
    with torch.no_grad():
        a = world.vae.encode(x).latent_dist.mean * world.vae.config.scaling_factor
        b = world_xl.vae.encode(x).latent_dist.mean * world_xl.vae.config.scaling_factor
        da = world.vae.decode(a / world.vae.config.scaling_factor).sample
        db = world_xl.vae.decode(a / world_xl.vae.config.scaling_factor).sample
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert (da - db).abs().mean() * 127.5 < 1.0
    sa, sb = world.vae.state_dict(), world_xl.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "quant_conv" not in k)


def test_sdxl_twin_draws_world_prompts(sampler_xl):
    assert sampler_xl.sdxl
    acc = world_accuracy(sampler_xl, n=12)
    assert acc.accuracy >= 0.6, acc
    assert acc.background >= 0.8 and acc.colour >= 0.8, acc


@pytest.mark.slow
def test_lora_learns_the_character_on_the_sdxl_twin(world_xl, sampler_xl, tmp_path):
    base = evaluate(sampler_xl, OHWX, bleed=False)
    assert base.concept <= 0.1, "the base model must not draw the character"
    result = _train(world_xl, tmp_path, OHWX, "ohwx_xl", epochs=3, model="sdxl")
    net = result.network
    assert any(m.lora_name.startswith("lora_te2_") for m in net.loras)
    w0 = evaluate(sampler_xl, OHWX, net, weight=0.0, bleed=False)
    w1 = evaluate(sampler_xl, OHWX, net, weight=1.0)
    assert w0.concept == base.concept  # weight 0 is the untrained base model, exactly
    assert w1.concept >= 0.5, w1
    assert w1.concept >= w0.concept + 0.4, (w0, w1)
    assert w1.bleed >= 0.5, w1
    # the saved file, read back through the grid's generator (SGM / te1 / te2 names), gives the same LoRA
    from lora_trainer.hosts.standalone import StandaloneGenerator

    loaded = StandaloneGenerator(world_xl)._network(str(result.files[-1]))
    again = evaluate(sampler_xl, OHWX, loaded, weight=1.0, bleed=False)
    assert abs(again.concept - w1.concept) <= 0.2
    assert not net.attached and not loaded.attached


def test_demo_model_choice(monkeypatch, tmp_path):
    from lora_trainer import demo
    from lora_trainer.cli import build_parser
    from lora_trainer.world.model import SDXL_ASSET_DIR

    assert build_parser().parse_args(["demo"]).model == "sd15"
    assert build_parser().parse_args(["demo", "--model", "sdxl"]).model == "sdxl"
    assert demo.demo_base_model("sd15")[0] == str(ASSET_DIR)
    path, about, pretrained = demo.demo_base_model("sdxl")
    assert path == str(SDXL_ASSET_DIR) and pretrained and "SDXL" in about
    cfg = demo.demo_config(tmp_path / "img", tmp_path / "Lora", 4, "sdxl")
    assert cfg.pretrained_model == str(SDXL_ASSET_DIR) and cfg.output_name == "demo_ohwx_sdxl"
    # without the twin: the random tiny SDXL, saying that the score needs the twin
    import lora_trainer.world.model as world_model

    monkeypatch.setattr(world_model, "has_tiny_world_sdxl", lambda folder=None: False)
    path, about, pretrained = demo.demo_base_model("sdxl")
    assert path == "builtin:tiny-sdxl" and not pretrained and "make_tiny_world.py --arch sdxl" in about


@pytest.mark.slow
def test_demo_on_the_sdxl_twin_prints_scores(tmp_path, capsys):
    from lora_trainer.cli import main

    assert main(["demo", "--model", "sdxl", "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "SDXL-architecture twin" in out and "demo_ohwx_sdxl" in out
    row = [line for line in out.splitlines() if line.strip().startswith("1  demo_ohwx_sdxl")]
    assert len(row) == 1, out[-2000:]
    run = next(tmp_path.glob("run-*"))
    assert (run / "models" / "Lora" / "demo_ohwx_sdxl.safetensors").is_file()
    assert (run / "samples" / "demo_ohwx_sdxl-ohwx.png").is_file()
