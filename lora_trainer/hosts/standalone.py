"""The standalone host: loads the base model itself (no WebUI), offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import TrainConfig
from ..errors import ConfigError
from ..model.bundle import ModelBundle
from ..model.sd import DiffusersSD, make_sd_bundle
from ..roots import Roots
from ..train.runtime import Runtime

if TYPE_CHECKING:  # pragma: no cover
    from ..model.sdxl import DiffusersSDXL

BUILTIN_TINY = "builtin:tiny-sd15"
BUILTIN_TINY_SDXL = "builtin:tiny-sdxl"


class StandaloneHost:
    name = "standalone"

    def __init__(self, parts: DiffusersSD | None = None):
        """``parts`` short-circuits loading (tests, the demo); otherwise ``cfg.pretrained_model`` is loaded
        (and kept for the next run with the same model)."""
        self._parts = parts
        self._loaded_key: tuple[str, str] | None = None if parts is None else ("", "")

    def load_parts(self, cfg: TrainConfig) -> DiffusersSD:
        key = (cfg.pretrained_model, cfg.model_config_dir)
        if self._parts is not None and (self._loaded_key == ("", "") or self._loaded_key == key):
            return self._parts
        if not cfg.pretrained_model:
            raise ConfigError("pretrained_model", "", f"a .safetensors checkpoint, a diffusers folder, or {BUILTIN_TINY}")
        if cfg.pretrained_model == BUILTIN_TINY:
            from ..model.tiny import build_tiny_sd

            self._parts = build_tiny_sd(seed=0)
        elif cfg.pretrained_model == BUILTIN_TINY_SDXL:
            from ..model.tiny_sdxl import build_tiny_sdxl

            self._parts = build_tiny_sdxl(seed=0)
        else:
            from ..model.loading import load_sd

            self._parts = load_sd(cfg.pretrained_model, cfg.model_config_dir or None)
        self._loaded_key = key
        return self._parts

    def model_bundle(self, cfg: TrainConfig, runtime: Runtime) -> ModelBundle:
        parts = self.load_parts(cfg)
        make = make_sd_bundle
        if getattr(parts, "family", "") == "sdxl":
            from ..model.sdxl import make_sdxl_bundle

            make = make_sdxl_bundle
        return make(
            parts,
            device=runtime.device,
            dtype=runtime.weight_dtype,
            clip_skip=cfg.clip_skip,
            prediction_type=cfg.prediction_type,
        )

    def lora_dir(self, cfg: TrainConfig) -> Path:
        return Path(cfg.output_dir)

    def refresh_loras(self) -> None:
        pass

    def run(self, cfg: TrainConfig, events, stop) -> None:
        """One training run on this host (what a background job calls)."""
        from ..train.loop import preflight, train

        scan = preflight(cfg, events)  # before loading: bad input is reported at once
        runtime = Runtime(Runtime.from_env(cfg.mixed_precision).device, cfg.mixed_precision)
        events.info(f"base model: {cfg.pretrained_model or 'the loaded model'}")
        bundle = self.model_bundle(cfg, runtime)
        trigger = scan.trigger_word
        growing = None
        if cfg.grid_each_epoch:
            from ..grid import GrowingGrid
            from ..world.sample import lora_weight

            growing = GrowingGrid(cfg, StandaloneGenerator(self._parts), events, stop, trigger)
            events.subscribe(growing)

            def after_save(path, network) -> None:
                with lora_weight(network, 0.0):  # the training LoRA off: each cell applies its file
                    growing.add_column(path)

        result = train(cfg, bundle, events, stop, runtime=runtime, scan=scan,
                       after_save=after_save if growing is not None else None)
        self.refresh_loras()
        if growing is not None:
            return  # the grid grew with the epochs
        if cfg.grid_after_training and result.files and not stop.requested:
            from ..grid import grid_after_training

            grid_after_training(
                cfg, [str(p) for p in result.files], StandaloneGenerator(self._parts), events, stop, trigger,
                result.validation_losses,
            )


    def build_grid(self, cfg: TrainConfig, files: list[str], events, stop) -> None:
        """The "Build grid" button: ``files`` x ``cfg.grid_weights`` on ``cfg.pretrained_model``."""
        from ..grid import grid_of_files

        parts = self.load_parts(cfg)
        grid_of_files(cfg, files, StandaloneGenerator(parts), events, stop)


def standalone_backend(host: StandaloneHost | None = None, defaults: TrainConfig | None = None, roots: Roots | None = None):
    """The tab's backend over a standalone host and one background job. With ``roots`` (a served page),
    every path a request names must lie under them."""
    from ..job import TrainingJob
    from ..ui.tab import TabBackend

    host = host or StandaloneHost()
    job = TrainingJob(host.run, grid=host.build_grid)
    base = defaults or TrainConfig()

    def start(cfg: TrainConfig) -> None:
        if roots is not None:
            roots.check(cfg)
        job.start(cfg)

    def start_grid(cfg: TrainConfig, files: list[str]) -> None:
        if roots is not None:
            roots.check(cfg)
        job.start_grid(cfg, files)

    return TabBackend(
        host_name="standalone",
        start=start,
        stop=job.stop,
        status=job.status,
        start_grid=start_grid,
        lora_folder=lambda cfg: Path(cfg.output_dir),
        defaults=lambda: TrainConfig(**base.to_dict()),
        notes="Standalone: the base model is loaded from pretrained_model "
        f"({BUILTIN_TINY} is a tiny built-in model for trying the tab). Files go to output_dir.",
        extra={"job": job, "host": host},
    )


class StandaloneGenerator:
    """``generate(cell)`` for the grid: the standalone sampler with the cell's LoRA file applied
    at the cell's weight (weight 0: the base model untouched, the same image in every column)."""

    def __init__(self, parts: DiffusersSD | DiffusersSDXL):
        from ..world.sample import Sampler

        self.parts = parts
        self.sampler = Sampler.from_parts(parts)
        self._networks: dict[str, object] = {}

    def _targets(self):
        """Every module a LoRA file may name: SD1/SD2 ``lora_unet_`` + diffusers paths on SD1/SD2's
        own layout, LDM paths on others (``ldm_names.kohya_unet_name_map``), ``lora_te_`` + HF paths;
        SDXL ``lora_unet_`` + SGM paths, ``lora_te1_`` / ``lora_te2_`` for the two text encoders."""
        if getattr(self.parts, "family", "") == "sdxl":
            from ..model.sdxl import sdxl_text_encoder_targets, sdxl_unet_targets

            return sdxl_unet_targets(self.parts.unet, True) + sdxl_text_encoder_targets(
                self.parts.text_encoder, self.parts.text_encoder_2
            )
        from ..model.sd import sd_unet_targets
        from ..network.targets import TEXT_CONTAINERS, find_targets

        targets = sd_unet_targets(self.parts.unet, True)
        return targets + find_targets(self.parts.text_encoder, "lora_te", TEXT_CONTAINERS)

    def _aliases(self) -> dict[str, str]:
        """The other name an SD1/SD2 file may give a UNet layer (its diffusers or its LDM path: a file
        from another trainer, or one written before the naming rule) -> the name in ``_targets``."""
        if getattr(self.parts, "family", "") == "sdxl":
            return {}
        from ..model.ldm_names import kohya_unet_stems

        return kohya_unet_stems(dict(self.parts.unet.config))

    def _network(self, path: str):
        if path not in self._networks:
            from ..network.load import network_from_file

            net, unmatched = network_from_file(path, self._targets(), self._aliases())
            if unmatched:
                from ..errors import ModelLoadError

                raise ModelLoadError(
                    f"{path}: {len(unmatched)} LoRA modules match nothing in this model (e.g. {unmatched[0]}); "
                    "it was trained for another model type"
                )
            self._networks[path] = net
        return self._networks[path]

    def __call__(self, cell):
        from PIL import Image

        from ..world.sample import lora_weight

        self.sampler.resolution = cell.width
        net = self._network(cell.column.path) if cell.weight else None
        with lora_weight(net, cell.weight):
            img = self.sampler.images([cell.prompt], seed=cell.seed, steps=cell.steps, guidance=cell.cfg_scale,
                                      negative=cell.negative_prompt)[0]
        return Image.fromarray(img)
