"""An S3-compatible bucket (``DVEMB_STORAGE_URL=s3://bucket/prefix``) through obstore (the Rust ``object_store``
crate of Apache Arrow; docs/service.md says why). Endpoint, region and credentials come from the usual
environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ALLOW_HTTP`` for a plain-HTTP endpoint such as a local MinIO).

Nothing here assumes a filesystem shared with another process: an upload's bytes are objects (one per flushed
piece of a PATCH, so that the tus offset counts only what the bucket holds), readers get local copies from a
bounded cache in this machine's scratch directory (``DVEMB_SCRATCH_DIR``), and a job is computed in a scratch
directory and its results put back.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import obstore
from obstore.store import from_url

from dvemb.atomic import replacing, write_bytes_atomic
from server.storage.base import PartBusy, PartWriter, Storage, walk_files
from server.storage.layout import log_key, part_key, results_key

_MARKER = "upload"  # the object that says an upload's part exists (its pieces may be none yet)
_PIECE = re.compile(r"^(\d{20})-(\d{20})$")  # a piece of a part: its first byte's offset and its end
_DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's limit)


class _Cache:
    """Local copies of objects under ``folder/data/<key>``, each with ``folder/meta/<key>`` holding the size and
    ETag it was copied at (a stale copy, such as a run id reused after a database reset, is fetched again). At
    most ``limit`` bytes: the least recently used copies are removed to make room (a copy in use stays readable
    where it is open or hard-linked: :meth:`ObjectStorage.local_copy` links them)."""

    def __init__(self, store: Any, folder: Path, limit: int) -> None:
        self.store, self.limit = store, limit
        self.data, self.meta = folder / "data", folder / "meta"

    def fetch(self, objects: list[dict[str, Any]]) -> list[Path]:
        """A local copy of each listed object (``path``, ``size``, ``e_tag`` as obstore lists them)."""
        paths, missing = [], []
        for item in objects:
            path = self.data / item["path"]
            if path.is_file() and self._stamp(item["path"]) == _stamp(item):
                os.utime(path)  # recently used
            else:
                missing.append(item)
            paths.append(path)
        if missing:
            self._make_room(sum(int(m["size"]) for m in missing), keep={self.data / m["path"] for m in missing})
            for item in missing:
                _download(self.store, item["path"], self.data / item["path"])
                _write_atomically(self.meta / item["path"], _stamp(item).encode())
        return paths

    def forget(self, prefix: str) -> None:
        for folder in (self.data, self.meta):
            shutil.rmtree(folder / prefix, ignore_errors=True)

    def _stamp(self, key: str) -> str | None:
        try:
            return (self.meta / key).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _make_room(self, incoming: int, keep: set[Path]) -> None:
        """Remove the least recently used copies until ``incoming`` more bytes fit (soft: what one reader needs at
        once is fetched even when it alone exceeds the limit)."""
        if not self.data.exists():
            return
        copies = []
        for path in self.data.rglob("*"):
            try:
                if path.is_file() and path not in keep:
                    stat = path.stat()
                    copies.append((stat.st_mtime, stat.st_size, path))
            except FileNotFoundError:  # another process removed it meanwhile
                continue
        total = sum(size for _, size, _ in copies)
        for _, size, path in sorted(copies):
            if total + incoming <= self.limit:
                break
            path.unlink(missing_ok=True)
            (self.meta / path.relative_to(self.data)).unlink(missing_ok=True)
            total -= size


def _stamp(item: dict[str, Any]) -> str:
    return f"{item['size']} {item.get('e_tag')}"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data, unique=True)


def _download(store: Any, key: str, target: Path) -> None:
    """Stream the object into ``target`` (written aside, then moved: readers never see half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target, unique=True) as tmp, tmp.open("wb") as f:
        for chunk in obstore.get(store, key).stream(min_chunk_size=8 << 20):
            f.write(chunk)


class _ObjectPart(PartWriter):
    """Appends to an upload's part: each flush puts the bytes written since as one object
    ``<part>/<start>-<end>`` (S3 objects cannot be appended to), so that what the bucket holds is exactly what the
    offset counts; memory holds what one flush puts (the API flushes every 8 MiB)."""

    def __init__(self, storage: ObjectStorage, prefix: str, release: Callable[[], None]) -> None:
        self.storage, self.prefix, self.release = storage, prefix, release
        self.position = 0
        self.buffer = bytearray()

    def start(self, offset: int) -> None:
        self.position = offset
        # Pieces past the committed offset: a request that ended before its offset was committed.
        stale = [key for key, start, _ in self.storage.pieces(self.prefix) if start >= offset]
        self.storage.delete_keys(stale)

    def write(self, chunk: bytes) -> None:
        self.buffer += chunk

    def flush(self) -> None:
        if not self.buffer:
            return
        end = self.position + len(self.buffer)
        obstore.put(self.storage.store, f"{self.prefix}/{self.position:020d}-{end:020d}", bytes(self.buffer))
        self.position = end
        self.buffer.clear()

    def close(self) -> None:
        self.release()


