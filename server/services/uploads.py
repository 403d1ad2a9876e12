"""Resumable uploads (tus 1.0: core, creation, termination) of gradient-log files into a run.

Bytes stream to the run's ``staging/<upload id>.part`` (server/storage) with bounded memory; the final PATCH hands
the file to the validator task (the API never parses safetensors and does not import torch), which moves
it into the run's ``log/`` only once it is valid.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from dvemb.formats import MAX_MANIFEST_BYTES, is_index_name, is_manifest_name, is_replay_bundle_name
from server.db.leases import lock_run, task_deadline
from server.db.models import LogFile, Run
from server.db.states import FileStatus, RunStatus, transition
from server.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, TooManyRequests
from server.settings import Settings
from server.storage import check_log_file_name, get_storage
from server.tasks import VALIDATE_FILE, enqueue_after_commit

TUS_VERSION = "1.0.0"
TUS_HEADERS = {"Tus-Resumable": TUS_VERSION}


def parse_metadata(header: str | None) -> dict[str, str]:
    """Decode ``Upload-Metadata: key base64,key base64``."""
    result: dict[str, str] = {}
    for item in (header or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition(" ")
        try:
            result[key] = base64.b64decode(value, validate=True).decode("utf-8") if value else ""
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest(f"Upload-Metadata value of {key!r} is not base64 UTF-8") from None
    return result


def create_upload(session: Session, *, run: Run, name: str, length: int, settings: Settings) -> LogFile:
    check_log_file_name(name)
    # The run's row is locked first, before any write to its files (the lock order of server/db/leases.py:
    # inserting a file takes a key-share lock on the run's row, and updating the run after that deadlocked with
    # a validator). Uploads to one run are serialised, so the quotas below are checked against committed files.
    locked = lock_run(session, run.id)
    if locked is None:
        raise NotFound(f"run {run.id} not found (deleted meanwhile)")
    run = locked
    # The replay bundle is not part of the log its manifest lists: it may come once the run is complete, and it
    # never makes a complete run incomplete.
    bundle = is_replay_bundle_name(name)
    if run.status == RunStatus.READY and not bundle:
        # A complete run cannot change: an extra file would only be rejected, and used to leave the run
        # 'uploading' for ever.
        raise Conflict(
            f"run {run.name!r} is complete (every file its manifest lists is validated); upload to a new run"
        )
    _check_quotas(session, run=run, settings=settings, releases=is_manifest_name(name) or is_index_name(name))
    if length < 0:
        raise BadRequest("Upload-Length must be a non-negative integer")
    if is_manifest_name(name) and length > MAX_MANIFEST_BYTES:
        raise PayloadTooLarge(f"{name} has {length} bytes; a manifest holds at most {MAX_MANIFEST_BYTES}")
    if length > settings.max_file_bytes:
        raise PayloadTooLarge(
            f"{name} has {length} bytes; the limit per file is {settings.max_file_bytes} (DVEMB_MAX_FILE_BYTES)"
        )
    existing = session.scalar(select(LogFile).where(LogFile.run_id == run.id, LogFile.name == name))
    if existing is not None:
        if existing.status == FileStatus.READY:
            raise Conflict(f"{name} is already uploaded and valid in this run")
        if existing.status in (FileStatus.RECEIVED, FileStatus.VALIDATING):
            raise Conflict(f"{name} is being validated; wait for the verdict before uploading it again")
        get_storage().delete_part(run.id, existing.upload_id)
        session.delete(existing)  # a rejected or abandoned attempt: start over
        session.flush()
    # Everything not rejected counts, uploads in flight included (size_bytes only grows on validation).
    held = (
        session.scalar(
            select(func.coalesce(func.sum(LogFile.size_bytes), 0)).where(
                LogFile.run_id == run.id, LogFile.status != FileStatus.REJECTED
            )
        )
        or 0
    )
    total = int(held) + length
    if total > settings.max_run_bytes:
        raise PayloadTooLarge(
            f"the run would hold {total} bytes; the limit is {settings.max_run_bytes} (DVEMB_MAX_RUN_BYTES)"
        )
    upload = LogFile(run_id=run.id, name=name, upload_id=secrets.token_hex(16), size_bytes=length, offset=0)
    session.add(upload)
    session.flush()
    if not (bundle and run.status == RunStatus.READY):
        transition(session, run, RunStatus.UPLOADING)
    get_storage().create_part(run.id, upload.upload_id)
    if length == 0:
        finish_upload(session, upload=upload)
    return upload


def _check_quotas(session: Session, *, run: Run, settings: Settings, releases: bool) -> None:
    """Per-run and per-project ceilings, so that one project's flood of files cannot starve the others: files
    in a run, and files of the project waiting for the validator, those waiting for their run's manifest or shard
    index included (a manifest's arrival hands every one of them to the validator at once). A manifest or shard
    index (``releases``) never waits for another file: the files waiting for one do not keep it out."""
    files = session.scalar(select(func.count()).where(LogFile.run_id == run.id)) or 0
    if files >= settings.max_files_per_run:
        raise PayloadTooLarge(
            f"run {run.name!r} holds {files} files; the limit is {settings.max_files_per_run} "
            "(DVEMB_MAX_FILES_PER_RUN): record with larger shards (shard_size_mb)"
        )
    waiting = session.execute(
        select(func.count(), func.count(LogFile.error))  # a received file with a note waits for its manifest
        .select_from(LogFile)
        .join(Run, Run.id == LogFile.run_id)
        .where(Run.project_id == run.project_id, LogFile.status.in_((FileStatus.RECEIVED, FileStatus.VALIDATING)))
    ).one()
    pending, for_manifest = int(waiting[0]), int(waiting[1])
    if releases:
        pending -= for_manifest
    if pending >= settings.max_pending_files:
        raise TooManyRequests(
            f"{pending} files of this project are waiting for validation ({for_manifest} of them for their run's "
            f"manifest or shard index); the limit is {settings.max_pending_files} (DVEMB_MAX_PENDING_FILES): "
            "upload each run's manifests and shard indexes (manifest*.json, shards*.jsonl) before its other files, "
            "so that each file is validated as it arrives (dvemb upload and the dashboard do), and delete the files "
            "that wait for a manifest that will not come (DELETE /uploads/{id}); then retry once some verdicts are in",
            headers={"Retry-After": "10"},
        )


def delete_waiting(session: Session, *, upload: LogFile, settings: Settings) -> None:
    """Delete a received file that waits for its run's manifest or shard index (it counts toward the project's
    quota of pending files, and the manifest may never come). A compare-and-set under the run's lock: a file that
    a manifest has just handed to the validator is not deleted (409)."""
    lock_run(session, upload.run_id)
    gone = session.execute(
        delete(LogFile)
        .where(LogFile.id == upload.id, LogFile.status == FileStatus.RECEIVED, LogFile.error.is_not(None))
        .execution_options(synchronize_session=False)
    )
    if gone.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(f"{upload.name} is being validated; wait for the verdict")
    get_storage().delete_part(upload.run_id, upload.upload_id)


def get_upload(session: Session, *, project_id: int, upload_id: str) -> tuple[LogFile, Run]:
    upload = session.scalar(select(LogFile).where(LogFile.upload_id == upload_id))
    run = session.get(Run, upload.run_id) if upload is not None else None
    if upload is None or run is None or run.project_id != project_id:
        raise NotFound(f"upload {upload_id} not found")
    return upload, run


def finish_upload(session: Session, *, upload: LogFile) -> None:
    """All bytes are in: hand the file to the validator once this is committed."""
    deadline = task_deadline()  # claimed by a validator by then, or its task is sent again
    if not transition(
        session, upload, FileStatus.RECEIVED, only_from=(FileStatus.UPLOADING,), error=None, lease_expires_at=deadline
    ):
        raise Conflict(f"{upload.name} is {upload.status}; only an upload in progress can be finished")
    enqueue_after_commit(session, VALIDATE_FILE, upload.id)
