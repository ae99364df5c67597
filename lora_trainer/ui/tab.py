"""The training tab, built from the config's fields. Works on gradio 3.41 (A1111) and 4.40 (Forge).

No training logic here: the tab reads a :class:`TrainConfig` from its form, hands it to a
backend (the background job of the host it runs in) and shows the job's status snapshots.
"""

# no "from __future__ import annotations": gradio reads handler annotations (gr.SelectData) at runtime

import dataclasses
import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import LoraTrainerError
from ..job import JobStatus

SECTION_TITLES = {
    "model": "Base model",
    "dataset": "Dataset",
    "network": "Network (LoRA)",
    "optimizer": "Optimizer and learning rate",
    "training": "Training",
    "output": "Output",
    "grid": "Grid of epochs x weights",
}
OPEN_SECTIONS = ("model", "dataset", "network")


@dataclass
class TabBackend:
    """What the tab needs from a host."""

    host_name: str
    start: Callable[[TrainConfig], None]
    stop: Callable[[bool], bool]
    status: Callable[[], JobStatus]
    defaults: Callable[[], TrainConfig] = TrainConfig
    start_grid: Callable[[TrainConfig, list[str]], None] | None = None
    """Build a grid of saved LoRA files in the background (the "Build grid" button)."""
    lora_folder: Callable[[TrainConfig], Path] | None = None
    """Where the LoRA files of a config go (the host's LoRA folder, or output_dir standalone)."""
    hidden_fields: frozenset[str] = frozenset()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def form_fields(backend: TabBackend) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in backend.hidden_fields]


def config_from_values(backend: TabBackend, values: list[Any]) -> TrainConfig:
    base = backend.defaults().to_dict()
    for f, v in zip(form_fields(backend), values):
        if v is None and f.type in ("int", "float"):
            continue
        base[f.name] = v
    return TrainConfig.from_dict(base, source="the form")


