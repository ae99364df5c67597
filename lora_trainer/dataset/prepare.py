"""Dataset preparation: repeats from a target step count, the kohya project layout, tag editing.

Nothing here touches a source image: :func:`write_layout` copies (or converts) into the project
and never replaces a different file unless told to; tag edits read every caption first and then
replace each changed file atomically (a temporary file renamed over it), so an error or a crash
never leaves a half-written caption. Does not import torch.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from ..filenames import name_problem
from .captions import split_tags
from .layout import IMAGE_EXTENSIONS, MAX_REPEATS, is_image_file, repeats_problem
from .steps import steps_per_epoch

# Formats Pillow opens that the trainer does not pick up by extension: converted to PNG on layout.
CONVERTIBLE_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".gif", ".jfif", ".avif", ".heic", ".heif", ".tga", ".ppm")
_MODES_TO_CONVERT = ("CMYK", "I", "F", "I;16", "I;16B", "I;16L", "I;16N", "1")
_NAME_RE = re.compile(r"^[^/\\:*?\"<>|]+$")


# ------------------------------------------------------------------ repeats


def repeats_for(
    target_steps: int,
    images: int,
    epochs: int,
    batch_size: int = 1,
    grad_accum: int = 1,
) -> tuple[int, int, int, str]:
    """Repeats that bring a run closest to ``target_steps`` optimizer steps.

    Returns ``(repeats, steps_per_epoch, total_steps, formula_text)``. The guides' formula
    ``repeats = steps / (images x epochs)`` holds at batch size 1 only; the batch size and the
    gradient accumulation divide the steps, so they multiply the repeats needed:
    ``repeats = steps x batch x accumulation / (images x epochs)``, rounded to the whole number
    whose real step count (``ceil(images x repeats / batch) / accumulation`` per epoch) is closest.
    """
    for name, value in (("images", images), ("epochs", epochs), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if int(target_steps) < 1:
        raise ValueError(f"target_steps must be at least 1, got {target_steps}")
    exact = target_steps * batch_size * grad_accum / (images * epochs)
    base = max(1, math.floor(exact))

    def total(r: int) -> int:
        return steps_per_epoch(images * r, batch_size, grad_accum) * epochs

    candidates = sorted({max(1, base - 1), base, base + 1})
    repeats = min(candidates, key=lambda r: (abs(total(r) - target_steps), r))
    per_epoch = steps_per_epoch(images * repeats, batch_size, grad_accum)
    n_total = per_epoch * epochs
    text = (
        f"repeats = target steps x batch size x accumulation / (images x epochs) = "
        f"{target_steps} x {batch_size} x {grad_accum} / ({images} x {epochs}) = {exact:.2f} -> {repeats}\n"
        f"steps per epoch = ceil({images} images x {repeats} repeats / batch {batch_size}) / accumulation {grad_accum}"
        f" = {per_epoch}\n"
        f"total steps = {per_epoch} x {epochs} epochs = {n_total}"
        + ("" if n_total == target_steps else f" (target {target_steps})")
    )
    return repeats, per_epoch, n_total, text


# ------------------------------------------------------------------ files


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temporary file in the same folder renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        if path.exists():
            try:
                shutil.copymode(path, tmp)
            except OSError:
                pass
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_caption(path: str | Path) -> str:
    """A caption file's text, stripped (UTF-8, with or without BOM); DatasetError when not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(
            path,
            f"the caption file is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at position {e.start})",
            "Re-save it as UTF-8 (most editors: Save As > Encoding: UTF-8)",
        ) from None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ext(caption_extension: str) -> str:
    ext = caption_extension.strip()
    return ext if ext.startswith(".") else "." + ext


