"""Writing credential files so that readers see the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["fsync_folder", "write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace the file at ``path`` with ``data``, atomically and durably.

    The data goes to a temporary file in the same folder (so the rename cannot cross file
    systems), which gets ``mode`` before any byte is written, is flushed to disk, and is
    renamed over ``path``; the folder is then synced so the rename itself survives a crash.
    """
    target = os.fspath(path)
    folder = os.path.dirname(target) or "."
    # mkstemp creates the file 0600, so a key is never readable by others, even briefly.
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder
    )
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_folder(folder)


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
