"""The client side of uploads: every file of a log directory through tus (``tuspy``), resuming
interrupted uploads (their URLs are kept in ``LOG_DIR/.dvemb-upload.json``), with a progress bar."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError
from tusclient.storage.filestorage import FileStorage
from tusclient.storage.interface import Storage

from dvemb.errors import DvembError
from dvemb.formats import (
    MANIFEST,
    REPLAY_BUNDLE,
    is_index_name,
    is_log_file_name,
    is_manifest_name,
    is_replay_bundle_name,
)
from dvemb.formats.statuses import JOB_FINISHED, REPLAY_FINISHED

CHUNK = 8 << 20
#: Data files sent at once by default. Each file's last request waits for the validator's verdict on it, so one
#: file at a time a log of many small files took as long as its verdicts one after another (80 shards: 14.5 s,
#: the validator busy a quarter of it); a few at a time the validator always has the next file. Manifests and
#: shard indexes still go first, one by one, and the replay bundle last.
PARALLEL_UPLOADS = 4
_QUOTA_WAIT_S = 10  # the server's Retry-After for the project's quota of files waiting for validation
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class UploadError(DvembError, RuntimeError):
    """An upload cannot go on; the message says what is wrong and what to do (the CLI prints it as one line)."""


class _Api:
    """The service's REST API with the token: every transport or HTTP problem becomes an :class:`UploadError`."""

    def __init__(self, server: str, token: str) -> None:
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.server}/api/v1{path}"
        try:
            response = httpx.request(method, url, headers=self.headers, timeout=_TIMEOUT, **kwargs)
        except httpx.ConnectError:
            raise UploadError(f"cannot reach {self.server}: is the dvemb server running at that address?") from None
        except httpx.TimeoutException:
            raise UploadError(f"{self.server} did not answer {method} {path} in time; try again later") from None
        except httpx.HTTPError as exc:  # any other transport or protocol failure: one line, never a traceback
            raise UploadError(
                f"{method} {path} to {self.server} failed ({type(exc).__name__}: {exc}); check that --server is a "
                "dvemb server's address, then run the same command again (uploads resume)"
            ) from None
        if response.status_code == 401:
            raise UploadError(
                f"{self.server} refused the token (401): pass a token of this server with --token or DVEMB_TOKEN "
                "(`dvemb serve` prints one, `dvemb token` makes one)"
            )
        if response.status_code >= 400:
            raise UploadError(f"{method} {path} failed ({response.status_code}): {_detail(response.content)}")
        try:
            return response.json() if response.content else None
        except ValueError:
            raise UploadError(
                f"{self.server} answered {method} {path} with something other than JSON: is --server the address "
                "of a dvemb server?"
            ) from None


def _detail(content: bytes | None) -> str:
    """The ``detail`` of an error answer (``{"error", "detail"}``), else its text."""
    text = (content or b"").decode("utf-8", errors="replace")
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip() or "no details"
    return str(body.get("detail", text)) if isinstance(body, dict) else text