def list_images(source: str | Path | Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """Image files of a folder (sorted; hidden files skipped) or the given paths as they are."""
    if isinstance(source, (str, Path)):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise DatasetError(folder, "no such folder", "Give the folder that holds the images")
        it = folder.rglob("*") if recursive else folder.iterdir()
        exts = IMAGE_EXTENSIONS + CONVERTIBLE_EXTENSIONS
        return sorted(
            (p for p in it if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts),
            key=lambda p: str(p).lower(),
        )
    return [Path(p) for p in source]


# ------------------------------------------------------------------ layout


@dataclass
class LayoutResult:
    """What :func:`write_layout` did."""

    project_dir: Path
    subset_dir: Path
    copied: list[Path] = field(default_factory=list)
    converted: list[Path] = field(default_factory=list)
    captions: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    without_caption: list[Path] = field(default_factory=list)

    @property
    def img_dir(self) -> Path:
        return self.project_dir / "img"

    @property
    def model_dir(self) -> Path:
        return self.project_dir / "model"

    @property
    def log_dir(self) -> Path:
        return self.project_dir / "log"

    def config_values(self) -> dict[str, str]:
        """The config fields that point a run at this project (``TrainConfig.with_overrides``-ready)."""
        return {"train_data_dir": str(self.img_dir), "output_dir": str(self.model_dir), "logging_dir": str(self.log_dir)}

    def summary(self) -> str:
        lines = [
            f"{self.subset_dir}: {len(self.copied)} copied, {len(self.converted)} converted to PNG, "
            f"{len(self.unchanged)} already there, {len(self.captions)} captions written",
            f"train_data_dir = {self.img_dir}",
            f"output_dir = {self.model_dir}",
            f"logging_dir = {self.log_dir}",
        ]
        if self.without_caption:
            lines.append(
                f"{len(self.without_caption)} images without a caption (trained with the folder name as caption): "
                + ", ".join(p.name for p in self.without_caption[:10])
                + (" ..." if len(self.without_caption) > 10 else "")
            )
        return "\n".join(lines)


def _needs_conversion(path: Path, convert_all: bool) -> bool:
    if convert_all or path.suffix.lower() not in IMAGE_EXTENSIONS:
        return True
    from PIL import Image

    with Image.open(path) as im:
        return im.mode in _MODES_TO_CONVERT


def _converted_png_bytes(path: Path, background: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image, ImageOps

    from .images import to_rgb

    with Image.open(path) as im:
        im.load()
        try:
            img = ImageOps.exif_transpose(im) or im
        except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
            img = im
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            img = img.convert("RGBA")  # keep transparency: the trainer composes it over alpha_background
        else:
            img = to_rgb(img, background)
        buf = io.BytesIO()
        img.save(buf, "PNG")
    return buf.getvalue()


def _caption_for(image: Path, captions: Mapping | None, copy_captions: bool, ext: str) -> str | None:
    if captions:
        for key in (image, str(image), image.name, image.stem):
            if key in captions:
                value = captions[key]
                return None if value is None else str(value).strip()
    if copy_captions:
        cap = image.with_name(image.stem + ext)
        if cap.is_file():
            return read_caption(cap)
    return None


def write_layout(
    project_dir: str | Path,
    name: str,
    images: Iterable[str | Path] | str | Path,
    repeats: int,
    captions: Mapping[str | Path, str | None] | None = None,
    *,
    caption_extension: str = ".txt",
    copy_captions: bool = True,
    convert_all: bool = False,
    background: tuple[int, int, int] = (255, 255, 255),
    overwrite: bool = False,
) -> LayoutResult:
    """Create ``project/img/<repeats>_<name>/``, ``project/model/`` and ``project/log/`` and fill the first.

    ``images`` is a list of files or a folder. Images the trainer reads are copied byte for byte;
    other formats (TIFF, GIF ...) and modes it would convert anyway (CMYK, 16-bit) become PNG (all
    of them with ``convert_all``). A caption comes from ``captions`` (keyed by the source path, its
    file name or its stem), else, with ``copy_captions``, from the caption file next to the source.

    Everything is checked before anything is written: a file of the same name with other content
    in the target folder, two sources with the same stem, or another ``<n>_<name>`` folder for the
    same name raise :class:`DatasetError` (unless ``overwrite``; identical files are skipped). The
    sources are only read.
    """
    name = str(name).strip()
    if not name or not _NAME_RE.match(name) or name in (".", ".."):
        raise DatasetError("name", f"'{name}' cannot be a folder name", "Use letters, digits, spaces, _ or -")
    _check_repeats("repeats", repeats)
    folder_problem = name_problem(f"{int(repeats)}_{name}")
    if folder_problem:
        raise DatasetError("name", f"'{int(repeats)}_{name}' cannot be a folder name", f"Use {folder_problem}")
    ext = _ext(caption_extension)
    project = Path(project_dir).expanduser()
    sources = list_images(images)
    if not sources:
        raise DatasetError(images if isinstance(images, (str, Path)) else "images", "no images given", "Pick a folder or files with images")
    img_dir = project / "img"
    subset = img_dir / f"{int(repeats)}_{name}"
    if img_dir.is_dir() and not overwrite:
        others = [
            d.name
            for d in img_dir.iterdir()
            if d.is_dir() and d != subset and re.fullmatch(r"\d+_" + re.escape(name), d.name)
        ]
        if others:
            raise DatasetError(
                img_dir,
                f"the project already has {', '.join(others)} for '{name}' (another repeat count); "
                "both would be trained",
                f"Rename that folder to {subset.name} (Prepare tab: change repeats) or use another name",
            )

    missing = [p for p in sources if not p.is_file()]
    if missing:
        raise DatasetError(missing[0], "no such file", "Check the image list")
    stems: dict[str, Path] = {}
    plan: list[tuple[Path, Path, bool, str | None]] = []  # (source, target, convert, caption)
    problems: list[str] = []
    for src in sources:
        key = src.stem.lower()
        if key in stems:
            problems.append(f"{stems[key]} and {src} have the same name (they would share one caption file)")
            continue
        stems[key] = src
        try:
            convert = _needs_conversion(src, convert_all)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types
            problems.append(f"{src}: not a readable image ({str(e) or type(e).__name__})")
            continue
        target = subset / (src.stem + (".png" if convert else src.suffix))
        plan.append((src, target, convert, _caption_for(src, captions, copy_captions, ext)))
    if problems:
        raise DatasetError(
            project,
            "the images cannot be laid out:\n  " + "\n  ".join(problems) + "\n",
            "Rename or remove these files; nothing was written",
        )

    def same_content(src: Path, target: Path, convert: bool) -> bool:
        if src.resolve() == target.resolve():
            return True
        if convert:
            return hashlib.sha256(_converted_png_bytes(src, background)).hexdigest() == _digest(target)
        return _digest(src) == _digest(target)

    conflicts: list[str] = []
    for src, target, convert, caption in plan:
        if target.exists() and not overwrite and not same_content(src, target, convert):
            conflicts.append(f"{target.name} (differs from {src})")
        cap_target = target.with_name(target.stem + ext)
        if caption is not None and cap_target.exists() and not overwrite and read_caption(cap_target) != caption:
            conflicts.append(f"{cap_target.name} (another caption)")
    if conflicts:
        raise DatasetError(
            subset,
            f"{len(conflicts)} files exist with other content: " + ", ".join(conflicts[:10]) + (" ..." if len(conflicts) > 10 else ""),
            "Pick another project folder or name, or allow overwriting; nothing was written",
        )

    result = LayoutResult(project_dir=project, subset_dir=subset)
    subset.mkdir(parents=True, exist_ok=True)
    (project / "model").mkdir(parents=True, exist_ok=True)
    (project / "log").mkdir(parents=True, exist_ok=True)
    for src, target, convert, caption in plan:
        if target.exists() and same_content(src, target, convert):
            result.unchanged.append(target)
        else:
            tmp = target.with_name(f".{target.name}.tmp")
            if convert:
                tmp.write_bytes(_converted_png_bytes(src, background))
                result.converted.append(target)
            else:
                shutil.copyfile(src, tmp)
                result.copied.append(target)
            os.replace(tmp, target)
        cap_target = target.with_name(target.stem + ext)
        if caption is None:
            if not cap_target.exists():
                result.without_caption.append(target)
            continue
        if not cap_target.exists() or read_caption(cap_target) != caption:
            atomic_write_text(cap_target, caption)
            result.captions.append(cap_target)
    return result


def _check_repeats(where: str | Path, repeats: int) -> None:
    problem = repeats_problem(int(repeats))
    if problem:
        raise DatasetError(where, f"repeats is {repeats}; {problem}", f"Set a whole number from 1 to {MAX_REPEATS}")


def set_repeats(subset_dir: str | Path, repeats: int) -> Path:
    """Rename a ``<n>_<name>`` folder to ``<repeats>_<name>`` and return the new path."""
    d = Path(subset_dir)
    m = re.fullmatch(r"(\d+)_(.*)", d.name)
    if not d.is_dir() or not m:
        raise DatasetError(d, "not a <repeats>_<name> folder", "Give a folder such as img/10_name")
    _check_repeats(d, repeats)
    new = d.with_name(f"{int(repeats)}_{m.group(2)}")
    if new == d:
        return d
    if new.exists():
        raise DatasetError(new, "the folder exists already", "Merge or remove it first")
    d.rename(new)
    return new


# ------------------------------------------------------------------ tags


def _norm(tag: str) -> str:
    return " ".join(tag.lower().split())


def edit_tags(
    tags: list[str],
    trigger: str | None = None,
    remove: Iterable[str] = (),
    replace: Mapping[str, str] | None = None,
    dedupe: bool = False,
) -> list[str]:
    """Apply the edits to one caption's tags, in this order: replace, remove, trigger first, de-duplicate.

    Tags match case-insensitively with runs of spaces folded. A replacement may hold commas (one
    tag becomes several) or be empty (the tag is removed). The trigger (one tag or several,
    comma-separated) is moved to the front, or added there when missing.
    """
    rep = {_norm(k): v for k, v in (replace or {}).items() if _norm(k)}
    out: list[str] = []
    for t in tags:
        n = _norm(t)
        if n in rep:
            out.extend(split_tags(rep[n]))
        else:
            out.append(t.strip())
    drop = {_norm(r) for r in remove if _norm(r)}
    out = [t for t in out if _norm(t) not in drop]
    if trigger and split_tags(trigger):
        front = split_tags(trigger)
        fset = {_norm(t) for t in front}
        out = front + [t for t in out if _norm(t) not in fset]
    if dedupe:
        seen: set[str] = set()
        kept = []
        for t in out:
            n = _norm(t)
            if n not in seen:
                seen.add(n)
                kept.append(t)
        out = kept
    return out


def caption_files(folder: str | Path, caption_extension: str = ".txt", recursive: bool = True) -> list[Path]:
    """Caption files under ``folder`` (sub-folders too by default), sorted; hidden files skipped."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(root, "no such folder", "Give the folder that holds the captions")
    ext = _ext(caption_extension).lower()
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        (p for p in it if p.is_file() and p.suffix.lower() == ext and not p.name.startswith(".")),
        key=lambda p: str(p).lower(),
    )


@dataclass
class TagEditResult:
    files: int
    changed: list[Path] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        text = f"{self.files} caption files: {verb} {len(self.changed)}"
        if self.created:
            text += f", {'would create' if self.dry_run else 'created'} {len(self.created)} (images without a caption)"
        return text


def edit_captions(
    folder: str | Path,
    trigger: str | None = None,
    remove: Iterable[str] = (),
    replace: Mapping[str, str] | None = None,
    dedupe: bool = False,
    caption_extension: str = ".txt",
    create_missing: bool = False,
    recursive: bool = True,
    dry_run: bool = False,
) -> TagEditResult:
    """Apply :func:`edit_tags` to every caption file under ``folder``.

    All captions are read (and must be UTF-8) before the first one is written; a file is
    rewritten only when its tags change, as ``"tag, tag, ..."``, atomically. With
    ``create_missing`` and a ``trigger``, images without a caption file get one holding the trigger.
    """
    ext = _ext(caption_extension)
    files = caption_files(folder, ext, recursive)
    remove = list(remove)
    planned: list[tuple[Path, str]] = []
    for path in files:
        old = read_caption(path)
        old_tags = split_tags(old)
        new_tags = edit_tags(old_tags, trigger, remove, replace, dedupe)
        if new_tags != old_tags:
            planned.append((path, ", ".join(new_tags)))
    created: list[tuple[Path, str]] = []
    if create_missing and trigger and split_tags(trigger):
        root = Path(folder).expanduser()
        imgs = (p for p in (root.rglob("*") if recursive else root.iterdir()) if p.is_file() and is_image_file(p))
        for img in sorted(imgs):
            cap = img.with_name(img.stem + ext)
            if not cap.exists():
                created.append((cap, ", ".join(split_tags(trigger))))
    result = TagEditResult(files=len(files), changed=[p for p, _ in planned], created=[p for p, _ in created], dry_run=dry_run)
    if not dry_run:
        for path, text in planned + created:
            atomic_write_text(path, text)
    return result


def tag_frequencies(
    folder: str | Path, caption_extension: str = ".txt", recursive: bool = True
) -> list[tuple[str, int]]:
    """``(tag, number of captions holding it)``, most frequent first (tags lower-cased, as kohya counts them)."""
    counts: dict[str, int] = {}
    for path in caption_files(folder, caption_extension, recursive):
        for tag in {_norm(t) for t in split_tags(read_caption(path))}:
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def parse_replacements(text: str) -> dict[str, str]:
    """``"old=new"`` / ``"old -> new"`` pairs, one a line (or separated by ``;``), to a dict."""
    out: dict[str, str] = {}
    for part in re.split(r"[\n;]", text or ""):
        part = part.strip()
        if not part:
            continue
        if "->" in part:
            old, new = part.split("->", 1)
        elif "=" in part:
            old, new = part.split("=", 1)
        else:
            raise DatasetError("replace", f"'{part}' is not a replacement", "Write old=new or old -> new, one a line")
        if old.strip():
            out[old.strip()] = new.strip()
    return out


# ------------------------------------------------------------------ captioning


@dataclass
class CaptionResult:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    """Images that already had a caption (kept unless ``overwrite``)."""
    failed: list[tuple[Path, str]] = field(default_factory=list)
    stopped: bool = False

    def summary(self) -> str:
        lines = [f"{len(self.written)} captions written, {len(self.kept)} existing captions kept"]
        if self.failed:
            lines.append(
                f"{len(self.failed)} images could not be captioned: "
                + "; ".join(f"{p.name}: {why}" for p, why in self.failed[:10])
            )
        if self.stopped:
            lines.append("stopped before the end")
        return "\n".join(lines)


def caption_images(
    folder: str | Path,
    captioner,
    caption_extension: str = ".txt",
    overwrite: bool = False,
    prefix: str = "",
    recursive: bool = True,
    progress=None,
    should_stop=lambda: False,
) -> CaptionResult:
    """Write a caption next to every image of ``folder`` with ``captioner(image) -> str`` (BLIP,
    DeepBooru, a tagger...). Existing captions are kept unless ``overwrite``; ``prefix`` (a trigger
    word) goes first. A captioner with ``start()`` / ``stop()`` (a model to load and unload) gets
    them around the batch. An image that fails is listed with the reason; the others go on."""
    from PIL import Image, ImageOps

    from .images import to_rgb

    images = list_images(folder, recursive=recursive)
    if not images:
        raise DatasetError(Path(folder), "no images to caption here", "choose the folder that holds the images")
    ext = _ext(caption_extension)
    res = CaptionResult()
    todo = [img for img in images if overwrite or not img.with_suffix(ext).exists()]
    res.kept = [img.with_suffix(ext) for img in images if img not in todo]
    start, stop = getattr(captioner, "start", None), getattr(captioner, "stop", None)
    if todo and callable(start):
        start()
    try:
        for i, img in enumerate(todo):
            if should_stop():
                res.stopped = True
                break
            try:
                with Image.open(img) as im:
                    picture = to_rgb(ImageOps.exif_transpose(im))
                text = str(captioner(picture) or "").strip()
            except Exception as e:  # noqa: BLE001 - one bad image must not lose the others' captions
                res.failed.append((img, f"{type(e).__name__}: {e}"))
                continue
            if prefix.strip():
                tags = [t for t in split_tags(text) if _norm(t) != _norm(prefix)]
                text = ", ".join([prefix.strip(), *tags]) if "," in text or not text else f"{prefix.strip()}, {text}"
            atomic_write_text(img.with_suffix(ext), text + "\n")
            res.written.append(img.with_suffix(ext))
            if progress:
                progress(i + 1, len(todo))
    finally:
        if todo and callable(stop):
            stop()
    return res
