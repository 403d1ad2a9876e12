"""Validating an uploaded file with the core reader: a valid file moves into the run's log, an invalid
one is rejected with the reason and its bytes removed; the run becomes ready once every file its
manifests list is. Idempotent: a redelivered task finds the file judged and does nothing, or claimed by a live
validator and comes back later; a file whose validator died (its lease expired) is taken over, and the attempt
cap rejects a file that kills every validator (server/db/leases.py). Only the validator that holds the file moves
or deletes its bytes, in the transaction that records its verdict (:func:`_hold`): a validator whose file was
taken over while it worked (alive, but its lease expired) touches nothing."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dvemb.errors import DvembError
from dvemb.formats import (
    MANIFEST,
    Manifest,
    index_name,
    is_index_name,
    is_manifest_name,
    is_replay_bundle_name,
    manifest_names,
    rank_manifest_name,
)
from dvemb.reader import GradientLog, check_index_file, check_manifest_file, check_rank_manifest
from dvemb.replay.bundle import check_bundle
from server.db.leases import Heartbeat, Lease, hold, lock_run, take, task_deadline
from server.db.models import LogFile, Run
from server.db.run_files import missing_files
from server.db.session import session_factory
from server.db.states import FileStatus, RunStatus, transition
from server.settings import get_settings
from server.storage import Storage, get_storage, staging_key
from server.tasks import VALIDATE_FILE, enqueue_after_commit, sender

__all__ = ["run_validate_file"]


def run_validate_file(file_id: int, transient_retries_left: int = 0) -> None:
    """Validate one received file; move it into the run's log if valid, reject it (and its bytes) if not.
    ``transient_retries_left``: how many more times the task will be retried after a database error.

    Raises:
        LeaseHeld: another validator holds the file (its lease is alive): the task should come back later.
    """
    lease = get_settings().job_lease_seconds
    # The claim (server/db/leases.py, Lease): of two tasks for the file (a redelivery, a re-trigger), one validates;
    # a file whose validator died (its lease expired) is taken over, and one that killed every validator is
    # rejected (the cap). Its token: a validator whose file was taken over writes no verdict. Any database error is
    # the database's fault, not the file's (a lost connection, a lock timeout, or a bug): the file is not rejected
    # for it, nor told SQL; the claim is handed back uncounted and the task retries.
    with (
        session_factory()() as session,
        Lease(
            LogFile,
            file_id,
            working=FileStatus.VALIDATING,
            waiting=FileStatus.RECEIVED,
            lease=lease,
            transient_retries_left=transient_retries_left,
            transient=SQLAlchemyError,
            gave_up=_gave_up,
            fail=_reject,
            session=session,  # the verdict is written in the claim's session
            heartbeat=Heartbeat,  # (this module's name for it: a test stops the beats)
        ) as held,
    ):
        if not held:
            return  # judged, deleted, or rejected at the attempt cap
        upload = held.row
        run_id = upload.run_id
        ready = _validate(session, upload, held.mine, lease)  # a large file takes a while: the lease beats
    if ready:
        _settle_run(run_id)


def _claim(session: Session, file_id: int, lease: float) -> LogFile | None:
    """The file, claimed (the first step of run_validate_file's Lease); None when there is nothing to do (judged,
    deleted)."""
    upload: LogFile | None = take(
        session, LogFile, file_id, working=FileStatus.VALIDATING, waiting=FileStatus.RECEIVED, lease=lease
    )
    return upload


def _gave_up(cap: int) -> str:
    return (
        f"validation was started {cap} times and its validator stopped each time before giving a verdict (out of "
        "memory? killed?); upload the file again once the cause is fixed (the cap is DVEMB_TASK_MAX_ATTEMPTS)"
    )


def _validate(session: Session, upload: LogFile, mine: Any, lease: float) -> bool:
    """Judge the claimed file and record the verdict; True once it is ready. The run's row is locked before any
    write to the run or its files (the lock order of server/db/leases.py), and only after the long read."""
    storage = get_storage()
    with storage.received(upload.run_id, upload.upload_id, upload.name) as part:  # a local copy on a bucket
        try:
            if is_replay_bundle_name(upload.name):  # needs no manifest: judged on its own (dvemb.replay.bundle)
                check_bundle(part)
                run = _hold(session, upload, mine, lease)
                if run is None:
                    return False
                storage.publish(run.id, upload.upload_id, upload.name, part)
            elif is_manifest_name(upload.name) or is_index_name(upload.name):  # a manifest, or a rank's shard index
                run = _hold(session, upload, mine, lease)  # held while the manifests are staged: judged together
                if run is None:
                    return False
                _accept_manifest(session, storage, run, upload, part)
            else:
                with _staged(storage, upload.run_id) as staging:
                    if _listing_manifests(staging) is None:
                        _wait_for_manifest(session, storage, upload, mine)
                        return False
                    GradientLog(staging).validate_file(upload.name, part)
                # Concurrent validators and uploads of one run serialise on the run's row (Postgres).
                run = _hold(session, upload, mine, lease)
                if run is None:
                    return False
                storage.publish(run.id, upload.upload_id, upload.name, part)
        except SQLAlchemyError:
            raise  # the database's fault, not the file's: the task retries
        except Exception as exc:  # DvembError explains itself; anything else is still this file's fault
            session.rollback()  # drops the run's lock and anything half-written
            session.info.pop("after_commit_tasks", None)
            problem = str(exc) if isinstance(exc, DvembError) else f"could not be read ({type(exc).__name__}: {exc})"
            _reject(session, upload, mine, storage.public_message(problem.replace(str(part), upload.name)))
            return False
    transition(session, upload, FileStatus.READY, when=mine, error=None, lease_expires_at=None)  # held: it moves
    # Sizes add up in SQL.
    session.execute(update(Run).where(Run.id == run.id).values(size_bytes=Run.size_bytes + upload.size_bytes))
    _update_run(session, run)
    session.commit()
    return True


def _hold(session: Session, upload: LogFile, mine: Any, lease: float) -> Run | None:
    """Lock the run's row, then the file's while this validator still holds the file (the lock order of
    server/db/leases.py); the locked run, or None (rolled back) once another validator took the file over. The
    bytes move only after this, before the verdict's commit. Before, a validator whose lease expired while it read
    moved the part from under its successor, which then rejected the file and deleted the moved bytes."""
    run = lock_run(session, upload.run_id)
    if run is None or not hold(session, LogFile, upload.id, FileStatus.VALIDATING, mine, lease):
        session.rollback()  # the successor's verdict stands; this validator touches neither the row nor the bytes
        return None
    return run


def _staged(storage: Storage, run_id: int) -> AbstractContextManager[Path]:
    """The run's staged manifests and shard indexes, as a local directory (the staging directory itself on a local
    storage; on a bucket a fresh copy, taken after the run's row is locked where that matters)."""
    return storage.local_copy(staging_key(run_id), keep=lambda name: is_manifest_name(name) or is_index_name(name))


