"""Atomic file writes: the one way files that must never be torn are written (model
folders, training checkpoints, caches).

The content goes to a temp file beside the target, is fsynced, then ``os.replace``d
over the target, and the folder is fsynced: a crash or kill at any moment leaves either
the previous file or the new one. A writer that raises leaves the previous file and no
temp file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(temp_path)`` writes the whole content to ``temp_path`` (a file name in the
    target's folder); it then replaces ``path``. The folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fsync_file(name: str) -> None:
    with open(name, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
