"""Aspect-ratio buckets: the plan, the report, the crops, and a bucketed training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_trainer.dataset import load_image
from lora_trainer.dataset.buckets import (
    choose_bucket,
    cover_geometry,
    image_size,
    load_cropped,
    make_buckets,
    plan_buckets,
    square_geometry,
)
from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.train.events import EventBus, Message, StepEvent, TrainingStarted
from lora_trainer.train.loop import train

SIZES = {"wide": (128, 64), "tall": (64, 128), "square": (64, 64), "wideish": (96, 64), "odd": (70, 50), "big": (200, 100)}


def _image(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def mixed_data(tmp_path):
    sub = tmp_path / "data" / "2_ohwx ring"
    sub.mkdir(parents=True)
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        _image(sub / f"{name}.png", w, h, seed=i)
        (sub / f"{name}.txt").write_text(f"ohwx, ring, {name}")
    return tmp_path / "data"


def test_buckets_are_multiples_within_area_and_limits():
    b = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in b and (768, 320) in b and (320, 768) in b
    for w, h in b:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512
        assert 256 <= w <= 1024 and 256 <= h <= 1024


def test_choose_bucket_follows_the_aspect_ratio_and_no_upscale():
    b = make_buckets(512, 256, 1024, 64)
    w, h = choose_bucket(1200, 800, b, 512, 64, False)
    assert w > h and abs(w / h - 1.5) < 0.2
    assert choose_bucket(1000, 1000, b, 512, 64, False) == (512, 512)
    # a small image is never enlarged with bucket_no_upscale
    assert choose_bucket(300, 200, b, 512, 64, True) == (256, 192)
    assert choose_bucket(300, 200, b, 512, 64, False)[0] > 300


def test_cover_and_crop_geometry():
    rw, rh, left, top = cover_geometry(200, 100, 128, 64)
    assert (rw, rh) == (128, 64) and (left, top) == (0, 0)
    rw, rh, left, top = cover_geometry(100, 100, 128, 64)
    assert (rw, rh) == (128, 128) and (left, top) == (0, 32)


def test_square_geometry_is_what_load_image_does(tmp_path):
    for i, (w, h) in enumerate(((96, 64), (64, 100), (64, 64), (37, 91))):
        p = tmp_path / f"{i}.png"
        _image(p, w, h, seed=i)
        g = square_geometry(*image_size(p), 64)
        assert np.array_equal(np.asarray(load_cropped(p, g)), np.asarray(load_image(p, 64)))


def test_exif_rotation_is_seen_in_the_size(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: shown as 40 x 80
    img.save(p, exif=exif)
    assert image_size(p) == (40, 80)
    plan = plan_buckets([p], 64, True, 32, 128, 32)
    assert plan.images[0].bucket[1] > plan.images[0].bucket[0]
    assert load_cropped(p, plan.images[0].geometry).size == plan.images[0].bucket


def test_plan_report_lists_every_image(mixed_data):
    paths = sorted((mixed_data / "2_ohwx ring").glob("*.png"))
    plan = plan_buckets(paths, 64, True, 32, 128, 32)
    report = plan.report([2] * len(paths))
    for p in paths:
        assert p.name in report
    assert len(plan.by_bucket()) >= 3
    for ip in plan.images:
        oh, ow, top, left, th, tw = ip.geometry
        assert (tw, th) == ip.bucket
        assert load_cropped(ip.path, ip.geometry).size == ip.bucket
    # the 70x50 image loses part of its area to the crop, and says so
    odd = next(ip for ip in plan.images if ip.path.stem == "odd")
    assert odd.bucket == (64, 64) and odd.cropped_fraction > 0.2  # 64x64 is the nearest shape on this coarse grid
    assert f"odd.png (70x50, crop cuts away {odd.cropped_fraction:.0%})" in report


def test_batches_never_mix_buckets():
    from lora_trainer.dataset.buckets import BucketPlan, ImagePlan

    imgs = [ImagePlan(None, (64, 64) if i % 2 else (96, 64), (0,) * 6, 0.0) for i in range(7)]
    plan = BucketPlan(True, imgs)
    order = [3, 0, 1, 2, 5, 4, 6, 3, 0]
    batches = plan.batches(order, 2)
    assert sorted(i for b in batches for i in b) == sorted(order)
    for b in batches:
        assert len({imgs[i].bucket for i in b}) == 1
    assert len(batches) == plan.num_batches({i: order.count(i) for i in set(order)}, 2)
    one = BucketPlan(False, [ImagePlan(None, (64, 64), (0,) * 6, 0.0)] * 5)
    assert one.batches([4, 2, 0, 1, 3], 2) == [[4, 2], [0, 1], [3]]


@pytest.mark.parametrize("cache", [False, True])
def test_bucketed_run_trains_every_image_in_its_bucket(tiny_sd, tiny_config, mixed_data, cache):
    cfg = tiny_config
    cfg.train_data_dir = str(mixed_data)
    cfg.enable_bucket = True
    cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps = 32, 128, 32
    cfg.train_batch_size = 2
    cfg.max_train_epochs = 1
    cfg.cache_latents = cache
    cfg.cache_latents_to_disk = cache
    bundle = make_sd_bundle(tiny_sd)
    shapes: list[tuple] = []
    orig = bundle.predict
    bundle.predict = lambda x, t, c: (shapes.append(tuple(x.shape)), orig(x, t, c))[1]
    events: list = []
    result = train(cfg, bundle, EventBus(events.append))
    report = next(e.text for e in events if isinstance(e, Message) and e.text.startswith("aspect-ratio buckets"))
    assert events.index(next(e for e in events if isinstance(e, Message) and e.text == report)) < events.index(
        next(e for e in events if isinstance(e, StepEvent))
    )  # before training
    for name in SIZES:
        assert f"{name}.png" in report
    started = next(e for e in events if isinstance(e, TrainingStarted))
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert len(steps) == started.total_steps == result.steps
    # 6 images x 2 repeats, each batch from one bucket: more than 12 / 2 batches when buckets are mixed
    plan = plan_buckets(sorted((mixed_data / "2_ohwx ring").glob("*.png")), 64, True, 32, 128, 32)
    assert started.steps_per_epoch == plan.num_batches({i: 2 for i in range(len(SIZES))}, 2)
    train_shapes = {s[2:] for s in shapes}
    assert {(h // 8, w // 8) for (w, h) in plan.by_bucket()} <= train_shapes
    with safe_open(result.files[-1], "pt") as f:
        meta = f.metadata()
    assert meta["ss_enable_bucket"] == "True"
    info = json.loads(meta["ss_bucket_info"])
    assert sum(b["count"] for b in info["buckets"].values()) == len(SIZES)
    if cache:
        from lora_trainer.train.cache import cache_path

        for p in (mixed_data / "2_ohwx ring").glob("*.png"):
            with np.load(cache_path(p)) as z:
                assert "bucket" in str(z["key"])
                lat = torch.from_numpy(z["latents"])
            w, h = next(ip.bucket for ip in plan.images if ip.path == p)
            assert tuple(lat.shape[-2:]) == (h // 8, w // 8)


def test_bucket_settings_that_leave_no_bucket_are_refused(tiny_config):
    from lora_trainer.errors import ConfigError
    from lora_trainer.train.loop import preflight

    cfg = tiny_config
    cfg.enable_bucket = True
    cfg.min_bucket_reso, cfg.max_bucket_reso = 512, 256
    with pytest.raises(ConfigError, match="min_bucket_reso"):
        preflight(cfg)
