"""The demo: a LoRA learns a character in the tiny world, and a score shows it learning.

The base model is the pretrained tiny SD1.5-architecture model shipped in
``lora_trainer/assets/tiny_world`` (it draws "a red circle on a blue background" and the like);
the character is ``ohwx``, a yellow ring with a red dot, which it never saw. After every epoch the
LoRA being trained is scored on fixed seeds: how many pictures for "ohwx, a ring on a ...
background" show the character (weight 1 against weight 0, the base model) and how many
pictures for other prompts of the world are still right.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import TrainConfig
from .world.dataset import make_concept_dataset
from .world.drawing import OHWX, Concept

CONCEPT = OHWX.trigger
DEMO_CONCEPT = OHWX
DEMO_IMAGES = 10
DEMO_REPEATS = 2


def make_demo_dataset(root: str | Path, images: int = 8, size: int = 64, repeats: int = 5, seed: int = 0) -> Path:
    """``root/img/<repeats>_ohwx ring/`` with PNGs and ``.txt`` captions of the demo character; returns ``root/img``."""
    return make_concept_dataset(root, DEMO_CONCEPT, images=images, size=size, repeats=repeats, seed=seed)


def demo_config(data: Path, lora_dir: Path, epochs: int) -> TrainConfig:
    """Settings under which the character is learnt clearly within a few epochs on a CPU."""
    from .world.model import ASSET_DIR, RESOLUTION

    return TrainConfig(
        pretrained_model=str(ASSET_DIR),
        train_data_dir=str(data),
        output_dir=str(lora_dir),
        output_name="demo_ohwx",
        resolution=RESOLUTION,
        network_dim=8,
        network_alpha=8.0,
        unet_lr=1e-3,
        text_encoder_lr=1e-3,
        learning_rate=1e-3,
        train_batch_size=4,
        max_train_epochs=epochs,
        lr_scheduler="constant",
        seed=1234,
    )


class DemoScorer:
    """Scores the LoRA being trained each time the loop saves a file (an event listener).

    Inside the loop the LoRA is applied to the model at weight 1, so sampling the model as it is
    gives weight 1; weight 0 is the base model, scored once before training."""

    def __init__(
        self,
        parts,
        concept: Concept = DEMO_CONCEPT,
        samples_dir: Path | None = None,
        write: Callable[[str], None] = print,
        per_background: int = 2,
    ):
        from .world.sample import Sampler

        self.sampler = Sampler.from_parts(parts)
        self.concept = concept
        self.samples_dir = samples_dir
        self.write = write
        self.per_background = per_background
        self.base = None
        self.rows: list[tuple[int, str, object]] = []

    def score_base(self):
        from .world.score import evaluate

        self.base = evaluate(self.sampler, self.concept, per_background=self.per_background)
        self.write(
            f"base model (no LoRA): '{self.concept.trigger}' character in {self.base.concept:.0%} of "
            f"{self.base.n_concept} pictures, other prompts right {self.base.bleed:.0%} of {self.base.n_bleed}"
        )
        return self.base

    def on_event(self, ev) -> None:
        from .train.events import FileSaved

        if not isinstance(ev, FileSaved):
            return
        from .world.score import evaluate

        ev1 = evaluate(self.sampler, self.concept, per_background=self.per_background)
        name = Path(ev.path).stem
        self.rows.append((ev.epoch, name, ev1))
        b = self.base
        self.write(
            f"epoch {ev.epoch} score ({name}): character {ev1.concept:.0%} at weight 1"
            + (f", {b.concept:.0%} at weight 0" if b else "")
            + f"; other prompts right {ev1.bleed:.0%} at weight 1"
            + (f", {b.bleed:.0%} at weight 0" if b else "")
        )
        if self.samples_dir is not None:
            self._save_samples(ev.epoch)

    def _save_samples(self, epoch: int) -> None:
        from .world.sample import save_grid
        from .world.score import BLEED_SEED, BLEED_SPECS, CONCEPT_SEED, concept_prompts, world_prompt

        self.samples_dir.mkdir(parents=True, exist_ok=True)
        prompts = concept_prompts(self.concept, self.per_background)
        imgs = self.sampler.images(prompts, seed=CONCEPT_SEED)
        save_grid(imgs, str(self.samples_dir / f"epoch{epoch:03d}-{self.concept.trigger}.png"), columns=len(prompts))
        if epoch == 1:  # the other prompts, for comparison
            others = self.sampler.images([world_prompt(*s) for s in BLEED_SPECS], seed=BLEED_SEED)
            save_grid(others, str(self.samples_dir / f"epoch{epoch:03d}-others.png"), columns=len(BLEED_SPECS))

    def table(self) -> str:
        b = self.base
        lines = ["epoch  file                    character@0  character@1  others@0  others@1"]
        for epoch, name, e in self.rows:
            lines.append(
                f"{epoch:5d}  {name:22s}  {b.concept:11.0%}  {e.concept:11.0%}  {b.bleed:8.0%}  {e.bleed:8.0%}"
            )
        return "\n".join(lines)