def render_status(s: JobStatus) -> str:
    """The progress block: state, step/total, epoch, ETA, loss, learning rate."""

    def t(sec: float | None) -> str:
        if sec is None:
            return "-"
        sec = int(sec)
        return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"

    lr = ", ".join(f"{k} {v:.2e}" for k, v in s.lrs.items()) or "-"
    pct = f"{100 * s.progress:.0f}%"
    rows = [
        ("state", s.state + (f" ({s.cache_done}/{s.cache_total})" if s.state == "caching latents" else "")
         + (f" ({s.grid_done}/{s.grid_total} cells)" if s.state == "building grid" else "")),
        ("step", f"{s.step} / {s.total_steps}  ({pct})" if s.total_steps else "-"),
        ("epoch", f"{s.epoch} / {s.epochs}" if s.epochs else "-"),
        ("elapsed / ETA", f"{t(s.elapsed)} / {t(s.eta)}"),
        ("loss (current / average)", "-" if s.loss is None else f"{s.loss:.4f} / {s.loss_average:.4f}"),
        ("learning rate", lr),
    ]
    if s.validation:
        where = "held-out images" if s.validation_held_out else "training images"
        vals = ", ".join(("start" if e == 0 else f"e{e}") + f" {v:.4f}" for e, v in s.validation[-6:])
        best = f"; lowest: epoch {s.best_epoch}" if s.best_epoch else ""
        rows.append((f"validation loss ({where})", vals + best))
    help_attr = ' title="' + html.escape(VALIDATION_HELP) + '"'
    body = "".join(
        "<tr><td" + (help_attr if k.startswith("validation") else "") + ">"
        + f"{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    bar = f'<div class="lora_trainer_bar"><div style="width:{pct}"></div></div>'
    err = f'<p class="lora_trainer_error">{html.escape(s.error)}</p>' if s.error else ""
    return f'<div id="lora_trainer_status_box" data-state="{html.escape(s.state)}">{bar}<table>{body}</table>{err}</div>'


VALIDATION_HELP = (
    "Validation loss: the same noise and timesteps every epoch, on held-out images (validation_split) or on "
    "training images. Lower means the LoRA predicts these images better; it does not tell whether pictures look "
    "like the subject, and on training images it keeps falling as the LoRA memorises them. Pick with the grid."
)


def render_files(s: JobStatus) -> str:
    if not s.files:
        return "<p>No LoRA saved yet. Each saved epoch appears here with its prompt tag.</p>"
    items = []
    for f in s.files:
        tag = html.escape(f.tag())
        label = "final" if f.final else f"epoch {f.epoch}"
        items.append(
            f'<li><code class="lora_trainer_tag">{tag}</code> <span>{label}, step {f.step}</span> '
            f'<button class="lora_trainer_send" onclick="loraTrainerSendToTxt2img(\'{tag}\')">to txt2img</button></li>'
        )
    return '<ul id="lora_trainer_files">' + "".join(items) + "</ul>"


def render_log(s: JobStatus) -> str:
    return "\n".join(s.messages[-30:])


def loss_figure(s: JobStatus):
    """A matplotlib figure of loss and moving average (gr.Plot works the same in 3.41 and 4.40)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.6), dpi=90)
    ax = fig.add_subplot(111)
    if s.loss_history:
        steps = [h[0] for h in s.loss_history]
        ax.plot(steps, [h[1] for h in s.loss_history], lw=0.8, alpha=0.45, label="loss")
        ax.plot(steps, [h[2] for h in s.loss_history], lw=1.6, label="average")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    return fig


def lora_names(folder: Path | None) -> list[str]:
    """The LoRA files of ``folder`` as names relative to it (``face-000003.safetensors``,
    ``sub/face.safetensors``), oldest first, so a run's epochs stay in order."""
    if folder is None:
        return []
    from ..grid import lora_files_in

    return [Path(f).relative_to(folder).as_posix() for f in lora_files_in(folder)]


def _component(gr, f: dataclasses.Field, value: Any):
    label = f.name
    info = f.metadata.get("help", "")
    kw = {"label": label, "value": value, "elem_id": f"lora_trainer_{f.name}"}
    if "choices" in f.metadata:
        return gr.Dropdown(choices=list(f.metadata["choices"]), info=info, **kw)
    if f.type == "bool":
        return gr.Checkbox(info=info, **kw)
    if f.type == "int":
        return gr.Number(precision=0, info=info, **kw)
    if f.type == "float":
        return gr.Number(info=info, **kw)
    return gr.Textbox(lines=1, info=info, **kw)


def _prepare_tab(backend: TabBackend):
    """The dataset-preparation sub-tab; the training tab still works if it cannot be built."""
    import gradio as gr

    try:
        from .prepare_tab import build_prepare_tab

        tools = {k: backend.extra[k]() for k in ("upscalers", "captioners") if callable(backend.extra.get(k))}
        return build_prepare_tab(defaults=backend.defaults, user_preset_dir=backend.extra.get("user_preset_dir"), **tools)
    except Exception as e:  # noqa: BLE001 - an optional part must not take the training tab down
        gr.HTML(f'<p class="lora_trainer_error">Dataset preparation is unavailable: {html.escape(str(e))}</p>')
        return None


def build_tab(backend: TabBackend, poll_seconds: float = 1.0, css: str | None = None):
    """The tab's ``gr.Blocks`` (A1111/Forge put it in ``on_ui_tabs``; standalone launches it)."""
    import gradio as gr

    defaults = backend.defaults()
    fields = form_fields(backend)
    inputs = []
    with gr.Blocks(analytics_enabled=False, css=css) as tab:
        gr.HTML(
            f"<h3>LoRA Trainer <small>({html.escape(backend.host_name)})</small></h3>"
            + (f"<p>{html.escape(backend.notes)}</p>" if backend.notes else "")
        )
        with gr.Tabs():
            with gr.Tab("Train", elem_id="lora_trainer_train_tab"):
                with gr.Row():
                    with gr.Column(scale=3):
                        by_section: dict[str, list[dataclasses.Field]] = {}
                        for f in fields:
                            by_section.setdefault(f.metadata["section"], []).append(f)
                        comps: dict[str, Any] = {}
                        for section, sfields in by_section.items():
                            with gr.Accordion(SECTION_TITLES.get(section, section), open=section in OPEN_SECTIONS):
                                for i in range(0, len(sfields), 2):
                                    with gr.Row():
                                        for f in sfields[i : i + 2]:
                                            comps[f.name] = _component(gr, f, getattr(defaults, f.name))
                        inputs = [comps[f.name] for f in fields]
                    with gr.Column(scale=2):
                        with gr.Row():
                            start_btn = gr.Button("Start", variant="primary", elem_id="lora_trainer_start")
                            stop_btn = gr.Button("Stop", elem_id="lora_trainer_stop")
                            save_btn = gr.Button("Stop and save", elem_id="lora_trainer_stop_save")
                        message = gr.HTML("", elem_id="lora_trainer_message")
                        status_html = gr.HTML(render_status(backend.status()), elem_id="lora_trainer_progress")
                        plot = gr.Plot(label="loss", elem_id="lora_trainer_loss_plot")
                        files_html = gr.HTML(render_files(backend.status()), elem_id="lora_trainer_saved")
                        grid_img = gr.Image(label="epochs x weights (click a cell for its tag)", type="filepath",
                                            interactive=False, elem_id="lora_trainer_grid")
                        grid_tag = gr.Textbox(label="tag of the clicked cell", interactive=False, elem_id="lora_trainer_grid_tag")
                        with gr.Accordion("Build a grid from saved LoRA files", open=False,
                                          visible=backend.start_grid is not None, elem_id="lora_trainer_grid_builder"):
                            grid_files = gr.Dropdown(
                                label="LoRA files (the grid's columns)", choices=[], value=[], multiselect=True,
                                elem_id="lora_trainer_grid_files",
                                info="Weights, seed, prompt and steps come from the form's grid section.",
                            )
                            with gr.Row():
                                grid_list_btn = gr.Button("Refresh list", elem_id="lora_trainer_grid_list")
                                grid_build_btn = gr.Button("Build grid", elem_id="lora_trainer_grid_build")
                        log = gr.Textbox(label="log", lines=8, max_lines=8, interactive=False, elem_id="lora_trainer_log")

            with gr.Tab("Prepare dataset", elem_id="lora_trainer_prepare_tab"):
                prep = _prepare_tab(backend)
        if prep is not None:
            from .prepare_tab import connect_to_form

            connect_to_form(prep, inputs, [f.name for f in fields])

        def on_start(*values):
            try:
                cfg = config_from_values(backend, list(values))
                backend.start(cfg)
            except LoraTrainerError as e:
                return f'<p class="lora_trainer_error">{html.escape(str(e))}</p>'
            return "<p>Training started.</p>"

        def on_stop():
            return "<p>Stopping: the unfinished epoch is discarded.</p>" if backend.stop(False) else "<p>Nothing is running.</p>"

        def on_stop_save():
            return "<p>Stopping and saving the LoRA as it is now.</p>" if backend.stop(True) else "<p>Nothing is running.</p>"

        last_plot: dict[str, Any] = {"n": -1, "grid": None, "files": None}
        # the folder the grid's file list was read from: names in the list are relative to it
        listing: dict[str, Path | None] = {"folder": None}

        def list_update(folder: Path | None, chosen: list[str] | None = None):
            listing["folder"] = folder
            names = lora_names(folder)
            value = [n for n in (chosen or []) if n in names]
            return gr.update(choices=names, value=value)

        def on_grid_list(current, *values):
            try:
                folder = backend.lora_folder(config_from_values(backend, list(values))) if backend.lora_folder else None
            except LoraTrainerError:
                folder = listing["folder"]
            return list_update(folder, list(current or []))

        def on_build_grid(chosen, *values):
            if backend.start_grid is None:
                return "<p>This host cannot build grids.</p>"
            folder = listing["folder"]
            if not chosen or folder is None:
                return '<p class="lora_trainer_error">Choose saved LoRA files in the list first (Refresh list).</p>'
            try:
                cfg = config_from_values(backend, list(values))
                backend.start_grid(cfg, [str(folder / name) for name in chosen])
            except LoraTrainerError as e:
                return f'<p class="lora_trainer_error">{html.escape(str(e))}</p>'
            return f"<p>Building a grid of {len(chosen)} files.</p>"

        def refresh():
            s = backend.status()
            n = len(s.loss_history)
            fig = gr.update() if n == last_plot["n"] else loss_figure(s)
            last_plot["n"] = n
            grid = gr.update() if s.grid_path == last_plot["grid"] else s.grid_path
            last_plot["grid"] = s.grid_path
            # the file list follows the run: each new epoch file is listed and chosen
            files_update = gr.update()
            if s.files and s.files != last_plot["files"]:
                folder = Path(s.files[0].path).parent
                files_update = list_update(folder, [Path(f.path).name for f in s.files])
            last_plot["files"] = s.files
            return render_status(s), fig, render_files(s), render_log(s), grid, files_update

        def on_grid_select(evt: gr.SelectData):
            path = backend.status().grid_path
            if not path or evt is None or evt.index is None:
                return ""
            from ..grid import cell_tag_from_png

            x, y = evt.index[0], evt.index[1]
            return cell_tag_from_png(path, int(x), int(y)) or ""

        start_btn.click(on_start, inputs=inputs, outputs=[message])
        stop_btn.click(on_stop, inputs=[], outputs=[message])
        save_btn.click(on_stop_save, inputs=[], outputs=[message])
        grid_img.select(on_grid_select, inputs=None, outputs=[grid_tag])
        grid_list_btn.click(on_grid_list, inputs=[grid_files, *inputs], outputs=[grid_files])
        grid_build_btn.click(on_build_grid, inputs=[grid_files, *inputs], outputs=[message])
        tab.load(on_grid_list, inputs=[grid_files, *inputs], outputs=[grid_files])
        tab.load(refresh, inputs=[], outputs=[status_html, plot, files_html, log, grid_img, grid_files], every=poll_seconds)
    # for tests: the form's components and the handlers gradio calls
    tab.lora_trainer_inputs = inputs
    tab.lora_trainer_handlers = {
        "start": on_start, "stop": on_stop, "stop_save": on_stop_save, "refresh": refresh, "grid_select": on_grid_select,
        "grid_list": on_grid_list, "build_grid": on_build_grid,
    }
    return tab
