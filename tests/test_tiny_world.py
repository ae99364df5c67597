"""The tiny world: the shipped pretrained model draws its prompts, and a LoRA visibly learns a character.

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


def _train(world, tmp_path, concept, name: str, epochs: int = 2):
    """A short LoRA run on ``concept``'s kohya dataset with the demo's settings; returns the TrainResult."""
    from lora_trainer.demo import DEMO_IMAGES, DEMO_REPEATS, demo_config
    from lora_trainer.model.sd import make_sd_bundle
    from lora_trainer.train.loop import train
    from lora_trainer.world.dataset import make_concept_dataset

    data = make_concept_dataset(tmp_path / name, concept, images=DEMO_IMAGES, repeats=DEMO_REPEATS, seed=0)
    cfg = demo_config(data, tmp_path / name / "Lora", epochs)
    cfg.output_name = name
    cfg.save_every_n_epochs = 0
    return train(cfg, make_sd_bundle(world))


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
