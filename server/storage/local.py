"""A local directory (``DVEMB_STORAGE_DIR``, the default): keys are paths under it. Processes on other machines
share it only through a shared volume."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dvemb.atomic import write_bytes_atomic
from server.storage.base import PartBusy, PartWriter, Storage
from server.storage.layout import log_dir, part_path, results_dir


class _FilePart(PartWriter):
    """Appends to ``staging/<id>.part`` in place; one writer at a time (an exclusive ``flock``)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file

    def start(self, offset: int) -> None:
        self.file.seek(offset)
        self.file.truncate()

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class LocalStorage(Storage):
    """Runs' files under ``root``."""

    workdir_is_shared = True

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = str(self.root)
        self.private_dirs = (self.root,)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data, unique=True)

    def put_file(self, key: str, path: Path) -> None:
        target = self.path(key)
        if target.resolve() == path.resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

    def keys(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        return sorted(str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def local_file(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{key} is not in the storage")
        return path

    @contextmanager
    def local_copy(self, prefix: str, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
        yield self.path(prefix)

    def create_part(self, run_id: int, upload_id: str) -> None:
        path = part_path(self.root, run_id, upload_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def open_part(self, run_id: int, upload_id: str) -> PartWriter:
        part = part_path(self.root, run_id, upload_id).open("r+b")  # FileNotFoundError: abandoned or handed over
        try:
            # One writer per upload: a retried request racing the original must not interleave bytes.
            fcntl.flock(part.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            part.close()
            raise PartBusy from None
        return _FilePart(part)

    def delete_part(self, run_id: int, upload_id: str) -> None:
        part_path(self.root, run_id, upload_id).unlink(missing_ok=True)

    def _received_path(self, run_id: int, upload_id: str, name: str) -> Path:
        part = part_path(self.root, run_id, upload_id)
        published = log_dir(self.root, run_id) / name
        return published if not part.exists() and published.exists() else part

    @contextmanager
    def received(self, run_id: int, upload_id: str, name: str) -> Iterator[Path]:
        yield self._received_path(run_id, upload_id, name)

    def publish(self, run_id: int, upload_id: str, name: str, local: Path) -> None:
        final = log_dir(self.root, run_id) / name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, final)

    def discard(self, run_id: int, upload_id: str, name: str) -> None:
        self._received_path(run_id, upload_id, name).unlink(missing_ok=True)

    def results_workdir(self, run_id: int, job_id: int) -> Path:
        return results_dir(self.root, run_id, job_id)

    def save_results(self, run_id: int, job_id: int, directory: Path) -> None:
        """Nothing to do: the results were computed in place."""

    def release_workdir(self, run_id: int, job_id: int) -> None:
        """Nothing to do: the working directory is the results directory."""
