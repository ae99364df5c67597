"""Aspect-ratio buckets: the plan, the report, the crops, and a bucketed training run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_trainer.dataset import load_image
from lora_trainer.dataset.buckets import (
    BucketPlan,
    ImagePlan,
    batches_per_process,
    choose_bucket,
    cover_geometry,
    epoch_order,
    image_size,
    load_cropped,
    make_buckets,
    padding_batches,
    plan_buckets,
    shard_batches,
    sharing_rule,
    square_geometry,
)
from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.train.events import EventBus, Message, StepEvent, TrainingStarted
from lora_trainer.train.loop import plan, train
from lora_trainer.train.runtime import Runtime

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


# ---------------------------------------------------------------- several processes: sharing the bucket batches


def _mixed_plan(n: int = 9) -> BucketPlan:
    """n fake images in three buckets."""
    shapes = [(96, 32), (64, 64), (32, 96)]
    return BucketPlan(True, [ImagePlan(None, shapes[i % 3] if i % 4 else (64, 64), (0,) * 6, 0.0) for i in range(n)])


@pytest.mark.parametrize("n,world", [(8, 2), (7, 2), (5, 3), (10, 4), (9, 4), (1, 3), (2, 4), (3, 1), (0, 2)])
def test_shard_batches_disjoint_equal_and_covering(n, world):
    """Every process gets ceil(n / world) batches; together they train every batch once, plus the
    documented padding: the first batches of the epoch's plan again, in the last round."""
    batches = [[i] for i in range(n)]
    shares = [shard_batches(batches, r, world) for r in range(world)]
    per = batches_per_process(n, world)
    assert per == math.ceil(n / world)
    assert [len(s) for s in shares] == [per] * world  # equal optimizer steps: no process waits on an all-reduce alone
    pad = padding_batches(n, world)
    assert pad == per * world - n and (pad < world or n == 0)
    # dealt round by round, process by process: the plan in order, then its first `pad` batches again
    dealt = [b for rnd in range(per) for s in shares for b in s[rnd : rnd + 1]]
    assert dealt == (batches * (pad // max(n, 1) + 2))[: n + pad]
    before_last = [b[0] for s in shares for b in s[:-1]]
    assert len(before_last) == len(set(before_last))  # disjoint before the last round
    if n >= world:  # the repeats are only the padding: every batch once, the first `pad` batches twice
        counts = {i: sum(b == [i] for s in shares for b in s) for i in range(n)}
        assert counts == {i: 2 if i < pad else 1 for i in range(n)}
    assert shard_batches(batches, 0, 1) == batches


def test_shard_batches_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        shard_batches([[0], [1]], 2, 2)


def test_epoch_plan_is_the_same_on_every_process_and_new_every_epoch():
    """The order is seeded by seed and epoch only; the shares of the bucket batches of one epoch
    cover them, never mix buckets, and are computed again identically."""
    plan_ = _mixed_plan(9)
    samples = [i for i in range(9) for _ in range(2)]  # 2 repeats
    world, bs = 2, 2
    plans = []
    for epoch in (1, 2, 3):
        order = epoch_order(samples, seed=5, epoch=epoch)
        assert order == epoch_order(samples, seed=5, epoch=epoch) and sorted(order) == samples
        full = plan_.batches(order, bs)
        plans.append(full)
        assert len(full) == plan_.num_batches({i: 2 for i in range(9)}, bs)
        shares = [plan_.epoch_batches(order, bs, r, world) for r in range(world)]
        assert shares == [plan_.epoch_batches(list(order), bs, r, world) for r in range(world)]  # deterministic
        assert {len(s) for s in shares} == {batches_per_process(len(full), world)}
        pad = padding_batches(len(full), world)
        assert sorted(map(tuple, shares[0] + shares[1])) == sorted(map(tuple, full + full[:pad]))
        for b in shares[0] + shares[1]:
            assert len({plan_.images[i].bucket for i in b}) == 1
        assert plan_.epoch_batches(order, bs) == full  # one process: the whole plan, as before
    assert plans[0] != plans[1] != plans[2]
    assert epoch_order(samples, seed=6, epoch=1) != epoch_order(samples, seed=5, epoch=1)


@pytest.mark.parametrize(
    "batches,world,accum,max_steps,expect",
    [
        (5, 2, 1, 0, (6, 2, 3)),  # 3 batches per process (1 padded), 2 epochs
        (5, 2, 2, 0, (4, 2, 2)),  # accumulation: ceil(3 / 2) steps per epoch
        (5, 2, 2, 3, (3, 2, 2)),  # max_train_steps wins: 2 epochs, the last one partial
        (4, 3, 1, 0, (4, 2, 2)),
        (1, 4, 1, 0, (2, 2, 1)),  # fewer batches than processes: each trains one
        (6, 1, 4, 0, (4, 2, 2)),  # one process: as before
    ],
)
def test_plan_counts_bucket_batches_per_process(tiny_config, batches, world, accum, max_steps, expect):
    cfg = tiny_config.with_overrides([f"gradient_accumulation_steps={accum}", f"max_train_steps={max_steps}", "max_train_epochs=2"])
    assert plan(cfg, None, world, 0, bucket_batches=batches) == expect


def test_bucket_report_states_the_sharing_rule(mixed_data):
    paths = sorted((mixed_data / "2_ohwx ring").glob("*.png"))
    plan_ = plan_buckets(paths, 64, True, 32, 128, 32)
    assert "processes" not in plan_.report([2] * len(paths))
    padded = plan_.report([2] * len(paths), 2, 5)
    assert padded.endswith(sharing_rule(5, 2))
    assert "3 batches per process" in padded and "padded with the epoch's first batch again" in padded
    assert "padded" not in plan_.report([2] * len(paths), 2, 6)
    assert "padded with the epoch's first 3 batches again" in sharing_rule(5, 4)
    assert "padded with 3 batches repeated from the start of the epoch's plan, wrapping round" in sharing_rule(1, 4)


class _SimulatedRank(Runtime):
    """Rank ``rank`` of ``world`` processes without a process group: the gradient all-reduce is left
    out. What is checked here is the plan, the shares and the schedule; tests/test_multiprocess.py
    runs real processes under accelerate launch."""

    def __init__(self, rank: int, world: int):
        super().__init__(torch.device("cpu"), "no", rank, world)

    def all_reduce_grads(self, params) -> None:
        pass

    def barrier(self) -> None:
        pass


def test_two_ranks_share_each_epoch_with_equal_steps(tiny_sd, tiny_config, mixed_data, monkeypatch):
    """Buckets, 2 processes, accumulation 2, a held-out validation image and max_train_steps ending
    mid-epoch: both ranks plan 3 steps and take them, train disjoint shares of the same epoch plan
    (padded by its first batch), never a held-out image, and step the LR schedule as one process would."""
    import copy

    from lora_trainer.train.schedulers import build_scheduler
    from lora_trainer.train.validation import choose_validation

    cfg = tiny_config.with_overrides(
        [
            f"train_data_dir={mixed_data}",
            "enable_bucket=true",
            "min_bucket_reso=32",
            "max_bucket_reso=128",
            "bucket_reso_steps=32",
            "train_batch_size=2",
            "gradient_accumulation_steps=2",
            "validation_split=0.2",
            "max_train_steps=3",
            "lr_scheduler=cosine",
            "lr_warmup_steps=1",
        ]
    )
    held, is_held = choose_validation(len(SIZES), 0.2, cfg.seed)
    assert is_held and len(held) == 1
    # 6 images x 2 repeats minus the held-out one: 5 bucket batches of 2 whichever image it is
    # -> 3 per process (1 padded) -> ceil(3 / 2) = 2 steps per epoch; max_train_steps 3 -> 2 epochs
    seen: dict[int, list] = {0: [], 1: []}
    orig = BucketPlan.epoch_batches

    def spy(self, order, batch_size, rank=0, world_size=1):
        mine = orig(self, order, batch_size, rank, world_size)
        seen[rank].append((self.batches(order, batch_size), mine, self))
        return mine

    monkeypatch.setattr(BucketPlan, "epoch_batches", spy)
    runs = []
    for rank in (0, 1):
        events: list = []
        bundle = make_sd_bundle(copy.deepcopy(tiny_sd))
        result = train(copy.deepcopy(cfg), bundle, EventBus(events.append), runtime=_SimulatedRank(rank, 2), overwrite=True)
        runs.append((result, events))
    lrs = []
    for rank, (result, events) in enumerate(runs):
        started = next(e for e in events if isinstance(e, TrainingStarted))
        steps = [e for e in events if isinstance(e, StepEvent)]
        assert (started.total_steps, started.epochs, started.steps_per_epoch) == (3, 2, 2)
        assert result.steps == len(steps) == 3 and [e.step for e in steps] == [1, 2, 3]
        assert (
            "an epoch has 5 batches; 2 processes train 3 of them each (the last round padded with 1 from the start "
            "of the epoch): 2 steps per epoch, 3 steps"
        ) in started.summary
        # the dataset arithmetic on the first line says it is not what runs; the last line is
        lines = started.summary.splitlines()
        assert lines[0].endswith("without buckets / processes / held-out images")
        assert lines[-1] == "training: 2 steps per epoch, 3 steps"
        report = next(e.text for e in events if isinstance(e, Message) and e.text.startswith("aspect-ratio buckets"))
        assert report.endswith(sharing_rule(5, 2))
        lrs.append([e.lrs for e in steps])
        assert len(seen[rank]) == 2  # two epochs planned
    assert runs[0][0].files and runs[1][0].files == []  # only rank 0 saves
    with safe_open(runs[0][0].files[-1], "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_batches_per_epoch"], meta["ss_max_train_steps"], meta["ss_steps"]) == ("3", "3", "3")

    for epoch in range(2):
        (full0, mine0, bplan), (full1, mine1, _) = seen[0][epoch], seen[1][epoch]
        assert full0 == full1 and len(full0) == 5  # the same plan on both ranks
        assert len(mine0) == len(mine1) == 3
        assert mine0 == [full0[0], full0[2], full0[4]]
        assert mine1 == [full0[1], full0[3], full0[0]]  # padded by the epoch's first batch
        trained = [i for b in mine0 + mine1 for i in b]
        assert held[0] not in trained
        for b in mine0 + mine1:
            assert len({bplan.images[i].bucket for i in b}) == 1
    assert seen[0][0][0] != seen[0][1][0]  # a new plan every epoch

    # the LR schedule: the same on both ranks, and what one process gets for 3 optimizer steps
    assert lrs[0] == lrs[1]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.unet_lr)
    sched = build_scheduler(cfg.lr_scheduler, opt, 3, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power)
    expect = []
    for _ in range(3):
        opt.step()
        sched.step()
        expect.append(opt.param_groups[0]["lr"])
    assert [s["unet"] for s in lrs[0]] == pytest.approx(expect)
