"""The client side of uploads: every file of a log directory through tus (``tuspy``), resuming
interrupted uploads (their URLs are kept in ``LOG_DIR/.dvemb-upload.json``), with a progress bar."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError
from tusclient.storage.filestorage import FileStorage

from dvemb.formats import MANIFEST, is_log_file_name

CHUNK = 8 << 20


def _files(log_dir: Path) -> list[Path]:
    files = sorted(p for p in log_dir.iterdir() if p.is_file() and is_log_file_name(p.name))
    # Data files first, manifests last: the run is complete only when the manifest arrives.
    return sorted(files, key=lambda p: p.name.startswith("manifest"))


def _run_id(server: str, headers: dict[str, str], name: str) -> int:
    created = httpx.post(f"{server}/api/v1/runs", json={"name": name}, headers=headers)
    if created.status_code == 201:
        return int(created.json()["id"])
    found = httpx.get(f"{server}/api/v1/runs", params={"search": name}, headers=headers).json()["data"]
    for run in found:
        if run["name"] == name:
            return int(run["id"])
    created.raise_for_status()
    raise RuntimeError(created.text)


def upload_log(log_dir: Path, *, server: str, token: str, run_name: str, analyze: bool = False) -> dict[str, Any]:
    """Upload every log file of ``log_dir`` into run ``run_name`` (created if needed)."""
    headers = {"Authorization": f"Bearer {token}"}
    server = server.rstrip("/")
    run_id = _run_id(server, headers, run_name)
    tus = tus_client.TusClient(f"{server}/api/v1/runs/{run_id}/uploads", headers=headers)
    storage = FileStorage(str(log_dir / ".dvemb-upload.json"))
    files = _files(log_dir)
    total = sum(p.stat().st_size for p in files)
    rejected: dict[str, str] = {}
    try:
        _upload_files(tus, storage, files, total, rejected)
    finally:
        storage.close()
    sys.stderr.write("\n")
    run = _settled_run(server, headers, run_id)
    rejected.update({f["name"]: f["error"] for f in run["files"] if f["status"] == "rejected"})
    result: dict[str, Any] = {
        "run": run_id,
        "status": run["status"],
        "missing_files": run["missing_files"],
        "rejected": rejected,
    }
    if analyze and run["status"] == "ready":
        result["job"] = httpx.post(f"{server}/api/v1/runs/{run_id}/jobs", json={}, headers=headers).json()
    return result


def _settled_run(server: str, headers: dict[str, str], run_id: int, timeout: float = 3600) -> dict[str, Any]:
    """The run once the validator has judged every uploaded file (files sent before the manifest wait for it)."""
    deadline = time.monotonic() + timeout
    while True:
        run: dict[str, Any] = httpx.get(f"{server}/api/v1/runs/{run_id}", headers=headers).json()
        pending = [f for f in run["files"] if f["status"] in ("received", "validating")]
        if time.monotonic() > deadline or run["status"] == "ready":
            return run
        if not pending and run["missing_files"]:
            return run  # judged, and something is missing or was rejected
        # Nothing pending and nothing missing, but not ready yet: the run's status is being settled; ask again.
        if all(f["error"] for f in pending) and MANIFEST in run["missing_files"]:
            return run  # waiting for a manifest that was not uploaded
        time.sleep(0.2)


def _upload_files(tus: Any, storage: Any, files: list[Path], total: int, rejected: dict[str, str]) -> None:
    done = 0
    for path in files:
        with path.open("rb") as f:  # our own stream: tuspy leaves the files it opens unclosed
            uploader = tus.uploader(
                file_stream=_KeepOpen(f),
                chunk_size=CHUNK,
                metadata={"filename": path.name},
                store_url=True,
                url_storage=storage,
                retries=3,
                retry_delay=1,
                fingerprinter=_NameFingerprint(path),
            )
            try:
                while uploader.offset < uploader.get_file_size():
                    uploader.upload_chunk()
                    _progress(done + uploader.offset, total, path.name)
            except TusCommunicationError as exc:
                rejected[path.name] = str(exc.response_content or exc)
        done += path.stat().st_size


class _KeepOpen:
    """A file stream whose close() does nothing: tuspy closes streams in ``with`` blocks it does not own."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __enter__(self) -> _KeepOpen:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def close(self) -> None:
        return None


class _NameFingerprint:
    """Resume key of a file: its path, size and modification time (the content is the server's to check)."""

    def __init__(self, path: Path) -> None:
        stat = path.stat()
        self.key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def get_fingerprint(self, _: Any) -> str:
        return self.key


def wait_for_job(server: str, token: str, job_id: int, poll_s: float = 1.0) -> dict[str, Any]:
    """The job once it has succeeded, failed or been cancelled."""
    headers = {"Authorization": f"Bearer {token}"}
    while True:
        job: dict[str, Any] = httpx.get(f"{server.rstrip('/')}/api/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(poll_s)


def _progress(done: int, total: int, name: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done / max(total, 1):6.1%}  {name:<40}")
    sys.stderr.flush()