def _reject(session: Session, upload: LogFile, mine: Any, problem: str) -> None:
    if transition(session, upload, FileStatus.REJECTED, when=mine, error=problem, lease_expires_at=None):
        # Nothing of an invalid file stays: its part, or the bytes a validator that died had published.
        get_storage().discard(upload.run_id, upload.upload_id, upload.name)
    session.commit()


def _settle_run(run_id: int) -> None:
    """A second look in a fresh transaction: the run is ready once every file it lists is, even when the
    validator that marked the last file could not see another file's commit (SQLite has no row locks)."""
    with session_factory()() as session:
        run = lock_run(session, run_id)
        if run is None or run.status != RunStatus.UPLOADING:
            return
        if _all_files_ready(session, run):
            transition(session, run, RunStatus.READY)
            session.commit()


def _wait_for_manifest(session: Session, storage: Storage, upload: LogFile, mine: Any) -> None:
    # The attempt ended with an answer: it is given back (the cap counts validators that died).
    waiting = "waiting for the manifest(s) to be uploaded and validated"
    transition(
        session,
        upload,
        FileStatus.RECEIVED,
        when=mine,
        error=waiting,
        lease_expires_at=None,
        attempts=LogFile.attempts - 1,
    )
    session.commit()
    with _staged(storage, upload.run_id) as staging:  # a fresh look
        arrived = _listing_manifests(staging) is not None
    if arrived:  # the manifest arrived meanwhile: its re-trigger may have missed us
        sender().send_task(VALIDATE_FILE, args=[upload.id])


def _staged_world_size(staging: Any) -> int | None:
    """The world size rank 0's staged manifest records (None until ``manifest.json`` is staged)."""
    main = staging / MANIFEST
    return int(json.loads(main.read_text())["world_size"]) if main.exists() else None


def _staged_manifests(staging: Any) -> list[dict[str, Any]] | None:
    """Every rank's manifest, rank 0's first, once all of them are staged."""
    world = _staged_world_size(staging)
    if world is None:
        return None
    paths = [staging / name for name in manifest_names(world)]
    return [json.loads(p.read_text()) for p in paths] if all(p.exists() for p in paths) else None


