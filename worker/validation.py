"""Validating an uploaded file with the core reader: a valid file moves into the run's log, an invalid
one is rejected with the reason and its bytes removed; the run becomes ready once every file its
manifests list is. Idempotent: a redelivered task finds the file already claimed and does nothing."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dvemb.errors import DvembError
from dvemb.formats import (
    MANIFEST,
    Manifest,
    index_name,
    is_index_name,
    is_manifest_name,
    manifest_names,
    rank_manifest_name,
)
from dvemb.reader import GradientLog, check_index_file, check_manifest_file
from server.db.models import LogFile, Run
from server.db.run_files import missing_files
from server.db.session import session_factory
from server.db.states import FileStatus, RunStatus, transition
from server.settings import get_settings
from server.storage import log_dir, part_path, public_message, staging_dir
from server.tasks import VALIDATE_FILE, enqueue_after_commit, sender

__all__ = ["run_validate_file"]


def run_validate_file(file_id: int) -> None:
    """Validate one received file; move it into the run's log if valid, reject it (and its bytes) if not."""
    storage = get_settings().storage
    with session_factory()() as session:
        # Claim the file: of two tasks for it (a re-delivery, a re-trigger), only one validates.
        upload = session.get(LogFile, file_id)
        claimed = upload is not None and transition(session, upload, FileStatus.VALIDATING)
        session.commit()
        if not claimed:
            return
        assert upload is not None
        run = session.get(Run, upload.run_id)
        assert run is not None
        part = part_path(storage, run.id, upload.upload_id)
        staging = staging_dir(storage, run.id)
        try:
            if is_manifest_name(upload.name) or is_index_name(upload.name):  # a manifest, or a rank's shard index
                _accept_manifest(session, run, upload, part)
            else:
                if _listing_manifests(staging) is None:
                    _wait_for_manifest(session, upload, staging)
                    return
                GradientLog(staging).validate_file(upload.name, part)
                _publish(part, log_dir(storage, run.id) / upload.name)
        except Exception as exc:  # DvembError explains itself; anything else is still this file's fault
            problem = str(exc) if isinstance(exc, DvembError) else f"could not be read ({type(exc).__name__}: {exc})"
            problem = public_message(problem.replace(str(part), upload.name), storage)
            transition(session, upload, FileStatus.REJECTED, error=problem)
            part.unlink(missing_ok=True)  # nothing of an invalid file stays
            session.commit()
            return
        transition(session, upload, FileStatus.READY, error=None)
        # Concurrent validators of one run serialise on the run row (Postgres); sizes add up in SQL.
        session.execute(update(Run).where(Run.id == run.id).values(size_bytes=Run.size_bytes + upload.size_bytes))
        locked = session.get(Run, run.id, with_for_update=True, populate_existing=True)
        assert locked is not None
        _update_run(session, locked)
        session.commit()
    _settle_run(upload.run_id)


def _settle_run(run_id: int) -> None:
    """A second look in a fresh transaction: the run is ready once every file it lists is, even when the
    validator that marked the last file could not see another file's commit (SQLite has no row locks)."""
    with session_factory()() as session:
        run = session.get(Run, run_id, with_for_update=True)
        if run is None or run.status != RunStatus.UPLOADING:
            return
        if _all_files_ready(session, run):
            transition(session, run, RunStatus.READY)
            session.commit()


def _wait_for_manifest(session: Session, upload: LogFile, staging: Any) -> None:
    transition(session, upload, FileStatus.RECEIVED, error="waiting for the manifest(s) to be uploaded and validated")
    session.commit()
    if _listing_manifests(staging) is not None:  # the manifest arrived meanwhile: its re-trigger may have missed us
        sender().send_task(VALIDATE_FILE, args=[upload.id])


def _staged_manifests(staging: Any) -> list[dict[str, Any]] | None:
    main = staging / MANIFEST
    if not main.exists():
        return None
    world = int(json.loads(main.read_text())["world_size"])
    paths = [staging / name for name in manifest_names(world)]
    return [json.loads(p.read_text()) for p in paths] if all(p.exists() for p in paths) else None


def _listing_manifests(staging: Any, staged: list[dict[str, Any]] | None = None) -> list[dict[str, Any]] | None:
    """The ranks' manifests with their shard lists, once every manifest and (version 3) shard index is staged."""
    staged = staged if staged is not None else _staged_manifests(staging)
    if staged is None:
        return None
    indexes = [staging / index_name(rank) for rank, m in enumerate(staged) if "shard_index" in m]
    return GradientLog(staging).rank_manifests if all(p.exists() for p in indexes) else None


def _accept_manifest(session: Session, run: Run, upload: LogFile, part: Any) -> None:
    if is_index_name(upload.name):
        check_index_file(part, upload.name)
    else:
        manifest = check_manifest_file(part)
        expected = rank_manifest_name(int(manifest["rank"]))
        if upload.name != expected:
            raise DvembError(f"{upload.name} holds the manifest of rank {manifest['rank']}; upload it as {expected}")
    storage = get_settings().storage
    staged = staging_dir(storage, run.id) / upload.name
    shutil.copyfile(part, staged)
    manifests = _staged_manifests(staging_dir(storage, run.id))
    try:
        listing = _listing_manifests(staging_dir(storage, run.id), manifests)
    except DvembError:
        staged.unlink()  # it disagrees with what is staged (a manifest and its shard index): refused, not kept
        raise
    _publish(part, log_dir(storage, run.id) / upload.name)
    if manifests is not None:
        # Version 3 without its shard indexes yet: the manifests name the indexes, so the run waits for them.
        run.manifest = {"ranks": listing or manifests}
        typed = [Manifest.from_json(m) for m in listing or manifests]
        run.num_steps = min((m.shards[-1].last_step + 1 if m.shards else 0) for m in typed)
    if listing is not None:
        # Files that arrived before the manifest wait for it: validate them now.
        waiting = session.scalars(
            select(LogFile.id).where(
                LogFile.run_id == run.id, LogFile.status == FileStatus.RECEIVED, LogFile.id != upload.id
            )
        ).all()
        session.info.setdefault("after_commit_tasks", []).extend(waiting)
        # They are queued again: they count toward the project's quota of files waiting for the validator.
        session.execute(update(LogFile).where(LogFile.id.in_(waiting)).values(error=None))


def _publish(part: Any, final: Any) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)


def _all_files_ready(session: Session, run: Run) -> bool:
    """Every file the run's manifests list has been validated."""
    return not missing_files(session, run=run)


def _update_run(session: Session, run: Run) -> None:
    transition(session, run, RunStatus.READY if _all_files_ready(session, run) else RunStatus.UPLOADING)
    for file_id in session.info.pop("after_commit_tasks", []):
        enqueue_after_commit(session, VALIDATE_FILE, file_id)
