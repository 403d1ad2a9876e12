"""Where runs' files live, behind one interface (:class:`Storage`): a local directory (``DVEMB_STORAGE_DIR``, the
default) or an S3-compatible bucket (``DVEMB_STORAGE_URL=s3://bucket/prefix``). Uploads land in ``staging/`` (never
read by anything but the validator); only validated files are moved into ``log/``, which is what computations read
(the layout: :mod:`server.storage.layout`)."""

from __future__ import annotations

from pathlib import Path

from server.once import made_once
from server.settings import get_settings
from server.storage.base import PartBusy, PartWriter, Storage
from server.storage.layout import (
    adhoc_query_key,
    adhoc_query_path,
    check_log_file_name,
    log_dir,
    log_key,
    part_key,
    part_path,
    results_dir,
    results_key,
    run_dir,
    run_key,
    staging_dir,
    staging_key,
)
from server.storage.local import LocalStorage

__all__ = [
    "LocalStorage",
    "PartBusy",
    "PartWriter",
    "Storage",
    "adhoc_query_key",
    "adhoc_query_path",
    "check_log_file_name",
    "forget_storage",
    "get_storage",
    "log_dir",
    "log_key",
    "open_storage",
    "part_key",
    "part_path",
    "results_dir",
    "results_key",
    "run_dir",
    "run_key",
    "staging_dir",
    "staging_key",
]


def open_storage(url: str | None, *, directory: Path, scratch: Path, cache_bytes: int) -> Storage:
    """The storage at ``url`` (``s3://bucket/prefix``, or ``file:///path``), or the local ``directory`` without one.

    Raises:
        ValueError: a URL of another scheme.
    """
    if not url:
        return LocalStorage(directory)
    if url.startswith("file://"):
        return LocalStorage(Path(url.removeprefix("file://")))
    if url.startswith("s3://"):
        from server.storage.objects import ObjectStorage  # obstore is loaded only where it is used

        return ObjectStorage(url, scratch, cache_bytes)
    raise ValueError(
        f"DVEMB_STORAGE_URL {url!r}: give s3://bucket/prefix (or file:///path, or unset it for a directory)"
    )


@made_once
def _cached(url: str | None, directory: Path, scratch: Path, cache_bytes: int) -> Storage:
    return open_storage(url, directory=directory, scratch=scratch, cache_bytes=cache_bytes)


def get_storage() -> Storage:
    """The process's storage, from its settings (cached per settings; a forked worker clears the cache)."""
    settings = get_settings()
    return _cached(settings.storage_url, settings.storage, settings.scratch, settings.cache_bytes)


def forget_storage() -> None:
    """Drop the cached storage: a forked worker opens its own client (obstore's runtime does not survive a fork)."""
    _cached.cache_clear()
