"""Validation loss per epoch: fixed noise and timesteps, held-out images, shown and marked on the grid."""

from __future__ import annotations

import copy

from lora_trainer.model.sd import make_sd_bundle
from lora_trainer.train.events import EventBus, Message, StepEvent, ValidationLoss
from lora_trainer.train.loop import train
from lora_trainer.train.validation import choose_validation


def _run(parts, cfg):
    cfg.validation_loss = True
    seen = []
    result = train(cfg, make_sd_bundle(parts), EventBus(seen.append))
    return result, seen


def test_choose_validation_holds_out_only_when_enough_images():
    idx, held = choose_validation(20, 0.2, seed=1)
    assert held and len(idx) == 4 and idx == sorted(set(idx))
    assert choose_validation(20, 0.2, seed=1) == (idx, True)  # deterministic
    assert choose_validation(4, 0.5, seed=1) == ([0, 1, 2, 3], False)  # too few: training images
    assert choose_validation(3, 0.0, seed=1) == ([0, 1, 2], False)
    idx, held = choose_validation(100, 0.0, seed=1)
    assert not held and len(idx) == 16


def test_validation_loss_every_epoch_is_reproducible_and_falls(tiny_sd, tiny_config):
    tiny_config.max_train_epochs = 3
    tiny_config.unet_lr = tiny_config.text_encoder_lr = 5e-3
    r1, seen = _run(copy.deepcopy(tiny_sd), tiny_config)
    vals = [e for e in seen if isinstance(e, ValidationLoss)]
    assert [v.epoch for v in vals] == [0, 1, 2, 3]
    assert not vals[0].held_out and vals[0].images == 4
    assert r1.validation_losses == {v.epoch: v.loss for v in vals}
    # the same noise and timesteps every time: an identical run gives identical values
    cfg2 = tiny_config.with_overrides([f"output_dir={tiny_config.output_dir}-2"])
    r2, _ = _run(copy.deepcopy(tiny_sd), cfg2)
    assert r2.validation_losses == r1.validation_losses
    # on training images, training lowers it
    assert r1.validation_losses[3] < r1.validation_losses[0]


def test_held_out_images_are_not_trained_on(tiny_sd, tiny_config, tmp_path):
    from lora_trainer.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "big", images=10, size=64, repeats=1)
    cfg = tiny_config.with_overrides([f"train_data_dir={data}", "validation_split=0.2", "max_train_epochs=1"])
    result, seen = _run(tiny_sd, cfg)
    steps = [e for e in seen if isinstance(e, StepEvent)]
    vals = [e for e in seen if isinstance(e, ValidationLoss)]
    assert len(steps) == 8 and steps[-1].total_steps == 8  # 10 images, 2 held out
    assert vals[0].held_out and vals[0].images == 2
    assert any(getattr(e, "summary", "").count("2 images held out") for e in seen)


def test_too_few_images_for_a_split_warns(tiny_sd, tiny_config):
    cfg = tiny_config.with_overrides(["validation_split=0.5", "max_train_epochs=1"])
    _, seen = _run(tiny_sd, cfg)
    assert any(isinstance(e, Message) and e.level == "warning" and "too few" in e.text for e in seen)


def test_best_epoch_is_marked_on_the_grid(tiny_sd, tiny_config):
    import json

    from PIL import Image

    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.job import DONE, TrainingJob

    cfg = tiny_config.with_overrides(
        ["validation_loss=true", "grid_after_training=true", "grid_weights=1", "grid_steps=2", "max_train_epochs=3", "unet_lr=0.005"]
    )
    job = TrainingJob(StandaloneHost(tiny_sd).run)
    job.start(cfg)
    s = job.wait(180)
    assert s.state == DONE and len(s.validation) == 4
    best = min((v, e) for e, v in s.validation if e > 0)[1]
    assert s.best_epoch == best
    with Image.open(s.grid_path) as im:
        params = json.loads(im.text["lora_trainer_grid"])
    assert params["best_epoch"] == best
    assert s.as_dict()["best_epoch"] == best