def _listing_manifests(staging: Any, staged: list[dict[str, Any]] | None = None) -> list[dict[str, Any]] | None:
    """The ranks' manifests with their shard lists, once every manifest and (version 3) shard index is staged."""
    staged = staged if staged is not None else _staged_manifests(staging)
    if staged is None:
        return None
    indexes = [staging / index_name(rank) for rank, m in enumerate(staged) if "shard_index" in m]
    return GradientLog(staging).rank_manifests if all(p.exists() for p in indexes) else None


def _accept_manifest(session: Session, storage: Storage, run: Run, upload: LogFile, part: Path) -> None:
    if is_index_name(upload.name):
        check_index_file(part, upload.name)
    else:
        manifest = check_manifest_file(part)
        rank = Manifest.from_json(manifest).rank
        expected = rank_manifest_name(rank)
        if upload.name != expected:
            raise DvembError(f"{upload.name} holds the manifest of rank {rank}; upload it as {expected}")
        with _staged(storage, run.id) as staging:
            _check_rank_fits(staging, upload.name, manifest)
    storage.put_file(staging_key(run.id, upload.name), part)
    with _staged(storage, run.id) as staging:
        manifests = _staged_manifests(staging)
        try:
            listing = _listing_manifests(staging, manifests)
        except DvembError:
            # It disagrees with what is staged (a manifest and its shard index): refused, not kept.
            storage.delete(staging_key(run.id, upload.name))
            raise
        world = _staged_world_size(staging)
    storage.publish(run.id, upload.upload_id, upload.name, part)
    if manifests is not None:
        # Version 3 without its shard indexes yet: the manifests name the indexes, so the run waits for them.
        run.manifest = {"ranks": _stored_manifests(manifests, listing)}
        typed = [Manifest.from_json(m) for m in listing or manifests]
        run.num_steps = min((m.shards[-1].last_step + 1 if m.shards else 0) for m in typed)
    else:
        # A distributed run whose other ranks' manifests are not in yet: the run's row records how many ranks
        # rank 0's manifest announces, so that the run is not complete (nor analysed) without them.
        run.manifest = None if world is None else {"ranks": [], "world_size": world}
    if listing is not None:
        # Files that arrived before the manifest wait for it: validate them now.
        waiting = session.scalars(
            select(LogFile.id).where(
                LogFile.run_id == run.id, LogFile.status == FileStatus.RECEIVED, LogFile.id != upload.id
            )
        ).all()
        session.info.setdefault("after_commit_tasks", []).extend(waiting)
        # They are queued again: they count toward the project's quota of files waiting for the validator.
        session.execute(
            update(LogFile).where(LogFile.id.in_(waiting)).values(error=None, lease_expires_at=task_deadline())
        )


def _check_rank_fits(staging: Any, name: str, manifest: dict[str, Any]) -> None:
    """A rank's manifest belongs with rank 0's (its world size, dtype, layers...: the reader's rule), checked as
    soon as both are staged: a manifest once validated cannot be replaced."""
    typed = Manifest.from_json(manifest)
    if name != MANIFEST:
        main = staging / MANIFEST
        if main.exists():
            first = json.loads(main.read_text())
            world = Manifest.from_json(first).world_size
            if typed.rank >= world:
                raise DvembError(
                    f"{name} is the manifest of rank {typed.rank}, but {MANIFEST} records a world size of "
                    f"{world}: it belongs to another run"
                )
            check_rank_manifest(first, manifest, typed.rank, name)
        return
    for rank in range(1, typed.world_size):
        other = staging / rank_manifest_name(rank)
        if other.exists():
            check_rank_manifest(manifest, json.loads(other.read_text()), rank, other.name)


def _stored_manifests(staged: list[dict[str, Any]], listing: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """What the run's row keeps of each rank's manifest: as uploaded when its shard index is sealed (the index
    file and its ``num_shards`` name every shard), else the manifest with its shard list read in.

    The row is read on every request that checks a run (files missing, query sets, layers); a shard list
    inlined there is about 180 bytes per shard: tens of MB per run at 10^5 shards, parsed each time.
    """
    if listing is None:
        return staged
    return [
        manifest if _index_sealed(Manifest.from_json(manifest)) else listed
        for manifest, listed in zip(staged, listing, strict=True)
    ]


def _index_sealed(manifest: Manifest) -> bool:
    """Whether the manifest names a shard index with its shard count (a closed log's)."""
    return manifest.shard_index is not None and manifest.shard_index.num_shards is not None


def _all_files_ready(session: Session, run: Run) -> bool:
    """Every file the run's manifests list has been validated."""
    return not missing_files(session, run=run)


def _update_run(session: Session, run: Run) -> None:
    transition(session, run, RunStatus.READY if _all_files_ready(session, run) else RunStatus.UPLOADING)
    for file_id in session.info.pop("after_commit_tasks", []):
        enqueue_after_commit(session, VALIDATE_FILE, file_id)
