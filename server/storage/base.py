"""The storage interface: what the API and the workers do with runs' files, whatever holds them.

Implementations: :class:`server.storage.local.LocalStorage` (a directory, the default) and
:class:`server.storage.objects.ObjectStorage` (an S3-compatible bucket). Keys are those of
:mod:`server.storage.layout`. Readers never assume a shared filesystem: they ask for a local copy
(:meth:`Storage.local_file`, :meth:`Storage.local_copy`), which is the file itself on a local storage and a
bounded cache's copy on an object store; writers hand local files over (:meth:`Storage.put_file`,
:meth:`Storage.save_results`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType


class PartBusy(Exception):
    """Another request is appending to this upload."""


class PartWriter(ABC):
    """Appends a tus PATCH's bytes to an upload's part. :meth:`write` is cheap (no network); :meth:`flush`
    makes what was written durable and may block (call it from a thread in async code); only flushed bytes may
    be counted in the upload's offset."""

    @abstractmethod
    def start(self, offset: int) -> None:
        """Appending starts at ``offset`` (the committed offset): anything stored past it is dropped."""

    @abstractmethod
    def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class Storage(ABC):
    """Where runs' files live (see the module docstring)."""

    #: Where it is, for logs and ``dvemb serve``'s banner: a directory or ``s3://bucket/prefix``.
    url: str
    #: Local directories whose paths may appear in error messages (stripped from what users see).
    private_dirs: tuple[Path, ...]
    #: Whether :meth:`results_workdir` is the results directory itself, the same for every process (a local
    #: storage); else each machine has its own, and its files reach the others only through the storage.
    workdir_is_shared: bool = False

    # Objects.

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes (FileNotFoundError if there is none)."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store a copy of the local file ``path`` under ``key`` (multipart on an object store when large)."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a folder: ``runs/1`` holds ``runs/1/log/x``, never ``runs/10/...``), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if there is one."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix``."""

    @abstractmethod
    def local_file(self, key: str) -> Path:
        """A local file with the object's bytes, to read at once (FileNotFoundError if there is none): the file
        itself on a local storage, a cached copy on an object store."""

    @abstractmethod
    def local_copy(self, prefix: str, keep: Callable[[str], bool] | None = None) -> AbstractContextManager[Path]:
        """Every object under ``prefix`` (whose name relative to it ``keep`` accepts) as a local directory, for the
        duration of the ``with`` block: the directory itself on a local storage (``keep`` unused), a private
        directory of the cache's copies on an object store (removed afterwards)."""

    # Uploads (tus).

    @abstractmethod
    def create_part(self, run_id: int, upload_id: str) -> None:
        """An empty part for a new upload."""

    @abstractmethod
    def open_part(self, run_id: int, upload_id: str) -> PartWriter:
        """A writer appending to the part.

        Raises:
            FileNotFoundError: the upload was abandoned or handed to the validator.
            PartBusy: another request is appending to it.
        """

    @abstractmethod
    def delete_part(self, run_id: int, upload_id: str) -> None: ...

    @abstractmethod
    def received(self, run_id: int, upload_id: str, name: str) -> AbstractContextManager[Path]:
        """The bytes of a received file, as a local file for the ``with`` block: its upload's part, or the run's
        log file of that name when a validator published the bytes and died before its verdict was committed (the
        part is then gone). The path may not exist (neither is there): reading it fails."""

    @abstractmethod
    def publish(self, run_id: int, upload_id: str, name: str, local: Path) -> None:
        """Move a validated file (``local``, from :meth:`received`) into the run's log as ``name``."""

    @abstractmethod
    def discard(self, run_id: int, upload_id: str, name: str) -> None:
        """Remove a rejected file's bytes (its part, or what a dead validator published)."""

    # Results.

    @abstractmethod
    def results_workdir(self, run_id: int, job_id: int) -> Path:
        """The local directory a job's results are computed in (its checkpoint lets a redelivered task resume
        there): the results directory itself on a local storage, a scratch directory of this machine's on an
        object store."""

    @abstractmethod
    def save_results(self, run_id: int, job_id: int, directory: Path) -> None:
        """Make a job's computed results (``directory``, its :meth:`results_workdir`) readable by every process."""

    @abstractmethod
    def release_workdir(self, run_id: int, job_id: int) -> None:
        """The job is done: its :meth:`results_workdir` may go (unless it is the results directory itself)."""

    def public_message(self, message: str) -> str:
        """``message`` as users may see it: any path under the storage's local directories reduced to its file name
        (the layout of the server's disks is nobody's business)."""
        for folder in self.private_dirs:
            message = re.sub(re.escape(str(folder.resolve())) + r"/(?:[^\s:'\"]*/)?", "", message)
        return message


def walk_files(directory: Path) -> Iterator[Path]:
    """Every file under ``directory``, sorted."""
    return iter(sorted(p for p in directory.rglob("*") if p.is_file()))
