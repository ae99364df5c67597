"""The epochs x weights grid: which cells, one fixed seed, the labels, the PNG.

The grid never samples by itself: it asks a ``generate(cell) -> PIL.Image`` function, which is
the host's own txt2img (``<lora:file:weight>`` in the prompt) inside a WebUI, or the standalone
sampler. Labels are drawn with plain Pillow calls that exist in Pillow 9.5 (A1111) and 10+.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

DEFAULT_WEIGHTS = (0.0, 0.4, 0.6, 0.8, 1.0)
_EPOCH_RE = re.compile(r"-(\d{6})$")
_GRID_NAME_RE = re.compile(r"_grid(-\d+)?$")


@dataclass(frozen=True)
class Column:
    path: str
    label: str
    epoch: int


@dataclass(frozen=True)
class Cell:
    column: Column
    weight: float
    seed: int
    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    sampler_name: str

    @property
    def lora_name(self) -> str:
        return Path(self.column.path).stem

    def tag(self) -> str:
        return f"<lora:{self.lora_name}:{self.weight:g}>"

    def prompt_with_lora(self) -> str:
        """The prompt a user would type: the LoRA tag appended (weight 0 included, so the host's
        code path is the same for every row)."""
        return f"{self.prompt}, {self.tag()}" if self.prompt else self.tag()


@dataclass
class GridSpec:
    files: list[str]
    weights: list[float] = field(default_factory=lambda: list(DEFAULT_WEIGHTS))
    seeds: list[int] = field(default_factory=lambda: [1234])
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = "Euler a"
    best_epoch: int | None = None
    """Epoch with the lowest validation loss: marked on the grid."""

    def columns(self) -> list[Column]:
        cols = [column_for(Path(p)) for p in self.files]
        return sorted(cols, key=lambda c: c.epoch)

    def cells(self) -> list[Cell]:
        """Row-major: for each seed, for each weight, every column."""
        out = []
        for seed in self.seeds:
            for w in self.weights:
                for col in self.columns():
                    out.append(
                        Cell(col, float(w), int(seed), self.prompt, self.negative_prompt, self.steps, self.cfg_scale,
                             self.width, self.height, self.sampler_name)
                    )
        return out


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a file without readable metadata still gets a label from its name
        return {}


def column_for(path: Path) -> Column:
    """'epoch 3' from the metadata (``ss_epoch``) or the ``-000003`` suffix of the name."""
    meta = read_metadata(path) if path.exists() else {}
    epoch = None
    if meta.get("ss_epoch", "").isdigit():
        epoch = int(meta["ss_epoch"])
    m = _EPOCH_RE.search(path.stem)
    if epoch is None and m:
        epoch = int(m.group(1))
    if epoch is None:
        return Column(str(path), path.stem, 10**6)
    return Column(str(path), f"epoch {epoch}", epoch)


def default_prompt(files: list[str], trigger: str = "", top: int = 5) -> str:
    """Trigger word first, then the most frequent dataset tags (from ``ss_tag_frequency``)."""
    counts: Counter[str] = Counter()
    for p in files:
        meta = read_metadata(Path(p))
        try:
            freq = json.loads(meta.get("ss_tag_frequency", "{}"))
        except json.JSONDecodeError:
            continue
        for tags in freq.values():
            counts.update({str(k).strip(): int(v) for k, v in tags.items() if str(k).strip()})
        break  # every epoch file of a run has the same tags
    tags = [t for t, _ in counts.most_common(top + 1) if t != trigger][:top]
    return ", ".join([trigger, *tags] if trigger else tags)


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if hasattr(draw, "textbbox"):  # Pillow >= 8
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0
    return draw.textsize(text, font=font)  # pragma: no cover - very old Pillow


def label_geometry(cell_w: int, cell_h: int) -> tuple[int, int, int]:
    """(top margin, left margin, font size) for a cell size."""
    font_size = max(10, min(32, cell_h // 10))
    return font_size * 2, font_size * 6, font_size


def draw_grid(
    images: list[list[Image.Image]], col_labels: list[str], row_labels: list[str], title: str = ""
) -> Image.Image:
    """Cells in rows (weights) x columns (epochs) with column labels on top and row labels left."""
    rows, cols = len(images), len(images[0]) if images else 0
    cw, ch = images[0][0].size
    top, left, fs = label_geometry(cw, ch)
    title_h = fs * 2 if title else 0
    grid = Image.new("RGB", (left + cols * cw, title_h + top + rows * ch), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(fs)
    if title:
        tw, th = _text_size(draw, title, font)
        draw.text(((grid.width - tw) // 2, (title_h - th) // 2), title, fill="black", font=font)
    for c, text in enumerate(col_labels):
        tw, th = _text_size(draw, text, font)
        draw.text((left + c * cw + (cw - tw) // 2, title_h + (top - th) // 2), text, fill="black", font=font)
    for r, text in enumerate(row_labels):
        tw, th = _text_size(draw, text, font)
        draw.text(((left - tw) // 2, title_h + top + r * ch + (ch - th) // 2), text, fill="black", font=font)
    for r, row in enumerate(images):
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cw, ch)) if img.size != (cw, ch) else img.convert("RGB"),
                       (left + c * cw, title_h + top + r * ch))
    return grid


@dataclass
class GridResult:
    image: Image.Image
    cells: list[Cell]
    images: list[Image.Image]
    path: Path | None = None
    stopped: bool = False


def build_grid(
    spec: GridSpec,
    generate: Callable[[Cell], Image.Image],
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    out_path: str | Path | None = None,
    replace: bool = True,
) -> GridResult:
    """Generate every cell (reporting progress), lay them out and save the PNG with its parameters.

    Several seeds become extra row blocks, labelled with the seed. ``replace``: see :func:`save_grid`."""
    cells = spec.cells()
    if not cells:
        raise ValueError("the grid needs at least one LoRA file, one weight and one seed")
    images: list[Image.Image] = []
    stopped = False
    for i, cell in enumerate(cells):
        if should_stop():
            stopped = True
            break
        images.append(generate(cell))
        if progress:
            progress(i + 1, len(cells))
    cols = spec.columns()
    ncols = len(cols)
    # a stopped grid still shows what was made, padded with blank cells
    blank = Image.new("RGB", images[0].size if images else (spec.width, spec.height), (200, 200, 200))
    padded = images + [blank] * (len(cells) - len(images))
    rows = [padded[r * ncols : (r + 1) * ncols] for r in range(len(cells) // ncols)]
    row_labels = []
    for seed in spec.seeds:
        for w in spec.weights:
            row_labels.append(f"w {w:g}" + (f" / seed {seed}" if len(spec.seeds) > 1 else ""))
    labels = [c.label + (" *" if spec.best_epoch is not None and c.epoch == spec.best_epoch else "") for c in cols]
    title = f"* lowest validation loss: epoch {spec.best_epoch}" if spec.best_epoch is not None else ""
    grid = draw_grid(rows, labels, row_labels, title=title)
    result = GridResult(grid, cells, images, stopped=stopped)
    if out_path is not None:
        infotexts = [str(getattr(im, "info", {}).get("parameters", "")) for im in images]
        result.path = save_grid(grid, out_path, spec, infotexts if any(infotexts) else None, replace=replace)
    return result


def grid_parameters(spec: GridSpec) -> dict:
    d = asdict(spec)
    d["columns"] = [asdict(c) for c in spec.columns()]
    return d


def save_grid(
    image: Image.Image,
    path: str | Path,
    spec: GridSpec,
    cell_infotexts: list[str] | None = None,
    *,
    replace: bool = True,
) -> Path:
    """PNG with its parameters in the PNG text (``lora_trainer_grid`` as JSON, ``parameters`` as text)
    and, when the cells came from a WebUI's txt2img, each cell's infotext as the WebUI wrote it
    (``lora_trainer_cells``, JSON, row-major like the cells: the "Lora hashes" of each file).

    ``replace``: the running training rewrites its own grid as it grows; without it an existing
    grid is never replaced and the next free name (``_grid-2.png`` ...) is taken, even when another
    grid took ``path`` after it was chosen. Returns the path written."""
    from .files import write_file

    info = PngInfo()
    params = grid_parameters(spec)
    info.add_text("lora_trainer_grid", json.dumps(params))
    if cell_infotexts:
        info.add_text("lora_trainer_cells", json.dumps(cell_infotexts))
    info.add_text(
        "parameters",
        f"{spec.prompt}\nNegative prompt: {spec.negative_prompt}\nSteps: {spec.steps}, Sampler: {spec.sampler_name}, "
        f"CFG scale: {spec.cfg_scale:g}, Seed: {', '.join(map(str, spec.seeds))}, Size: {spec.width}x{spec.height}, "
        f"LoRA weights: {', '.join(f'{w:g}' for w in spec.weights)}, "
        f"Epochs: {', '.join(c.label for c in spec.columns())}",
    )
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    path = Path(path)
    while True:
        try:
            return write_file(path, buf.getvalue(), replace=replace)
        except FileExistsError:
            path = free_grid_path(path.parent, _GRID_NAME_RE.sub("", path.stem))


def cell_at(result: GridResult, spec: GridSpec, x: int, y: int) -> Cell | None:
    """The cell under a click at (x, y) on the grid image (for 'click a cell to get its tag')."""
    cw, ch = spec.width, spec.height
    if result.images:
        cw, ch = result.images[0].size
    top, left, fs = label_geometry(cw, ch)
    top += fs * 2 if spec.best_epoch is not None else 0
    col, row = (x - left) // cw, (y - top) // ch
    ncols = len(spec.columns())
    if x < left or y < top or col >= ncols or row * ncols + col >= len(result.cells):
        return None
    return result.cells[row * ncols + col]


def grid_spec_from_config(cfg, files: list[str], trigger: str = "", validation: dict[int, float] | None = None) -> GridSpec:
    """The grid of ``files`` x ``cfg.grid_weights`` with the config's seed, prompt and sampling settings;
    the epoch with the lowest validation loss among the files is marked."""
    spec = GridSpec(
        files=list(files),
        weights=cfg.grid_weight_list(),
        seeds=[cfg.grid_seed],
        prompt=cfg.grid_prompt or default_prompt(files, trigger),
        negative_prompt=cfg.grid_negative_prompt,
        steps=cfg.grid_steps,
        cfg_scale=cfg.grid_cfg_scale,
        width=cfg.resolution,
        height=cfg.resolution,
        sampler_name="DDIM",
    )
    saved_epochs = {c.epoch for c in spec.columns()}
    candidates = [(v, e) for e, v in (validation or {}).items() if e in saved_epochs]
    spec.best_epoch = min(candidates)[1] if candidates else None
    return spec


def free_grid_path(folder: str | Path, prefix: str) -> Path:
    """``<prefix>_grid.png`` in ``folder``, or ``<prefix>_grid-2.png``... when taken: a grid never
    replaces an earlier one."""
    folder = Path(folder)
    path = folder / f"{prefix}_grid.png"
    n = 2
    while path.exists():
        path = folder / f"{prefix}_grid-{n}.png"
        n += 1
    return path


def run_prefix(files: list[str]) -> str:
    """The run name shared by epoch files (``face-000003`` -> ``face``)."""
    stem = Path(sorted(files)[0]).stem
    return _EPOCH_RE.sub("", stem) or stem


def make_grid(
    spec: GridSpec,
    generate: Callable[[Cell], Image.Image],
    events,
    stop,
    out: str | Path,
    replace: bool = True,
):
    """Build and save ``spec`` reporting GridProgress / GridSaved events; ``stop`` ends it early
    (what was made is kept). ``replace``: see :func:`save_grid`."""
    from .train.events import GridProgress, GridSaved

    events.info(
        f"building the grid: {len(spec.columns())} epochs x {len(spec.weights)} weights, prompt '{spec.prompt}'"
    )
    result = build_grid(
        spec,
        generate,
        progress=lambda d, t: events.emit(GridProgress(d, t)),
        should_stop=lambda: stop.requested,
        out_path=out,
        replace=replace,
    )
    events.emit(GridSaved(str(result.path), spec.best_epoch))
    return result


def grid_after_training(
    cfg,
    files: list[str],
    generate: Callable[[Cell], Image.Image],
    events,
    stop,
    trigger: str = "",
    validation: dict[int, float] | None = None,
):
    """The automatic grid at the end of a run: every saved epoch x ``cfg.grid_weights``, one seed."""
    if not files:
        return None
    spec = grid_spec_from_config(cfg, files, trigger, validation)
    return make_grid(spec, generate, events, stop, Path(files[0]).parent / f"{cfg.output_name}_grid.png")


class GrowingGrid:
    """The grid built a column at a time, as each epoch is saved (``grid_each_epoch``): every call
    of :meth:`add_column` generates the new column's cells only and saves the grid so far under
    the run's grid name. Subscribe it to the run's events to mark the lowest validation loss."""

    def __init__(self, cfg, generate: Callable[[Cell], Image.Image], events, stop, trigger: str = ""):
        self.cfg, self.generate, self.events, self.stop, self.trigger = cfg, generate, events, stop, trigger
        self.files: list[str] = []
        self.validation: dict[int, float] = {}
        self._cells: dict[tuple[str, float, int], Image.Image] = {}
        self.result: GridResult | None = None

    def __call__(self, ev) -> None:
        from .train.events import ValidationLoss

        if isinstance(ev, ValidationLoss):
            self.validation[ev.epoch] = ev.loss

    def _cached(self, cell: Cell) -> Image.Image:
        key = (cell.column.path, cell.weight, cell.seed)
        if key not in self._cells:
            self._cells[key] = self.generate(cell)
        return self._cells[key]

    def add_column(self, path: str | Path) -> GridResult:
        self.files.append(str(path))
        spec = grid_spec_from_config(self.cfg, self.files, self.trigger, self.validation)
        out = Path(path).parent / f"{self.cfg.output_name}_grid.png"
        self.result = make_grid(spec, self._cached, self.events, self.stop, out)
        return self.result


def grid_of_files(cfg, files: list[str], generate: Callable[[Cell], Image.Image], events, stop):
    """The "Build grid" button: any saved LoRA files x ``cfg.grid_weights``, saved next to the first
    file under a name no earlier grid has."""
    from .errors import LoraTrainerError

    if not files:
        raise LoraTrainerError("Choose at least one saved LoRA file for the grid.")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise LoraTrainerError(f"LoRA file not found: {missing[0]}. Refresh the file list and choose again.")
    spec = grid_spec_from_config(cfg, files)
    out = free_grid_path(Path(files[0]).parent, run_prefix(files))
    return make_grid(spec, generate, events, stop, out, replace=False)


def lora_files_in(folder: str | Path) -> list[str]:
    """The ``.safetensors`` files of a LoRA folder (sub-folders included), newest run last."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.rglob("*.safetensors") if p.is_file() and not p.name.startswith(".")]
    return [str(p) for p in sorted(files, key=lambda p: (p.stat().st_mtime, p.name))]


