"""Scan a kohya-style dataset folder: ``<train_data_dir>/<repeats>_<name>/`` sub-folders.

Everything a user can get wrong about the folder is found here, before a model is loaded,
and reported as a :class:`~lora_trainer.errors.DatasetError` that names the file or folder,
says what is wrong and what to do. This module must not import torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Image file extensions that are trained on (compared in lower case)."""

CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption", ".tags", ".cap")
"""Extensions that look like caption files; those not in use are mentioned, never warned as unused."""

# Files a dataset folder commonly holds that are neither images nor captions and need no warning.
_SILENT_SUFFIXES = (".npz",)  # latent caches written next to the images
_SILENT_NAMES = {"thumbs.db", "desktop.ini", ".ds_store"}

_MAX_LISTED = 10
MAX_REPEATS = 10_000
"""Guides use 1-100 repeats. A larger count is nearly always a folder named after a date or an id
(``20240101_photos``), which would make one epoch millions of steps."""
_REPEAT_RE = re.compile(r"^(\d+)_(.*)$")
_NUMBERISH_RE = re.compile(r"^[+-]?[\d.,]+$")

LogFn = Callable[[str], None]


@dataclass
class ImageEntry:
    """One training image and the caption it is trained with."""

    path: Path
    caption: str
    caption_from_file: bool


@dataclass
class Subset:
    """One ``<repeats>_<name>`` folder."""

    dir: Path
    name: str
    repeats: int
    images: list[ImageEntry] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.images) * self.repeats


