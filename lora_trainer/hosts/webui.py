"""Wiring shared by the WebUI hosts (A1111, Forge): which host runs us, the one background job,
the tab, the settings and the REST routes. ``scripts/lora_trainer_tab.py`` registers these callbacks
and holds no logic itself.

Host modules are imported inside the functions: this file imports without a WebUI.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import LoraTrainerError
from ..roots import Roots

log = logging.getLogger("lora_trainer")

TAB_TITLE = "LoRA Trainer"
TAB_ID = "lora_trainer"
SETTINGS_SECTION = ("lora_trainer", "LoRA Trainer")
HIDDEN_FIELDS = frozenset({"pretrained_model", "model_config_dir", "output_dir"})

_lock = threading.Lock()
_backend = None
_routed_apps: set[int] = set()


def detect_host() -> str:
    """``"forge"`` when running inside Forge (``modules_forge`` importable, or ``sd_models.forge_model_reload``
    present), else ``"a1111"``."""
    if "modules_forge" in sys.modules:
        return "forge"
    try:
        if importlib.util.find_spec("modules_forge") is not None:
            return "forge"
    except (ImportError, ValueError):
        pass
    sd_models = sys.modules.get("modules.sd_models")
    if sd_models is None and "modules" in sys.modules:
        try:
            from modules import sd_models  # type: ignore[no-redef]
        except Exception:  # noqa: BLE001 - a partial host (tests) or an older one
            sd_models = None
    if sd_models is not None and hasattr(sd_models, "forge_model_reload"):
        return "forge"
    return "a1111"


class UnavailableHost:
    """Stands in when the detected host's adapter cannot be imported: the tab loads and says why."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def lora_dir(self, cfg: TrainConfig | None = None) -> Path:
        from .a1111 import A1111Host

        return A1111Host().lora_dir(cfg)  # both hosts keep --lora-dir in shared.cmd_opts

    def refresh_loras(self) -> None:
        pass

    def model_bundle(self, cfg, runtime):
        raise LoraTrainerError(self.reason)

    def run(self, cfg, events, stop) -> None:
        raise LoraTrainerError(self.reason)


def make_host(kind: str | None = None):
    """The adapter of the host we run in (``kind`` overrides detection)."""
    kind = kind or detect_host()
    if kind == "forge":
        try:
            from .forge import ForgeHost
        except ImportError as e:
            reason = (
                f"Forge was detected, but the Forge adapter (lora_trainer/hosts/forge.py) could not be imported: {e}. "
                "Update or reinstall the LoRA Trainer extension."
            )
            log.error(reason)
            return UnavailableHost("forge", reason)
        return ForgeHost()
    from .a1111 import A1111Host

    return A1111Host()


def _host_clip_skip() -> int | None:
    try:
        from modules import shared

        value = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1))
    except Exception:  # noqa: BLE001 - no host options (tests, a stripped host)
        return None
    return min(max(value, 1), 12)


def _default_lora_dir(host) -> str:
    try:
        return str(host.lora_dir(TrainConfig()))
    except LoraTrainerError as e:  # a bad sub-folder setting: the run reports it too
        log.warning("%s", e)
        return ""
    except Exception:  # noqa: BLE001 - no host (tests)
        return str(Path("models") / "Lora")


def _open_to_the_network() -> str:
    """What the tab should say when the WebUI listens beyond this machine without credentials: then
    anyone who can reach it can start trainings and fill the LoRA folder, through the tab and REST."""
    try:
        from modules import shared

        opts = shared.cmd_opts
    except Exception:  # noqa: BLE001 - no host (tests, a stripped host)
        return ""
    listening = getattr(opts, "listen", False) or getattr(opts, "share", False) or getattr(opts, "server_name", None)
    if not listening:
        return ""
    missing = [flag for flag, attr in (("--gradio-auth", "gradio_auth"), ("--api-auth", "api_auth")) if not getattr(opts, attr, None)]
    if not missing:
        return ""
    return (
        "the WebUI is reachable from other machines (--listen/--share/--server-name) without "
        f"{' and '.join(missing)}: anyone who can reach it can start a training here. Add {' and '.join(missing)} user:password."
    )