def cell_tag_from_png(path: str | Path, x: int, y: int) -> str | None:
    """The ``<lora:name:weight>`` tag of the cell at (x, y) of a saved grid PNG (its parameters
    are in the PNG text), or None outside the cells."""
    with Image.open(path) as im:
        params = json.loads(im.text.get("lora_trainer_grid", "{}")) if hasattr(im, "text") else {}
    if not params:
        return None
    cols, weights, seeds = params["columns"], params["weights"], params["seeds"]
    cw, ch = params["width"], params["height"]
    left, top = cell_origin(params, 0, 0)
    c, r = (x - left) // cw, (y - top) // ch
    if x < left or y < top or c >= len(cols) or r >= len(weights) * len(seeds):
        return None
    w = weights[r % len(weights)]
    return f"<lora:{Path(cols[c]['path']).stem}:{float(w):g}>"


def read_grid_parameters(path: str | Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text.get("lora_trainer_grid", "{}")) if hasattr(im, "text") else {}


def cell_origin(params: dict, row: int, col: int) -> tuple[int, int]:
    """Top-left pixel of cell (row, col) in a grid saved with ``params`` (its PNG parameters)."""
    cw, ch = params["width"], params["height"]
    top, left, fs = label_geometry(cw, ch)
    if params.get("best_epoch") is not None:
        top += fs * 2  # the title row that explains the mark
    return left + col * cw, top + row * ch
