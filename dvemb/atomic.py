"""Atomic file writes: a temporary file next to the target, moved over it only once it is complete, so that a
reader (or a process resuming after a crash) finds the old file or the whole new one, never a part of it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fsync_directory", "replacing", "write_bytes_atomic", "write_text_atomic"]


@contextmanager
def replacing(path: str | Path, *, unique: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path in ``path``'s directory to write; when the block ends normally it replaces
    ``path`` (``os.replace``: atomic on one filesystem). On an error the temporary file is removed and ``path``
    is left as it was.

    Args:
        path: the file to write (its directory must exist).
        unique: a temporary name of its own per call (for writers that may run concurrently on one path; the
            default, ``.<name>.tmp``, is overwritten by the next attempt when a process is killed mid-write).
        durable: the new file survives a crash of the machine, not only of the process: the temporary file is
            fsynced before it replaces ``path``, and the directory after (the gradient log's writer).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp" if unique else f".{target.name}.tmp")
    try:
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDWR)
        os.replace(tmp, target)
        if durable:
            fsync_directory(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_directory(directory: str | Path) -> None:
    """Make the directory's entries (a file created, renamed or removed) durable."""
    _fsync(directory, os.O_RDONLY)


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str, *, unique: bool = False, durable: bool = False) -> Path:
    """``path.write_text(text)``, atomically (:func:`replacing`)."""
    with replacing(path, unique=unique, durable=durable) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes, *, unique: bool = False, durable: bool = False) -> Path:
    """``path.write_bytes(data)``, atomically (:func:`replacing`)."""
    with replacing(path, unique=unique, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)
