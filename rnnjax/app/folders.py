"""Folders the command writes: a run's (checkpoints, metrics, plot), files written whole.

Every file goes to a temporary name in its folder, is synced, and is renamed into place, so no
reader ever sees half a file. Refusals name the folder (``InputError`` about ``out``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rnnjax.core.checks import InputError
from rnnjax.training.checkpoints import delete_checkpoints

__all__ = ["CHECKPOINTS", "METRICS", "PLOT", "write_atomically", "prepare_run_folder", "writable_folder"]

CHECKPOINTS, METRICS, PLOT = "checkpoints", "metrics.json", "training.png"


def write_atomically(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes ``path`` through a temporary file in the same folder, synced to disk, then renames it
    into place, so no reader ever sees half a file; the file gets the usual permissions (0666
    less umask)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # named by the file meant, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash leaves the old file or the new
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk says nothing of the file it filled
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def _ours(name: str) -> bool:
    """True for the names a run folder holds: its files, and their temporary names."""
    return name in (CHECKPOINTS, METRICS, PLOT) or name.startswith(
        tuple(f".{n}." for n in (CHECKPOINTS, METRICS, PLOT)))


def prepare_run_folder(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> bool:
    """Checks a run folder ``out`` before any training, and empties it for ``overwrite``.

    A missing or empty folder is used; one that holds a run needs ``resume`` (to continue it)
    or ``overwrite`` (to replace it); ``overwrite`` deletes only a run folder's own files.

    Returns:
      True when this call created the folder (it is still empty).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder", "out")
    if resume:
        if not (out / CHECKPOINTS).is_dir():
            raise InputError(f"{out}: holds no run to resume (no {CHECKPOINTS} folder)", "out")
        return False
    entries = sorted(out.iterdir()) if out.is_dir() else []
    strangers = [p.name for p in entries if not _ours(p.name)]
    if strangers:
        raise InputError(f"{out}: holds files that are not an rnnjax run ({strangers[0]!r}); "
                         "choose another folder", "out")
    if entries and not overwrite:
        raise InputError(f"{out}: already holds a run; `resume` to continue it or `overwrite` to replace it",
                         "out")
    try:
        for entry in entries:
            if entry.name == CHECKPOINTS:
                delete_checkpoints(entry)
            elif entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as e:
        raise InputError(f"{out}: cannot replace the run there ({e.strerror or e})", "out") from None
    return writable_folder(out)


def writable_folder(out: Path) -> bool:
    """Makes the folder ``out`` if it is missing and checks that a file can be written there;
    returns True when it was made here (it is then empty)."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"{out}: cannot write there ({e.strerror or e})", "out") from None
    return created
