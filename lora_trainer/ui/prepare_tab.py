"""The dataset-preparation sub-tab: report, crop/enlarge, tags, layout and repeats, presets, kohya_ss import.

Works on gradio 3.41 (A1111) and 4.40 (Forge): no ``js=`` / ``concurrency_limit=`` / ``.style()``,
uploaded files read through ``getattr(f, "name", f)`` (3.41 hands a temp-file object, 4.40 a path).
The logic is in :class:`PrepareActions`, whose methods take and return plain values (strings,
numbers, lists, dicts), so it is tested without gradio; :func:`build_prepare_tab` only wires them.

The tab carries one *prepared config* (a ``gr.State`` holding ``TrainConfig.to_dict()`` and a TOML
view of it): a preset, a kohya_ss import or a written layout updates it, and ``on_config`` (when
given) receives it as a :class:`TrainConfig` each time.
"""

# no "from __future__ import annotations": gradio inspects handler signatures at runtime

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..dataset.report import HEADERS as REPORT_HEADERS
from ..errors import LoraTrainerError

FREQ_HEADERS = ["tag", "captions"]
_GALLERY_LIMIT = 48


def _table(headers: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    """A Dataframe value both gradio versions accept as it is."""
    return {"headers": list(headers), "data": rows if rows else [["" for _ in headers]]}


def _error(e: BaseException) -> str:
    return f"Error: {e}"


def _path_of(f: Any) -> str:
    """An uploaded file's path: gradio 3.41 gives a temp-file object, 4.40 a string (or None)."""
    if f is None:
        return ""
    if isinstance(f, (list, tuple)):
        f = f[0] if f else None
        if f is None:
            return ""
    return str(getattr(f, "name", f) or "")


class PrepareActions:
    """What the tab's buttons do; every method returns the values of its outputs."""

    def __init__(
        self,
        defaults: Callable[[], TrainConfig] | TrainConfig | None = None,
        user_preset_dir: str | Path | None = None,
        on_config: Callable[[TrainConfig], None] | None = None,
        upscaler: Callable | None = None,
        upscalers: dict[str, Callable] | None = None,
        captioners: dict[str, Callable] | None = None,
    ):
        if defaults is None:
            self._defaults: Callable[[], TrainConfig] = TrainConfig
        elif isinstance(defaults, TrainConfig):
            self._defaults = lambda: TrainConfig.from_dict(defaults.to_dict())
        else:
            self._defaults = defaults
        self.user_preset_dir = Path(user_preset_dir).expanduser() if user_preset_dir else None
        self.on_config = on_config
        self.upscaler = upscaler
        self.upscalers = dict(upscalers or {})
        """The host's upscalers by name (chosen in the Crop tab); LANCZOS when none is chosen."""
        self.captioners = dict(captioners or {})
        """The host's captioners by name: ``captioner(image) -> str``, optional ``start()`` / ``stop()``."""

    # ---------------------------------------------------------------- config state
    def initial_state(self) -> dict[str, Any]:
        return self._defaults().to_dict()

    def config_of(self, state: dict[str, Any] | None) -> TrainConfig:
        return TrainConfig.from_dict(state) if state else self._defaults()

    def _publish(self, cfg: TrainConfig) -> tuple[str, dict[str, Any]]:
        if self.on_config is not None:
            self.on_config(cfg)
        return cfg.to_toml(), cfg.to_dict()

    # ---------------------------------------------------------------- report
    def report(self, folder: str, resolution: float, caption_extension: str, count_faces: bool):
        from ..dataset.report import dataset_report

        try:
            rep = dataset_report(
                folder.strip(), resolution=int(resolution or 512), caption_extension=caption_extension or ".txt",
                faces=None if count_faces else False,
            )
        except (LoraTrainerError, ValueError, OSError) as e:
            return _table(REPORT_HEADERS, []), _error(e)
        return _table(REPORT_HEADERS, rep.rows()), rep.summary()

    # ---------------------------------------------------------------- crop / enlarge
    def crop(self, source: str, out_dir: str, mode: str, size: float, margin: float, color: str, overwrite: bool,
             upscaler_name: str | None = None):
        from ..dataset.faces import crop_images

        upscaler = self.upscalers.get(upscaler_name or "", self.upscaler)
        try:
            rep = crop_images(
                source.strip(), out_dir.strip(), mode=mode or "face", size=int(size or 512), margin=float(margin),
                color=color or "#ffffff", upscaler=upscaler, overwrite=bool(overwrite),
            )
        except (LoraTrainerError, ValueError, OSError) as e:
            return _error(e), []
        return rep.summary(), [str(p) for p in rep.written[:_GALLERY_LIMIT]]

    # ---------------------------------------------------------------- tags
    def edit_tags(
        self, folder: str, caption_extension: str, trigger: str, remove: str, replace: str, dedupe: bool,
        create_missing: bool, dry_run: bool,
    ) -> str:
        from ..dataset.captions import split_tags
        from ..dataset.prepare import edit_captions, parse_replacements

        try:
            res = edit_captions(
                folder.strip(), trigger=(trigger or "").strip() or None, remove=split_tags(remove or ""),
                replace=parse_replacements(replace or ""), dedupe=bool(dedupe),
                caption_extension=caption_extension or ".txt", create_missing=bool(create_missing), dry_run=bool(dry_run),
            )
        except (LoraTrainerError, ValueError, OSError) as e:
            return _error(e)
        listed = [str(p) for p in (res.changed + res.created)[:20]]
        return res.summary() + ("\n" + "\n".join(listed) if listed else "")

    def caption(self, folder: str, captioner_name: str, caption_extension: str, trigger: str, overwrite: bool) -> str:
        from ..dataset.prepare import caption_images

        captioner = self.captioners.get(captioner_name or "")
        if captioner is None:
            return (
                "No captioner chosen. In a WebUI the list holds its BLIP / DeepBooru interrogators (and a WD14 "
                "tagger extension's models); otherwise write captions yourself, or use 'caption images without one'."
            )
        try:
            res = caption_images(
                folder.strip(), captioner, caption_extension=caption_extension or ".txt", overwrite=bool(overwrite),
                prefix=(trigger or "").strip(),
            )
        except (LoraTrainerError, ValueError, OSError) as e:
            return _error(e)
        return res.summary() + ("\n" + "\n".join(str(p) for p in res.written[:20]) if res.written else "")

    def tag_frequencies(self, folder: str, caption_extension: str):
        from ..dataset.prepare import tag_frequencies

        try:
            freq = tag_frequencies(folder.strip(), caption_extension or ".txt")
        except (LoraTrainerError, ValueError, OSError) as e:
            return _table(FREQ_HEADERS, [[_error(e), ""]])
        return _table(FREQ_HEADERS, [[t, n] for t, n in freq])

    # ---------------------------------------------------------------- repeats and layout
    def repeats(self, source: str, target_steps: float, epochs: float, batch: float, accum: float):
        """``(repeats, formula text)`` for the images in ``source``."""
        from ..dataset.prepare import list_images, repeats_for

        try:
            n = len(list_images(source.strip()))
            if not n:
                return 1, f"Error: no images in {source}"
            r, _per, _total, text = repeats_for(int(target_steps), n, int(epochs), int(batch), int(accum or 1))
        except (LoraTrainerError, ValueError, TypeError) as e:
            return 1, _error(e)
        return r, f"{n} images\n{text}"

    def layout(
        self, project: str, name: str, source: str, repeats: float, caption_extension: str, convert_all: bool,
        overwrite: bool, state: dict[str, Any] | None,
    ):
        """``(summary, config TOML, config state)``: the config now points at the project."""
        from ..dataset.prepare import write_layout

        try:
            res = write_layout(
                project.strip(), name, source.strip(), int(repeats), caption_extension=caption_extension or ".txt",
                convert_all=bool(convert_all), overwrite=bool(overwrite),
            )
            cfg = self.config_of(state)
            values = {**cfg.to_dict(), **res.config_values(), "caption_extension": caption_extension or ".txt"}
            cfg = TrainConfig.from_dict(values, source="the layout").validate()
        except (LoraTrainerError, ValueError, OSError) as e:
            cfg = self.config_of(state)
            return _error(e), cfg.to_toml(), cfg.to_dict()
        toml, new_state = self._publish(cfg)
        return res.summary(), toml, new_state

    # ---------------------------------------------------------------- presets
    def preset_names(self) -> list[str]:
        from ..presets import list_presets

        return list_presets(self.user_preset_dir)

    def apply_preset(self, name: str, state: dict[str, Any] | None):
        """``(config TOML, message, config state)``: the preset's settings, the current run's folders."""
        from ..presets import load_preset, presets_info

        current = self.config_of(state)
        if not name:
            return current.to_toml(), "Pick a preset first.", current.to_dict()
        try:
            cfg = load_preset(name, base=current, user_folder=self.user_preset_dir)
        except LoraTrainerError as e:
            return current.to_toml(), _error(e), current.to_dict()
        info = next((i for i in presets_info(self.user_preset_dir) if i.name == name), None)
        toml, new_state = self._publish(cfg)
        return toml, f"Preset '{name}' applied." + (f" {info.description}" if info and info.description else ""), new_state

    def save_preset(self, name: str, state: dict[str, Any] | None, overwrite: bool) -> str:
        from ..presets import save_user_preset

        if self.user_preset_dir is None:
            return "Error: no folder for user presets is configured."
        try:
            path = save_user_preset(name, self.config_of(state), self.user_preset_dir, overwrite=bool(overwrite))
        except LoraTrainerError as e:
            return _error(e)
        return f"Saved {path}"

    # ---------------------------------------------------------------- kohya_ss
    def import_kohya(self, upload: Any, path_text: str, state: dict[str, Any] | None):
        """``(config TOML, notes, config state)`` from an uploaded (or named) kohya_ss JSON."""
        from ..kohya_ss import import_kohya_ss

        current = self.config_of(state)
        path = _path_of(upload) or (path_text or "").strip()
        if not path:
            return current.to_toml(), "Upload a kohya_ss JSON file or type its path.", current.to_dict()
        try:
            cfg, unknown, notes = import_kohya_ss(path, base=self._defaults())
        except LoraTrainerError as e:
            return current.to_toml(), _error(e), current.to_dict()
        lines = [f"Imported {Path(path).name}."] + [f"- {n}" for n in notes]
        if unknown:
            lines.append(f"Keys with no equivalent here ({len(unknown)}): " + ", ".join(unknown))
        toml, new_state = self._publish(cfg)
        return toml, "\n".join(lines), new_state

    def export_kohya(self, out_path: str, state: dict[str, Any] | None, overwrite: bool) -> str:
        from ..kohya_ss import export_kohya_ss

        out = Path((out_path or "").strip()).expanduser()
        if not str(out_path or "").strip():
            return "Error: give the path of the JSON file to write."
        if out.exists() and not overwrite:
            return f"Error: {out} exists already; tick overwrite to replace it."
        try:
            data = export_kohya_ss(self.config_of(state))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
        except (LoraTrainerError, OSError) as e:
            return _error(e)
        return f"Written {out} (kohya_ss: Configuration > Open)."


def build_prepare_tab(
    defaults: Callable[[], TrainConfig] | TrainConfig | None = None,
    user_preset_dir: str | Path | None = None,
    on_config: Callable[[TrainConfig], None] | None = None,
    upscaler: Callable | None = None,
    upscalers: dict[str, Callable] | None = None,
    captioners: dict[str, Callable] | None = None,
):
    """The ``gr.Blocks`` of the Prepare sub-tab.

    ``defaults``: the host's default config (or a callable giving it); ``user_preset_dir``: where
    user presets are saved; ``on_config``: called with every config the tab produces; ``upscaler``:
    ``upscaler(image, scale) -> image`` to enlarge small crops, LANCZOS when None; ``upscalers`` /
    ``captioners``: the host's own, by name, offered in the Crop and Tags tabs.
    The returned Blocks has ``lora_trainer_prepare``: the config components (``config_state``,
    ``config_toml``) for wiring into the training form, and the ``actions`` / ``handlers``.
    """
    import gradio as gr

    act = PrepareActions(defaults, user_preset_dir, on_config, upscaler, upscalers, captioners)
    start = act.config_of(None)
    with gr.Blocks(analytics_enabled=False) as tab:
        config_state = gr.State(start.to_dict())
        with gr.Tab("Report"):
            with gr.Row():
                rep_folder = gr.Textbox(label="image folder", placeholder="/path/to/images", elem_id="lora_trainer_prep_report_folder")
                rep_res = gr.Number(label="training resolution", value=start.resolution, precision=0)
                rep_ext = gr.Textbox(label="caption extension", value=start.caption_extension)
                rep_faces = gr.Checkbox(label="count faces (OpenCV)", value=True)
            rep_btn = gr.Button("Inspect (nothing is changed)", variant="primary", elem_id="lora_trainer_prep_report")
            rep_summary = gr.Textbox(label="summary", lines=6, interactive=False)
            rep_table = gr.Dataframe(headers=REPORT_HEADERS, interactive=False, wrap=True)
        with gr.Tab("Crop / enlarge"):
            with gr.Row():
                crop_src = gr.Textbox(label="source folder (only read)")
                crop_out = gr.Textbox(label="output folder (PNG crops)")
            with gr.Row():
                crop_mode = gr.Radio(["face", "center", "pad"], value="face", label="mode",
                                     info="face: square around the largest face (centre crop when none); pad: whole image on a square")
                crop_size = gr.Number(label="size (px)", value=start.resolution, precision=0)
                crop_margin = gr.Slider(0.0, 2.0, value=0.5, step=0.05, label="margin around the face",
                                        info="in face sizes: 0.3 head only ... 1.5 head and shoulders")
                crop_color = gr.Textbox(label="pad colour", value="#ffffff")
                crop_over = gr.Checkbox(label="overwrite existing outputs", value=False)
                crop_up = gr.Dropdown(["Lanczos (built in)", *act.upscalers], value="Lanczos (built in)",
                                      label="enlarge small crops with", elem_id="lora_trainer_prep_upscaler",
                                      info="the WebUI's upscalers (ESRGAN, SwinIR ...) when it has them; never used "
                                      "on a picture that is already large enough")
            crop_btn = gr.Button("Crop", variant="primary")
            crop_summary = gr.Textbox(label="result", lines=4, interactive=False)
            crop_gallery = gr.Gallery(label="crops", columns=8, height="auto")
        with gr.Tab("Tags"):
            with gr.Row():
                tag_folder = gr.Textbox(label="caption folder (sub-folders too)")
                tag_ext = gr.Textbox(label="caption extension", value=start.caption_extension)
            with gr.Row():
                tag_trigger = gr.Textbox(label="trigger word (put first)", placeholder="ohwx woman")
                tag_remove = gr.Textbox(label="remove tags (comma-separated)")
                tag_replace = gr.Textbox(label="replace (old=new, one a line)", lines=2)
            with gr.Row():
                tag_dedupe = gr.Checkbox(label="remove duplicate tags", value=True)
                tag_create = gr.Checkbox(label="caption images without one (trigger only)", value=False)
                tag_dry = gr.Checkbox(label="dry run", value=False)
            with gr.Row():
                tag_btn = gr.Button("Apply to every caption", variant="primary")
                freq_btn = gr.Button("Tag frequencies")
            with gr.Row():
                cap_dd = gr.Dropdown(list(act.captioners), value=next(iter(act.captioners), None), label="caption with",
                                     elem_id="lora_trainer_prep_captioner",
                                     info="the WebUI's interrogators; the trigger word above goes first"
                                     if act.captioners else "no captioner here: write captions, or use the option above")
                cap_over = gr.Checkbox(label="replace existing captions", value=False)
                cap_btn = gr.Button("Caption images", elem_id="lora_trainer_prep_caption")
            tag_summary = gr.Textbox(label="result", lines=4, interactive=False)
            freq_table = gr.Dataframe(headers=FREQ_HEADERS, interactive=False)
        with gr.Tab("Layout and repeats"):
            with gr.Row():
                lay_project = gr.Textbox(label="project folder", info="gets img/<repeats>_<name>/, model/, log/")
                lay_name = gr.Textbox(label="name", info="caption of images without a caption file, e.g. 'ohwx woman'")
                lay_source = gr.Textbox(label="image folder (copied, captions too)")
            with gr.Row():
                lay_steps = gr.Number(label="target steps", value=1500, precision=0)
                lay_epochs = gr.Number(label="epochs", value=start.max_train_epochs, precision=0)
                lay_batch = gr.Number(label="batch size", value=start.train_batch_size, precision=0)
                lay_accum = gr.Number(label="gradient accumulation", value=start.gradient_accumulation_steps, precision=0)
                lay_repeats = gr.Number(label="repeats", value=10, precision=0)
            lay_formula = gr.Textbox(label="formula", lines=4, interactive=False)
            with gr.Row():
                lay_ext = gr.Textbox(label="caption extension", value=start.caption_extension)
                lay_convert = gr.Checkbox(label="convert every image to PNG", value=False)
                lay_over = gr.Checkbox(label="overwrite existing files", value=False)
                lay_calc = gr.Button("Compute repeats")
                lay_btn = gr.Button("Write layout", variant="primary")
            lay_summary = gr.Textbox(label="result", lines=5, interactive=False)
        with gr.Tab("Presets and kohya_ss"):
            with gr.Row():
                preset_dd = gr.Dropdown(choices=act.preset_names(), label="preset", value=None)
                preset_btn = gr.Button("Apply preset", variant="primary")
            with gr.Row():
                save_name = gr.Textbox(label="save the config below as user preset", placeholder="my face preset")
                save_over = gr.Checkbox(label="overwrite", value=False)
                save_btn = gr.Button("Save preset")
            with gr.Row():
                kohya_file = gr.File(label="kohya_ss LoRA JSON", file_types=[".json"])
                kohya_path = gr.Textbox(label="... or its path")
                kohya_btn = gr.Button("Import kohya_ss config")
            with gr.Row():
                export_path = gr.Textbox(label="export the config below as kohya_ss JSON to")
                export_over = gr.Checkbox(label="overwrite", value=False)
                export_btn = gr.Button("Export")
            preset_msg = gr.Textbox(label="message", lines=4, interactive=False)
        config_toml = gr.Textbox(label="prepared config (TOML)", value=start.to_toml(), lines=12, interactive=False,
                                 elem_id="lora_trainer_prep_config")

        def on_save_preset(name, state, overwrite):
            msg = act.save_preset(name, state, overwrite)
            return msg, gr.update(choices=act.preset_names())

        rep_btn.click(act.report, inputs=[rep_folder, rep_res, rep_ext, rep_faces], outputs=[rep_table, rep_summary])
        crop_btn.click(act.crop, inputs=[crop_src, crop_out, crop_mode, crop_size, crop_margin, crop_color, crop_over, crop_up],
                       outputs=[crop_summary, crop_gallery])
        cap_btn.click(act.caption, inputs=[tag_folder, cap_dd, tag_ext, tag_trigger, cap_over], outputs=[tag_summary])
        tag_btn.click(act.edit_tags, inputs=[tag_folder, tag_ext, tag_trigger, tag_remove, tag_replace, tag_dedupe, tag_create, tag_dry],
                      outputs=[tag_summary])
        freq_btn.click(act.tag_frequencies, inputs=[tag_folder, tag_ext], outputs=[freq_table])
        lay_calc.click(act.repeats, inputs=[lay_source, lay_steps, lay_epochs, lay_batch, lay_accum], outputs=[lay_repeats, lay_formula])
        lay_btn.click(act.layout, inputs=[lay_project, lay_name, lay_source, lay_repeats, lay_ext, lay_convert, lay_over, config_state],
                      outputs=[lay_summary, config_toml, config_state])
        preset_btn.click(act.apply_preset, inputs=[preset_dd, config_state], outputs=[config_toml, preset_msg, config_state])
        save_btn.click(on_save_preset, inputs=[save_name, config_state, save_over], outputs=[preset_msg, preset_dd])
        kohya_btn.click(act.import_kohya, inputs=[kohya_file, kohya_path, config_state], outputs=[config_toml, preset_msg, config_state])
        export_btn.click(act.export_kohya, inputs=[export_path, config_state, export_over], outputs=[preset_msg])

    tab.lora_trainer_prepare = {
        "actions": act,
        "config_state": config_state,
        "config_toml": config_toml,
        "preset_dropdown": preset_dd,
        "handlers": {
            "report": act.report,
            "crop": act.crop,
            "caption": act.caption,
            "edit_tags": act.edit_tags,
            "tag_frequencies": act.tag_frequencies,
            "repeats": act.repeats,
            "layout": act.layout,
            "apply_preset": act.apply_preset,
            "save_preset": on_save_preset,
            "import_kohya": act.import_kohya,
            "export_kohya": act.export_kohya,
        },
        "outputs": {"report_table": rep_table, "freq_table": freq_table, "crop_gallery": crop_gallery},
    }
    return tab


def connect_to_form(prep_tab, form_inputs: list, field_names: list) -> Callable[[dict[str, Any]], list]:
    """Fill a training form from the Prepare tab whenever its prepared config changes.

    Call it inside the parent ``gr.Blocks`` that holds both (gradio attaches listeners to the open
    Blocks). ``form_inputs[i]`` shows config field ``field_names[i]``. Listens on the TOML view's
    ``change`` (a ``gr.State`` has no change event in gradio 3.41). Returns the mapping function.
    """
    prep = prep_tab.lora_trainer_prepare
    names = list(field_names)

    def to_form(state: dict[str, Any]) -> list:
        cfg = TrainConfig.from_dict(state) if state else TrainConfig()
        return [getattr(cfg, n) for n in names]

    prep["config_toml"].change(to_form, inputs=[prep["config_state"]], outputs=list(form_inputs))
    return to_form
