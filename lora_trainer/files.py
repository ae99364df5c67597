"""Putting files where a host reads them: complete or absent, never replacing another run's file.

Every file the trainer writes for others to read (LoRA files, grid PNGs, latent caches) goes through
:func:`write_file`. It lives here rather than in ``network/`` because torch-free parts (presets,
dataset tools) write files too and must not import torch.

How a file appears under its final name:

1. the bytes go to ``.<name>.<random>.lora_trainer.tmp`` in the same folder, created with
   ``O_EXCL`` and mode ``0o666``, so the kernel applies the process umask (0644 under umask 022,
   as any other file in the folder; ``mkstemp`` would give 0600, which a WebUI running as another
   user cannot read). The umask is never read or changed, so no other thread is raced;
2. the temp file is flushed and fsynced, then hard-linked to the final name: ``link`` fails when
   the name exists, so a file another run wrote meanwhile is never replaced (``os.replace`` would
   replace it silently). The temp name is then unlinked and the folder fsynced where the platform
   allows it;
3. while it is written the temp file holds an advisory lock, so :func:`remove_stale_temp_files`
   (run at the next start in the folder) removes the temp files of a killed save but never one
   that another live run is writing.

A name that exists already raises ``FileExistsError`` (a clear error rather than the next free
name: hosts cache LoRAs by name and the metadata carries the name, so the caller decides).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path

try:  # POSIX; on Windows an open file cannot be deleted, which protects a temp file being written
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".lora_trainer.tmp"
NEW_FILE_MODE = 0o666  # before the umask, as open(..., "w") creates files
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def temp_path(path: Path) -> Path:
    """``.<name>.<random>.lora_trainer.tmp`` beside ``path``: hidden, and recognisably ours."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def write_file(path: str | Path, data: bytes, *, replace: bool = False) -> Path:
    """Write ``data`` to ``path``: a reader sees no file or the whole, fsynced file.

    Without ``replace`` the file is created exclusively: ``FileExistsError`` if ``path`` exists,
    which is then left as it was. ``replace`` is for files a run owns and rewrites (latent caches,
    the grid of the running training, an explicit overwrite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _open_locked_temp(path)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock: the file is complete
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return path


def _open_locked_temp(path: Path) -> tuple[Path, int]:
    """A new temp file, open and locked. A cleanup that ran between the create and the lock has
    removed it (no links left): then take another name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = temp_path(path)
        fd = os.open(tmp, flags, NEW_FILE_MODE)
        if fcntl is None:
            return tmp, fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return tmp, fd
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _link_new(tmp: Path, path: Path) -> None:
    """Give the complete ``tmp`` the name ``path`` unless that name exists."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS and getattr(e, "winerror", None) != 1:
            raise
        _claim_then_replace(tmp, path)


def _claim_then_replace(tmp: Path, path: Path) -> None:
    """For file systems without hard links (FAT, exFAT, some network shares): claim the name with
    an empty file (``O_EXCL``, so still never another run's file), then replace that claim. A reader
    may see the empty claim for the moment of the rename, and a kill in between leaves it empty."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE))
    os.replace(tmp, path)


def _fsync_folder(folder: Path) -> None:
    """Make the new name durable; folders cannot be opened or fsynced on some platforms (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files that killed saves left in ``folder``: only ours (by suffix), and only
    those no live process is writing (they are locked while written). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in sorted(folder.glob(f".*{TEMP_SUFFIX}")):
        if _remove_if_abandoned(tmp):
            removed.append(tmp)
    return removed


def _remove_if_abandoned(tmp: Path) -> bool:
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return False  # gone already, or not ours to read
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a live save holds it
        try:
            tmp.unlink()
        except OSError:
            return False  # on Windows: still open in the process writing it
        return True
    finally:
        os.close(fd)


def check_writable(folder: str | Path) -> None:
    """Create (and remove) a probe file in ``folder``: raises the ``OSError`` a save would meet
    (read-only file system, no permission, not a folder). Creates the folder if missing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE))
    probe.unlink()


_REASONS = {
    getattr(errno, "EDQUOT", errno.ENOSPC): ("the disk quota is used up", "free space there"),  # not on Windows
    errno.ENOSPC: ("the disk is full", "free space there"),
    errno.EROFS: ("the folder is on a read-only file system", "choose a writable output folder"),
    errno.EACCES: ("no permission to write there", "make the folder writable or choose another output folder"),
    errno.EPERM: ("no permission to write there", "make the folder writable or choose another output folder"),
    errno.EEXIST: ("a file of this name appeared meanwhile (another run?) and is never replaced",
                   "move or rename that file"),
    errno.ENOTDIR: ("a part of the folder path is a file", "choose another output folder"),
}


def write_problem(err: OSError) -> tuple[str, str]:
    """(why, what to do) for a failed write, in words a user acts on."""
    reason = _REASONS.get(err.errno or -1)
    if reason is not None:
        return reason
    return (err.strerror or str(err), "check the folder, or choose another output folder")


def free_disk(path: str | Path) -> int:
    """Bytes free on the disk that holds ``path`` (for the checks made before a run writes)."""
    return shutil.disk_usage(path).free