def _files(log_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """The log's files in the order they go up: (manifests and shard indexes, data files, the replay bundle)."""
    files = sorted(p for p in log_dir.iterdir() if p.is_file() and is_log_file_name(p.name))
    # Manifests and shard indexes first: each data file is then validated as it arrives. Sent before them, data
    # files wait for them and count toward the project's quota of files waiting for the validator (a log of more
    # files than the quota would never get through); the run is complete only once every listed file is in.
    # The replay bundle (a model and a data set: the largest file) last: the log is complete without it.
    first = [p for p in files if is_manifest_name(p.name) or is_index_name(p.name)]
    last = [p for p in files if is_replay_bundle_name(p.name)]
    apart = {*first, *last}
    return first, [p for p in files if p not in apart], last


def _run_id(api: _Api, name: str, bundle: bool) -> int:
    """The run to upload into: a new one, or one of that name whose upload is unfinished (resume), or complete when
    the log directory holds a replay bundle (``bundle``: added to the complete run)."""
    for run in api.call("GET", "/runs", params={"search": name, "limit": 500})["data"]:
        if run["name"] != name:
            continue
        if run["status"] == "ready" and not bundle:
            raise UploadError(
                f"run {name!r} already exists on {api.server} with a complete log; upload under another name with "
                "--run NAME, or delete that run first"
            )
        return int(run["id"])
    return int(api.call("POST", "/runs", json={"name": name})["id"])


def _check_log_dir(log_dir: Path) -> None:
    if not log_dir.is_dir():
        raise UploadError(f"{log_dir} is not a directory: pass the directory the Recorder wrote")
    if not (log_dir / MANIFEST).is_file():
        raise UploadError(f"{log_dir} is not a gradient log (no {MANIFEST}): pass the directory the Recorder wrote")


def upload_log(
    log_dir: Path,
    *,
    server: str,
    token: str,
    run_name: str,
    analyze: bool = False,
    parallel: int = PARALLEL_UPLOADS,
) -> dict[str, Any]:
    """Upload every log file of ``log_dir`` into run ``run_name`` (created if needed, resumed if unfinished),
    ``parallel`` data files at a time.

    Raises:
        UploadError: the directory is not a log, ``parallel`` is below 1, the server cannot be reached or refuses
            the token, or the run name is taken by a complete run; the message says what to do.
    """
    log_dir = Path(log_dir)
    _check_log_dir(log_dir)  # before anything is created on the server
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise UploadError(f"parallel={parallel!r}: upload at least one file at a time (an integer of 1 or more)")
    api = _Api(server, token)
    run_id = _run_id(api, run_name, bundle=(log_dir / REPLAY_BUNDLE).is_file())
    tus = tus_client.TusClient(f"{api.server}/api/v1/runs/{run_id}/uploads", headers=api.headers)
    storage = FileStorage(str(log_dir / ".dvemb-upload.json"))
    # Files the run already holds (valid, or being validated: a resumed upload) are not sent again.
    held = {f["name"] for f in api.call("GET", f"/runs/{run_id}")["files"] if f["status"] in _HELD}
    first, data, last = ([p for p in group if p.name not in held] for group in _files(log_dir))
    rejected: dict[str, str] = {}
    resume = _LockedStorage(storage)
    try:
        sender = _Sender(tus, resume, rejected, scope=f"{api.server}|{run_id}", server=api.server)
        sender.send_all(first, data, last, parallel)
    finally:  # waits for a write under way; threads still running (Ctrl-C) find it closed and write nothing more
        resume.close()
    sys.stderr.write("\n")
    run = _settled_run(api, run_id)
    rejected.update({f["name"]: f["error"] for f in run["files"] if f["status"] == "rejected"})
    result: dict[str, Any] = {
        "run": run_id,
        "url": f"{api.server}/#/runs/{run_id}",
        "status": run["status"],
        "missing_files": run["missing_files"],
        "rejected": rejected,
    }
    if analyze and run["status"] == "ready" and not rejected:
        result["job"] = api.call("POST", f"/runs/{run_id}/jobs", json={})
    return result


def _settled_run(api: _Api, run_id: int, timeout: float = 3600) -> dict[str, Any]:
    """The run once the validator has judged every uploaded file (files sent before the manifest wait for it)."""
    deadline = time.monotonic() + timeout
    while True:
        run: dict[str, Any] = api.call("GET", f"/runs/{run_id}")
        pending = [f for f in run["files"] if f["status"] in ("received", "validating")]
        if time.monotonic() > deadline or (run["status"] == "ready" and not pending):  # a bundle too is judged
            return run
        if not pending and run["missing_files"]:
            return run  # judged, and something is missing or was rejected
        # Nothing pending and nothing missing, but not ready yet: the run's status is being settled; ask again.
        if all(f["error"] for f in pending) and MANIFEST in run["missing_files"]:
            return run  # waiting for a manifest that was not uploaded
        time.sleep(0.2)


_HELD = ("ready", "received", "validating")


class _Sender:
    """Sends a log's files: manifests and shard indexes first, one at a time (each data file is then judged as it
    arrives), then the data files ``parallel`` at a time, then the replay bundle (the log is complete without it).

    The threads share the resume store (locked) and the progress bar. The first failure stops the others at their
    next chunk (a file not started is not sent; one under way keeps its resume entry, so a later run resumes it) and
    is raised once they have stopped. Ctrl-C stops at once: the threads are daemons, what they were sending resumes."""

    def __init__(self, tus: Any, storage: _LockedStorage, rejected: dict[str, str], *, scope: str, server: str) -> None:
        self.tus, self.storage, self.rejected = tus, storage, rejected
        self.scope, self.server = scope, server
        self.total = 0  # bytes of every file to send (send_all)
        self.sent: dict[str, int] = {}  # bytes of each file sent so far, and their sum: the progress bar's
        self.sent_total = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def send_all(self, first: list[Path], data: list[Path], last: list[Path], parallel: int) -> None:
        self.total = sum(p.stat().st_size for p in (*first, *data, *last))
        for path in first:
            self.send(path)
        self.send_parallel(data, parallel)
        for path in last:
            self.send(path)

    def send_parallel(self, paths: list[Path], parallel: int) -> None:
        todo: queue.SimpleQueue[Path] = queue.SimpleQueue()
        for path in paths:
            todo.put(path)
        threads = [
            threading.Thread(target=self._work, args=(todo,), daemon=True, name=f"dvemb-upload-{i}")
            for i in range(min(parallel, len(paths)))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)  # a join with a timeout: Ctrl-C reaches this thread at once
        except BaseException:
            self.stop.set()
            raise
        if self.failure is not None:
            raise self.failure

    def _work(self, todo: queue.SimpleQueue[Path]) -> None:
        while not self.stop.is_set():
            try:
                path = todo.get_nowait()
            except queue.Empty:
                return
            try:
                self.send(path)
            except BaseException as exc:  # kept for the main thread, which raises it
                with self.lock:
                    self.failure = self.failure or exc
                self.stop.set()
                return

    def send(self, path: Path) -> None:
        fingerprint = _NameFingerprint(path, self.scope)
        with path.open("rb") as f:  # our own stream: tuspy leaves the files it opens unclosed
            try:
                uploader = _uploader(self.tus, self.storage, f, path.name, fingerprint, self.stop)
                if uploader is None:
                    return  # stopped while waiting out the quota
                while uploader.offset < uploader.get_file_size():
                    if self.stop.is_set():
                        return  # stopped by another file's failure: this one resumes next time
                    uploader.upload_chunk()
                    self.progress(path, uploader.offset)
            except TusCommunicationError as exc:
                with self.lock:
                    _refused(exc, path.name, self.server, self.rejected)
            # Sent (or refused): a later run starts this file afresh rather than resuming a finished upload.
            self.storage.remove_item(fingerprint.key)
        self.progress(path, path.stat().st_size)

    def progress(self, path: Path, sent: int) -> None:
        with self.lock:
            self.sent_total += sent - self.sent.get(path.name, 0)
            self.sent[path.name] = sent
            _progress(self.sent_total, self.total, path.name)


class _LockedStorage(Storage):
    """tuspy's resume store (a TinyDB file), one thread at a time; once closed, reads find nothing and writes do
    nothing (a daemon thread still sending after Ctrl-C must not write into a closed, or half-written, file)."""

    def __init__(self, storage: Any) -> None:
        self._storage, self._lock, self._closed = storage, threading.Lock(), False

    def get_item(self, key: str) -> Any:
        with self._lock:
            return None if self._closed else self._storage.get_item(key)

    def set_item(self, key: str, value: str) -> None:
        with self._lock:
            if not self._closed:
                self._storage.set_item(key, value)

    def remove_item(self, key: str) -> None:
        with self._lock:
            if not self._closed:
                self._storage.remove_item(key)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._storage.close()


def _refused(exc: TusCommunicationError, name: str, server: str, rejected: dict[str, str]) -> None:
    """What a tus failure means: the file refused (kept in ``rejected``, with the server's reason), the file
    already there (409: nothing to do), or a problem to stop on (:class:`UploadError`, one line)."""
    if exc.status_code is None:  # no HTTP answer at all: the connection, not the file
        raise UploadError(
            f"lost the connection to {server} while uploading {name} ({exc}); run the same command again to resume"
        ) from None
    if exc.status_code == 401:
        raise UploadError(f"{server} refused the token (401) while uploading {name}: pass a token of this server")
    if exc.status_code == 409:
        return  # the run already holds the file, or it is being validated: the run's status tells the rest
    if exc.status_code >= 500:  # the server's trouble, not the file's: never reported as a rejection
        raise UploadError(
            f"{server} failed while receiving {name} ({exc.status_code}); run the same command again later (uploads "
            "resume)"
        ) from None
    rejected[name] = _detail(exc.response_content) if exc.response_content else str(exc)


def _uploader(
    tus: Any,
    storage: Any,
    stream: Any,
    name: str,
    fingerprint: _NameFingerprint,
    stop: threading.Event,
    tries: int = 30,
) -> Any:
    """A tus uploader for one file: resuming its stored upload when the server still has it (a stale one is
    forgotten: the server was reset, or the upload replaced), waiting out the project's quota (429); None when
    ``stop`` is set while it waits."""
    for _ in range(tries):
        try:
            uploader = tus.uploader(
                file_stream=_KeepOpen(stream),
                chunk_size=CHUNK,
                metadata={"filename": name},
                store_url=True,
                url_storage=storage,
                retries=3,
                retry_delay=1,
                fingerprinter=fingerprint,
            )
            if not uploader.url:  # tuspy would create the upload in its first upload_chunk(), out of this loop
                uploader.set_url(uploader.create_url())
                uploader.offset = 0
            return uploader
        except TusCommunicationError as exc:
            if exc.status_code in (404, 410) and storage.get_item(fingerprint.key):
                storage.remove_item(fingerprint.key)
                continue
            if exc.status_code != 429:
                raise
            # The project's quota of files waiting for the validator: wait for some verdicts (the server's
            # Retry-After), then ask again.
            sys.stderr.write(f"\n{name}: the server is busy validating this project's files (429); waiting\n")
            if stop.wait(_QUOTA_WAIT_S):
                return None
    raise UploadError(f"{name}: the server kept refusing new uploads (429); try again later")


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
    """Resume key of a file: the server and run it goes to, its path, size and modification time (the content
    is the server's to check). Keyed by server and run, so an upload to another server or run starts afresh."""

    def __init__(self, path: Path, scope: str) -> None:
        stat = path.stat()
        self.key = f"{scope}|{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    def get_fingerprint(self, _: Any) -> str:
        return self.key


def wait_for_job(server: str, token: str, job_id: int, poll_s: float = 1.0) -> dict[str, Any]:
    """The job once it has succeeded, failed or been cancelled, with its progress on stderr."""
    api = _Api(server, token)
    while True:
        job: dict[str, Any] = api.call("GET", f"/jobs/{job_id}")
        sys.stderr.write(f"\rjob {job_id}: {job['status']} {100 * float(job.get('progress') or 0):5.1f}%   ")
        sys.stderr.flush()
        if job["status"] in JOB_FINISHED:
            sys.stderr.write("\n")
            return job
        time.sleep(poll_s)


def _progress(done: int, total: int, name: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done / max(total, 1):6.1%}  {name:<40}")
    sys.stderr.flush()


def upload_agreement(trust_file: Path, *, server: str, token: str, job: int) -> dict[str, Any]:
    """Attach ``dvemb trust``'s record (``trust-<set>.json``: how far a run's fast scores agree with its exact
    replay) to the service's analysis ``job`` of the same log, where the dashboard shows it next to the scores.

    Raises:
        UploadError: the file is not a trust record, or the service refused it (another analysis's scores: 409).
    """
    try:
        record = json.loads(Path(trust_file).read_text())
    except (OSError, ValueError) as exc:
        raise UploadError(f"{trust_file}: cannot read a trust record ({exc}); `dvemb trust` writes one") from None
    if not isinstance(record, dict) or record.get("format") != "dvemb-trust" or not record.get("query_set"):
        raise UploadError(f"{trust_file} is not a trust record; `dvemb trust RESULTS --query-set SET` writes one")
    api = _Api(server, token)
    stored: dict[str, Any] = api.call("PUT", f"/jobs/{job}/replay-agreement/{record['query_set']}", json=record)
    return stored


def start_replay(
    *,
    server: str,
    token: str,
    job: int,
    query_set: str,
    probe: int = 0,
    wait: bool = False,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Ask the service to replay the run of analysis ``job`` exactly on ``query_set``, from the run's replay bundle
    (uploaded with the log; docs/replay.md, "In the service"); with ``wait``, follow it until it ends.

    Returns:
        the replay (``status``, ``progress``, once done its ``summary``); its agreement is then in the analysis's
        summary (``replay_agreements``).

    Raises:
        UploadError: the service refused (no bundle: 409; a query set the analysis has no scores of: 404).
    """
    api = _Api(server, token)
    body = {"query_set": query_set, "probe": probe}
    started: dict[str, Any] = api.call("POST", f"/jobs/{job}/replays", json=body)
    while wait and started["status"] not in REPLAY_FINISHED:
        time.sleep(poll_s)
        started = api.call("GET", f"/jobs/{job}/replays/{started['id']}")
        sys.stderr.write(f"\rreplay {started['id']}: {started['status']} {100 * float(started['progress']):5.1f}%   ")
    return started