@dataclass
class DatasetScan:
    """The result of :func:`scan_dataset`."""

    root: Path
    subsets: list[Subset]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(len(s.images) for s in self.subsets)

    @property
    def num_samples(self) -> int:
        """Samples per epoch: each image counted once per repeat."""
        return sum(s.num_samples for s in self.subsets)

    @property
    def trigger_word(self) -> str:
        """The first word of the first folder's name (``10_ohwx woman`` -> ``ohwx``): the grid's
        default prompt starts with it."""
        return (self.subsets[0].name.split() or [""])[0] if self.subsets else ""

    def entries(self) -> list[ImageEntry]:
        """All images, folder by folder (folders sorted by name), files sorted by name."""
        return [e for s in self.subsets for e in s.images]

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs``: ``{"10_name": {"n_repeats": 10, "img_count": 12}}``."""
        return {s.dir.name: {"n_repeats": s.repeats, "img_count": len(s.images)} for s in self.subsets}

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder, how many captions hold each tag.

        Tags are the comma-separated parts of each caption, stripped and lower-cased (as kohya
        does); each image counts once, whatever its folder's repeats.
        """
        result: dict[str, dict[str, int]] = {}
        for s in self.subsets:
            freq: dict[str, int] = {}
            for e in s.images:
                for tag in e.caption.split(","):
                    tag = tag.strip().lower()
                    if tag:
                        freq[tag] = freq.get(tag, 0) + 1
            result[s.dir.name] = freq
        return result


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _list_names(items: Iterable[str], limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" ... and {len(items) - limit} more"
    return shown


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in _SILENT_NAMES or path.name == "__MACOSX"


def repeats_problem(repeats: int) -> str | None:
    """Why ``repeats`` cannot be a folder's repeat count, or None."""
    if repeats < 1:
        return "repeats must be at least 1"
    if repeats > MAX_REPEATS:
        return f"repeats must be at most {MAX_REPEATS} (is the number a date or an id?)"
    return None


def _parse_folder_name(folder: Path) -> tuple[int, str] | None:
    """Return ``(repeats, name)`` for a ``<n>_<name>`` folder, ``None`` for a folder without the prefix.

    Raises :class:`DatasetError` when the prefix is there but not a whole number of at least 1.
    """
    m = _REPEAT_RE.match(folder.name)
    if m:
        repeats = int(m.group(1))
        problem = repeats_problem(repeats)
        if problem:
            raise DatasetError(
                folder,
                f"the repeat count in the folder name is {repeats}; {problem}",
                f"Rename the folder to e.g. '1_{m.group(2)}' or '10_{m.group(2)}' "
                "(the number is how often each image is used per epoch)",
            )
        return repeats, m.group(2)
    prefix, sep, rest = folder.name.partition("_")
    if sep and _NUMBERISH_RE.match(prefix):
        raise DatasetError(
            folder,
            f"the repeat count '{prefix}' in the folder name is not a whole number; "
            "repeats must be a whole number of at least 1",
            f"Rename the folder to e.g. '10_{rest}'",
        )
    return None


def _read_caption(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            path,
            f"the caption file is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at position {e.start})",
            "Re-save it as UTF-8 (in Notepad: Save As > Encoding: UTF-8; most editors have the same option)",
        ) from None
    return text.strip()


def _check_image(path: Path) -> str | None:
    """Fully decode one image; return the problem as text, or ``None`` when it is fine."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "the image has no pixels"
    except Image.DecompressionBombError as e:
        return f"the image is too large to open safely ({e})"
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError ...)
        msg = str(e) or type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError):
            msg = "not a readable image (the file is corrupt or not really a " + path.suffix.lower().lstrip(".") + ")"
        return msg
    return None


def verify_images(paths: list[Path], root: Path | None = None) -> None:
    """Decode every image; raise one :class:`DatasetError` listing every file that fails."""
    if not paths:
        return
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not be padded with grey
    try:
        workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
        if workers == 1:
            problems = [_check_image(p) for p in paths]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                problems = list(pool.map(_check_image, paths))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    bad = [(p, prob) for p, prob in zip(paths, problems) if prob is not None]
    if not bad:
        return
    if len(bad) == 1:
        raise DatasetError(
            bad[0][0],
            f"the image cannot be read: {bad[0][1]}",
            "Re-export it from an image editor (or re-download it), or delete it (and its caption)",
        )
    lines = "\n".join(f"  {p}: {prob}" for p, prob in bad)
    raise DatasetError(
        root if root is not None else bad[0][0].parent,
        f"{len(bad)} images cannot be read:\n{lines}\n",
        "Re-export these files from an image editor (or re-download them), or delete them (and their captions)",
    )


def _subset_folder(d: Path) -> tuple[Path, int, str, list[Path]] | None:
    """``(folder, repeats, name, files)`` of a ``<n>_<name>`` folder with images; None for a folder
    without the prefix and without images (ignored); DatasetError for anything else."""
    parsed = _parse_folder_name(d)
    try:
        files = sorted((p for p in d.iterdir() if p.is_file()), key=lambda p: p.name)
    except OSError as e:
        raise DatasetError(d, f"the folder cannot be read ({e.strerror or e})", "Check its permissions") from None
    images = [p for p in files if is_image_file(p)]
    if parsed is None:
        if images:
            raise DatasetError(
                d,
                f"the folder holds {_plural(len(images), 'image')} but its name does not start with a "
                "repeat count ('<n>_')",
                f"Rename it to e.g. '10_{d.name}' (10 = how often each image is used per epoch)",
            )
        return None
    repeats, name = parsed
    if not images:
        others = [p.name for p in files if not _is_hidden(p)]
        found = f" (it holds: {_list_names(others)})" if others else " (it is empty)"
        raise DatasetError(
            d,
            f"the folder has no images{found}; supported are {', '.join(IMAGE_EXTENSIONS)}",
            "Put images in it, or delete the folder",
        )
    return d, repeats, name, files


def _raise_all(root: Path, problems: list[DatasetError]) -> None:
    """Raise the one problem as it is, or one error listing every problem (each with its fix)."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        lines = "\n".join(f"  - {e}" for e in problems)
        raise DatasetError(root, f"{len(problems)} problems in the dataset; fix each as its line says, then start again:\n{lines}", "")


def scan_dataset(
    train_data_dir: str | Path,
    caption_extension: str = ".txt",
    verify: bool = True,
    log: LogFn | None = None,
) -> DatasetScan:
    """Scan ``train_data_dir`` and return its subsets, images and captions.

    Raises :class:`DatasetError` for any problem that would stop or spoil training.
    Problems that do not (a missing caption, unused files) become warnings: they are passed to
    ``log`` as they are found and kept in :attr:`DatasetScan.warnings`.
    """
    raw = str(train_data_dir).strip() if train_data_dir is not None else ""
    if not raw:
        raise DatasetError(
            "train_data_dir",
            "no dataset folder is set",
            "Set train_data_dir to the folder that holds your <repeats>_<name> sub-folders",
        )
    root = Path(raw).expanduser()
    if not root.exists():
        raise DatasetError(
            root,
            "the dataset folder does not exist",
            "Check the path in train_data_dir (it must be the folder that holds your <repeats>_<name> sub-folders)",
        )
    if not root.is_dir():
        raise DatasetError(
            root,
            "train_data_dir is a file, not a folder",
            "Set train_data_dir to the folder that holds your <repeats>_<name> sub-folders",
        )

    cap_ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    cap_ext_l = cap_ext.lower()
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        if log is not None:
            log(msg)

    try:
        children = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise DatasetError(root, f"the folder cannot be read ({e.strerror or e})", "Check its permissions") from None

    problems: list[DatasetError] = []  # every problem is reported at once: one run finds them all
    root_images = [p.name for p in children if p.is_file() and is_image_file(p)]
    if root_images:
        problems.append(
            DatasetError(
                root,
                f"{_plural(len(root_images), 'image')} {'is' if len(root_images) == 1 else 'are'} directly in the "
                f"dataset folder ({_list_names(root_images)}); "
                "images must be inside <repeats>_<name> sub-folders",
                f"Move them into a sub-folder such as '{root / '10_<name>'}' (10 = repeats per epoch, "
                "<name> = the caption used for images without a caption file)",
            )
        )

    subset_dirs: list[tuple[Path, int, str, list[Path]]] = []
    ignored: list[str] = []
    for d in children:
        if not d.is_dir() or _is_hidden(d):
            continue
        try:
            found = _subset_folder(d)
        except DatasetError as e:
            problems.append(e)
            continue
        if found is None:
            ignored.append(d.name)
        else:
            subset_dirs.append(found)

    if ignored:
        warn(
            f"Ignored {_plural(len(ignored), 'sub-folder')} without a '<n>_' repeat prefix and without images "
            f"in {root}: {_list_names(ignored)}"
        )

    if not subset_dirs:
        _raise_all(root, problems)
        hint = f" (ignored: {_list_names(ignored)})" if ignored else ""
        raise DatasetError(
            root,
            f"the dataset folder has no <repeats>_<name> sub-folders with images{hint}",
            "Create a sub-folder such as '10_mysubject' inside it and put the images (and captions) there",
        )

    subsets: list[Subset] = []
    missing: list[str] = []  # "<folder>/<image>" without caption file
    empty: list[str] = []  # "<folder>/<caption>" present but empty
    other_caps: dict[str, str] = {}  # example file per other caption extension found instead
    unused: list[str] = []
    shared_stems: list[str] = []
    empty_name_folders: list[str] = []
    for d, repeats, name, files in subset_dirs:
        by_name = {p.name: p for p in files}
        by_lower: dict[str, Path] = {}
        for p in files:
            by_lower.setdefault(p.name.lower(), p)
        images = [p for p in files if is_image_file(p)]
        stems_seen: dict[str, str] = {}
        used_captions: set[str] = set()
        entries: list[ImageEntry] = []
        for img in images:
            stem_key = img.stem.lower()
            if stem_key in stems_seen:
                shared_stems.append(f"{d.name}/{stems_seen[stem_key]} and {img.name}")
            else:
                stems_seen[stem_key] = img.name
            cap_name = img.stem + cap_ext
            cap = by_name.get(cap_name) or by_lower.get(cap_name.lower())
            caption = ""
            from_file = False
            if cap is not None:
                used_captions.add(cap.name)
                try:
                    caption = _read_caption(cap)
                except DatasetError as e:
                    problems.append(e)
                if caption:
                    from_file = True
                else:
                    empty.append(f"{d.name}/{cap.name}")
            else:
                missing.append(f"{d.name}/{img.name}")
                for ext in CAPTION_EXTENSIONS:
                    if ext == cap_ext_l:
                        continue
                    alt = by_lower.get((img.stem + ext).lower())
                    if alt is not None:
                        other_caps.setdefault(ext, f"{d.name}/{alt.name}")
            if not from_file:
                caption = name
                if not name:
                    empty_name_folders.append(d.name)
            entries.append(ImageEntry(path=img, caption=caption, caption_from_file=from_file))
        for p in files:
            if is_image_file(p) or p.name in used_captions or _is_hidden(p):
                continue
            suf = p.suffix.lower()
            if suf in CAPTION_EXTENSIONS or suf == cap_ext_l or suf in _SILENT_SUFFIXES:
                continue
            unused.append(f"{d.name}/{p.name}")
        nested = [f"{d.name}/{p.name}/" for p in sorted(d.iterdir()) if p.is_dir() and not _is_hidden(p)]
        unused.extend(nested)
        subsets.append(Subset(dir=d, name=name, repeats=repeats, images=entries))

    if unused:
        warn(
            f"{_plural(len(unused), 'file')} in the dataset not used (only {', '.join(IMAGE_EXTENSIONS)} images "
            f"and {cap_ext} captions are read; sub-folders of a <n>_<name> folder are not scanned): "
            f"{_list_names(unused)}"
        )
    if shared_stems:
        warn(
            "Images share a file name (and so one caption file and one latent cache file): "
            f"{_list_names(shared_stems)}. Rename one of each pair"
        )
    if missing or empty:
        parts = []
        if missing:
            parts.append(f"{_plural(len(missing), 'image')} without a {cap_ext} caption file: {_list_names(missing)}")
        if empty:
            parts.append(f"{_plural(len(empty), 'caption file')} empty: {_list_names(empty)}")
        used = [f"'{s.dir.name}' -> '{s.name}'" for s in subsets if any(not e.caption_from_file for e in s.images)]
        msg = "; ".join(parts) + ". These images are trained with their folder's name as caption: " + _list_names(used)
        if empty_name_folders:
            msg += (
                f"; the folder name of {_list_names(sorted(set(empty_name_folders)))} has no name after the repeats, "
                "so those images get an empty caption"
            )
        for ext, example in sorted(other_caps.items()):
            msg += f". Found {example}; did you mean caption_extension='{ext}'?"
        warn(msg)

    if verify:
        try:
            verify_images([e.path for s in subsets for e in s.images], root=root)
        except DatasetError as e:
            problems.append(e)
    _raise_all(root, problems)
    return DatasetScan(root=root, subsets=subsets, warnings=warnings)