def make_backend(kind: str | None = None):
    """One TrainingJob over the detected host, and the tab's backend for it."""
    from ..job import TrainingJob
    from ..ui.tab import TabBackend
    from .host_tools import host_captioners, host_upscalers

    host = make_host(kind)
    job = TrainingJob(host.run, grid=getattr(host, "build_grid", None))

    def defaults() -> TrainConfig:
        cfg = TrainConfig(output_dir=_default_lora_dir(host))
        skip = _host_clip_skip()
        if skip is not None:
            cfg.clip_skip = skip
        return cfg

    folder = _default_lora_dir(host)
    name = "Forge" if host.name == "forge" else "AUTOMATIC1111"
    notes = (
        f"Trains a LoRA on the checkpoint loaded in {name} (no second copy, no reload); generation waits while it "
        f"trains. Each saved epoch goes into the LoRA folder{f' ({folder})' if folder else ''} and appears in the "
        "Lora list. SD1.x, SD2.x and SDXL checkpoints; the sub-folder is set in Settings > LoRA Trainer."
    )
    if isinstance(host, UnavailableHost):
        notes = host.reason
    elif exposure := _open_to_the_network():
        notes += f" Warning: {exposure}"
    return TabBackend(
        host_name=host.name,
        start=job.start,
        stop=job.stop,
        status=job.status,
        start_grid=job.start_grid if getattr(host, "build_grid", None) else None,
        lora_folder=host.lora_dir,
        defaults=defaults,
        hidden_fields=HIDDEN_FIELDS,
        notes=notes,
        extra={"job": job, "host": host, "upscalers": host_upscalers, "captioners": host_captioners},
    )


def get_backend():
    """The process-wide backend: one job, shared by the tab (and its reloads) and the REST routes."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = make_backend()
        return _backend


def _error_tab(gr, message: str):
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.HTML(f'<h3>{TAB_TITLE}</h3><p class="lora_trainer_error">{html.escape(message)}</p>')
    return blocks


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    """``script_callbacks.on_ui_tabs``: the training tab. A failure to build it leaves a tab that says why."""
    try:
        import gradio as gr
    except ImportError:
        log.error("LoRA Trainer: gradio is not importable; the tab is not shown")
        return []
    try:
        from ..ui.tab import build_tab

        blocks = build_tab(get_backend())
    except Exception as e:  # noqa: BLE001 - the WebUI must start even if our tab cannot be built
        log.exception("LoRA Trainer: building the tab failed")
        missing = getattr(e, "name", None) if isinstance(e, ImportError) else None
        hint = f" The package '{missing}' is missing." if missing else ""
        blocks = _error_tab(gr, f"The LoRA Trainer tab could not be built: {type(e).__name__}: {e}.{hint}")
    return [(blocks, TAB_TITLE, TAB_ID)]


def on_ui_settings() -> None:
    """``script_callbacks.on_ui_settings``: our options in their own section."""
    from modules import shared

    def option(default, label):
        return shared.OptionInfo(default, label, section=SETTINGS_SECTION)

    shared.opts.add_option(
        "lora_trainer_subfolder",
        option("", "LoRA sub-folder for saved files (inside the Lora folder; empty = the Lora folder itself)"),
    )
    shared.opts.add_option(
        "lora_trainer_grid_after_training",
        option(True, "Make an epochs x weights preview grid after training"),
    )
    shared.opts.add_option(
        "lora_trainer_unload_unused",
        option(False, "While training, move what training does not need to the CPU (the VAE once latents are cached)"),
    )
    shared.opts.add_option(
        "lora_trainer_rest_data_roots",
        option("", "Folders whose datasets REST requests may train on (one per line; empty = the WebUI's folder)"),
    )


def rest_roots() -> Roots:
    """Where a REST request may point training inside a WebUI: the folders of the setting, else the
    WebUI's own folder. The tab is the WebUI user's own page and takes any folder; a request may come
    from any program on the machine (or the network, with --listen), and must not probe or read
    folders the user never offered. Read at each request, so a changed setting counts at once."""
    from modules import shared

    setting = str(getattr(shared.opts, "lora_trainer_rest_data_roots", "") or "")
    folders = [line.strip() for line in setting.replace(",", "\n").splitlines() if line.strip()]
    if not folders:
        folders = [getattr(shared.cmd_opts, "data_dir", None) or os.getcwd()]
    return Roots.of(folders)


def on_app_started(demo: Any, app: Any) -> None:
    """``script_callbacks.on_app_started``: the REST routes, behind the host's ``--api-auth`` credentials
    when it has them; files can only be written inside the LoRA folder."""
    from modules import shared

    from ..api import add_routes, parse_credentials

    if app is None or id(app) in _routed_apps:
        return
    backend = get_backend()
    host = backend.extra["host"]
    credentials = parse_credentials(getattr(getattr(shared, "cmd_opts", None), "api_auth", None)) or None
    try:
        def start(cfg: TrainConfig) -> None:
            rest_roots().check(cfg)
            backend.start(cfg)

        add_routes(
            app,
            start=start,
            stop=backend.stop,
            status=backend.status,
            defaults=backend.defaults,
            lora_dir=host.lora_dir,
            credentials=credentials,
            fixed_fields={"output_dir": _default_lora_dir(host)},
            start_grid=backend.start_grid,
        )
    except ImportError as e:
        log.error("LoRA Trainer: REST routes not added (%s is missing)", getattr(e, "name", e))
        return
    _routed_apps.add(id(app))
