"""Durable file I/O: what is written is on disk (file and folder fsynced) before anyone is told it is."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old content or the new, never a mix.

    On any error (a full disk among them) the temporary file is removed before the error propagates."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_temporary_files(root: Path) -> int:
    """Delete the temporary files ``atomic_write`` leaves when the process dies mid-write; return how many."""
    removed = 0
    for tmp in Path(root).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