class ObjectStorage(Storage):
    """Runs' files in the bucket of ``url`` (``s3://bucket/prefix``); local copies under ``scratch``."""

    def __init__(self, url: str, scratch: Path, cache_bytes: int) -> None:
        self.url = url
        self.store = from_url(url)
        self.scratch = scratch.resolve()
        self.private_dirs = (self.scratch,)
        self.cache = _Cache(self.store, self.scratch / "cache", cache_bytes)
        self._writing: set[str] = set()  # uploads a request of this process appends to
        self._lock = threading.Lock()

    # Objects.

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(obstore.head(self.store, key))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def read_bytes(self, key: str) -> bytes:
        return obstore.get(self.store, key).bytes().to_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        obstore.put(self.store, key, data)

    def put_file(self, key: str, path: Path) -> None:
        obstore.put(self.store, key, path)  # multipart above 5 MiB

    def _listed(self, prefix: str) -> list[dict[str, Any]]:
        folder = prefix.rstrip("/") + "/"
        found = [dict(item) for batch in obstore.list(self.store, prefix=folder) for item in batch]
        return sorted((item for item in found if str(item["path"]).startswith(folder)), key=lambda i: i["path"])

    def keys(self, prefix: str) -> list[str]:
        return [str(item["path"]) for item in self._listed(prefix)]

    def delete(self, key: str) -> None:
        self.delete_keys([key])

    def delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            obstore.delete(self.store, keys[start : start + _DELETE_BATCH])  # a missing key is not an error

    def delete_prefix(self, prefix: str) -> None:
        self.delete_keys(self.keys(prefix))
        self.cache.forget(prefix)

    def local_file(self, key: str) -> Path:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(f"{key} is not in the storage")
        return self.cache.fetch([head])[0]

    @contextmanager
    def local_copy(self, prefix: str, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
        folder = prefix.rstrip("/") + "/"
        wanted = [i for i in self._listed(prefix) if keep is None or keep(str(i["path"])[len(folder) :])]
        view = self.scratch / "views" / uuid.uuid4().hex
        view.mkdir(parents=True)
        try:
            for item, cached in zip(wanted, self.cache.fetch(wanted), strict=True):
                target = view / str(item["path"])[len(folder) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(cached, target)  # survives the cache's eviction for as long as the view is used
                except OSError:
                    shutil.copyfile(cached, target)
            yield view
        finally:
            shutil.rmtree(view, ignore_errors=True)

    # Uploads.

    def pieces(self, prefix: str) -> list[tuple[str, int, int]]:
        """The pieces of a part: (key, start, end), by start."""
        found = []
        for key in self.keys(prefix):
            match = _PIECE.match(key.rsplit("/", 1)[-1])
            if match:
                found.append((key, int(match[1]), int(match[2])))
        return sorted(found, key=lambda piece: (piece[1], piece[2]))

    def create_part(self, run_id: int, upload_id: str) -> None:
        obstore.put(self.store, f"{part_key(run_id, upload_id)}/{_MARKER}", b"")

    def open_part(self, run_id: int, upload_id: str) -> PartWriter:
        prefix = part_key(run_id, upload_id)
        if not self.exists(f"{prefix}/{_MARKER}"):
            raise FileNotFoundError(prefix)
        with self._lock:
            if upload_id in self._writing:
                raise PartBusy
            self._writing.add(upload_id)

        def release() -> None:
            with self._lock:
                self._writing.discard(upload_id)

        return _ObjectPart(self, prefix, release)

    def delete_part(self, run_id: int, upload_id: str) -> None:
        self.delete_prefix(part_key(run_id, upload_id))

    def _assemble(self, prefix: str, target: Path) -> None:
        """The part's pieces, in order, into ``target``: from offset 0, at each offset the longest piece that
        starts there (two requests may have stored the same bytes; a gap leaves the file short, and the validator
        says so)."""
        by_start: dict[int, tuple[str, int]] = {}
        for key, start, end in self.pieces(prefix):
            if end > by_start.get(start, ("", -1))[1]:
                by_start[start] = (key, end)
        target.parent.mkdir(parents=True, exist_ok=True)
        position = 0
        with target.open("wb") as f:
            while position in by_start:
                key, end = by_start[position]
                for chunk in obstore.get(self.store, key).stream(min_chunk_size=8 << 20):
                    f.write(chunk)
                position = end

    @contextmanager
    def received(self, run_id: int, upload_id: str, name: str) -> Iterator[Path]:
        folder = self.scratch / "received" / uuid.uuid4().hex
        target = folder / name
        try:
            prefix = part_key(run_id, upload_id)
            if self.exists(f"{prefix}/{_MARKER}"):
                self._assemble(prefix, target)
            elif self.exists(log_key(run_id, name)):
                _download(self.store, log_key(run_id, name), target)
            yield target
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, run_id: int, upload_id: str, name: str, local: Path) -> None:
        self.put_file(log_key(run_id, name), local)
        self.delete_part(run_id, upload_id)

    def discard(self, run_id: int, upload_id: str, name: str) -> None:
        prefix = part_key(run_id, upload_id)
        if self.exists(f"{prefix}/{_MARKER}"):
            self.delete_prefix(prefix)
        else:
            self.delete(log_key(run_id, name))

    # Results.

    def results_workdir(self, run_id: int, job_id: int) -> Path:
        return self.scratch / "work" / results_key(run_id, job_id)

    def save_results(self, run_id: int, job_id: int, directory: Path) -> None:
        """Put every file of the computed results into the bucket (the scratch directory stays until the job is
        done: a retried task resumes from it)."""
        for path in walk_files(directory):
            self.put_file(results_key(run_id, job_id, path.relative_to(directory).as_posix()), path)

    def release_workdir(self, run_id: int, job_id: int) -> None:
        shutil.rmtree(self.results_workdir(run_id, job_id), ignore_errors=True)

    def public_message(self, message: str) -> str:
        message = super().public_message(message)
        return re.sub(r"https?://[^\s'\"]*/", "", message)  # the endpoint and bucket: the object's name stays
