"""The demo: a LoRA learns a character in the tiny world, and a score shows it learning.

The base model is the pretrained tiny SD1.5-architecture model shipped in
``lora_trainer/assets/tiny_world`` (it draws "a red circle on a blue background" and the like), or
with ``model="sdxl"`` its SDXL-architecture twin in ``lora_trainer/assets/tiny_world_sdxl`` (two
text encoders, size conditioning; pretrained the same way on the same world); the character is
``ohwx``, a yellow ring with a red dot, which neither ever saw. After every epoch the
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
DEMO_IMAGES = 12
DEMO_REPEATS = 20
DEMO_MODELS = ("sd15", "sdxl")


def demo_base_model(model: str = "sd15") -> tuple[str, str, bool]:
    """``(pretrained_model, description, pretrained)`` of the demo's base model for ``model``.

    ``sdxl`` is the tiny world's pretrained SDXL twin when it is installed, else the randomly
    initialised tiny SDXL (``builtin:tiny-sdxl``): training runs, but a random model draws noise,
    so its score cannot show learning."""
    from .world.model import ASSET_DIR, SDXL_ASSET_DIR, has_tiny_world_sdxl

    if model == "sd15":
        return str(ASSET_DIR), "tiny SD1.5-architecture model of a world of coloured shapes", True
    if model != "sdxl":
        raise ValueError(f"model must be one of {DEMO_MODELS}, got {model!r}")
    if has_tiny_world_sdxl():
        return (
            str(SDXL_ASSET_DIR),
            "the same world's tiny SDXL-architecture twin: two text encoders, size conditioning",
            True,
        )
    from .hosts.standalone import BUILTIN_TINY_SDXL

    return (
        BUILTIN_TINY_SDXL,
        "a randomly initialised tiny SDXL: the pretrained SDXL twin (lora_trainer/assets/tiny_world_sdxl) is not "
        "installed, so the pictures are noise and the score cannot rise; build the twin with "
        "tools/make_tiny_world.py --arch sdxl",
        False,
    )


def load_demo_model(model: str = "sd15"):
    """The demo's base model parts in float32 (see :func:`demo_base_model`)."""
    _, _, pretrained = demo_base_model(model)
    if model == "sd15":
        from .world.model import load_tiny_world

        return load_tiny_world()
    if pretrained:
        from .world.model import load_tiny_world_sdxl

        return load_tiny_world_sdxl()
    from .model.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


def make_demo_dataset(root: str | Path, images: int = 8, size: int = 64, repeats: int = 5, seed: int = 0) -> Path:
    """``root/img/<repeats>_ohwx ring/`` with PNGs and ``.txt`` captions of the demo character; returns ``root/img``."""
    return make_concept_dataset(root, DEMO_CONCEPT, images=images, size=size, repeats=repeats, seed=seed)


def demo_config(data: Path, lora_dir: Path, epochs: int, model: str = "sd15") -> TrainConfig:
    """Settings under which the character is learnt clearly within a few epochs on a CPU."""
    from .world.model import RESOLUTION

    return TrainConfig(
        pretrained_model=demo_base_model(model)[0],
        train_data_dir=str(data),
        output_dir=str(lora_dir),
        output_name="demo_ohwx" if model == "sd15" else f"demo_ohwx_{model}",
        resolution=RESOLUTION,
        network_dim=8,
        network_alpha=8.0,
        unet_lr=3e-3,
        text_encoder_lr=1e-3,
        learning_rate=3e-3,
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
        per_background: int = 3,
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
        if self.samples_dir is not None:
            from .world.sample import save_grid

            self.samples_dir.mkdir(parents=True, exist_ok=True)
            save_grid(self.base.concept_images, str(self.samples_dir / f"base-{self.concept.trigger}.png"), columns=self.base.n_concept)
            save_grid(self.base.bleed_images, str(self.samples_dir / "base-others.png"), columns=self.base.n_bleed)
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

        e = evaluate(self.sampler, self.concept, per_background=self.per_background)
        name = Path(ev.path).stem
        self.rows.append((ev.epoch, name, e))
        b = self.base
        self.write(
            f"epoch {ev.epoch} score ({name}): character in {e.concept:.0%} of pictures at weight 1"
            + (f" ({b.concept:.0%} at weight 0)" if b else "")
            + f"; other prompts right {e.bleed:.0%} at weight 1"
            + (f" ({b.bleed:.0%} at weight 0)" if b else "")
        )
        if self.samples_dir is not None:
            from .world.sample import save_grid

            self.samples_dir.mkdir(parents=True, exist_ok=True)
            save_grid(e.concept_images, str(self.samples_dir / f"{name}-{self.concept.trigger}.png"), columns=len(e.concept_images))
            save_grid(e.bleed_images, str(self.samples_dir / f"{name}-others.png"), columns=len(e.bleed_images))

    def table(self) -> str:
        b = self.base
        lines = ["epoch  file                    character@0  character@1  others@0  others@1"]
        for epoch, name, e in self.rows:
            lines.append(
                f"{epoch:5d}  {name:22s}  {b.concept:11.0%}  {e.concept:11.0%}  {b.bleed:8.0%}  {e.bleed:8.0%}"
            )
        return "\n".join(lines)
