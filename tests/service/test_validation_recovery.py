"""Issue 13: nothing left ``validating`` for ever, and no deadlock between an upload and a validator of one run.

A validator killed mid-file leaves a lease nobody renews: the redelivered task (or the API's reconciler) takes
the file over, and the attempt cap rejects a file that kills every validator. Every path that writes a run's row
and its files' rows locks the run row first (server/db/leases.py), so concurrent uploads and validations of one
run serialise instead of deadlocking on PostgreSQL."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from service_harness import Worker, record_log, wait_until
from sqlalchemy import text, update

from server.db.models import LogFile, Project, Run
from server.db.session import get_engine, session_factory
from server.db.states import FileStatus
from server.settings import get_settings
from server.storage import part_path, staging_dir
from server.tasks import enqueue_after_commit

SHARD, OTHER = "shard-r0-000000.safetensors", "shard-r0-000001.safetensors"


def _receive(log: Path, run_id: int, names: list[str]) -> dict[str, int]:
    """Files ``names`` of the run, received (bytes in staging) with no task sent: the test queues or calls the
    validator."""
    storage = get_settings().storage
    staging_dir(storage, run_id).mkdir(parents=True, exist_ok=True)
    ids = {}
    with session_factory()() as session:
        for name in names:
            size = (log / name).stat().st_size
            upload = LogFile(run_id=run_id, name=name, upload_id=f"u{run_id}-{name}", size_bytes=size, offset=size)
            upload.status = FileStatus.RECEIVED
            session.add(upload)
            session.flush()
            shutil.copyfile(log / name, part_path(storage, run_id, upload.upload_id))
            ids[name] = upload.id
        session.commit()
    return ids


def _file(file_id: int) -> LogFile:
    with session_factory()() as session:
        upload = session.get(LogFile, file_id)
        assert upload is not None
        return upload


def _ready_to_validate(tmp_path: Path) -> tuple[int, dict[str, int], Path]:
    """A run whose manifest and shard index are validated and whose two shards are received: (run, ids, log).
    The shards arrive after the manifest's validation, which would otherwise queue them for the worker."""
    from worker.validation import run_validate_file

    log = record_log(tmp_path / "log", steps=4, shard_steps=2)
    with session_factory()() as session:
        project = Project(name="locks")
        session.add(project)
        session.flush()
        run = Run(project_id=project.id, name="locks", status="uploading")
        session.add(run)
        session.commit()
    ids = _receive(log, run.id, ["manifest.json", "shards.jsonl"])
    run_validate_file(ids["manifest.json"])
    run_validate_file(ids["shards.jsonl"])
    return run.id, {**ids, **_receive(log, run.id, [SHARD, OTHER])}, log


def _waiting_on_locks() -> int:
    with get_engine().connect() as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return int(conn.execute(text(query)).scalar_one())


def _in_thread(work: Callable[[], object], errors: list[BaseException]) -> threading.Thread:
    def target() -> None:
        try:
            work()
        except BaseException as exc:  # the test reports it
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(condition, timeout, what, poll=0.05)


def test_an_upload_and_a_validator_of_one_run_do_not_deadlock(service_env: dict[str, str], tmp_path: Path) -> None:
    """The validator marked its file ready (the file's row), then updated the run's row and locked it FOR UPDATE;
    create_upload inserted its file (which takes a key-share lock on the run's row, the foreign key), then
    updated the run's row: each waited for the other, and PostgreSQL aborted one ('deadlock detected'). A third
    connection holds the run's row so that both are seen waiting on it, validator first, before it lets go."""
    from server.services.uploads import create_upload
    from worker.validation import run_validate_file

    run_id, ids, _ = _ready_to_validate(tmp_path)
    shard_id = ids[SHARD]

    def upload() -> None:
        with session_factory()() as session:
            run = session.get(Run, run_id)
            assert run is not None
            create_upload(session, run=run, name="shard-r0-000002.safetensors", length=10, settings=get_settings())
            session.commit()

    errors: list[BaseException] = []
    url = service_env["DVEMB_DATABASE_URL"].replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url) as holder:
        holder.execute("SELECT id FROM runs WHERE id = %s FOR NO KEY UPDATE", (run_id,))  # blocks no insert
        validator = _in_thread(lambda: run_validate_file(shard_id), errors)
        _wait_until(lambda: _waiting_on_locks() == 1 or bool(errors), 30, "the validator never waited")
        uploader = _in_thread(upload, errors)
        _wait_until(lambda: _waiting_on_locks() == 2 or bool(errors), 30, "create_upload never waited")
    # The holder committed: the validator goes first, create_upload waits for it (or, before, they deadlocked).
    validator.join(30)
    uploader.join(30)
    assert not errors, errors
    with session_factory()() as session:
        run = session.get(Run, run_id)
        assert run is not None and run.status == "uploading"
        files = {f.name: f.status for f in session.query(LogFile).filter_by(run_id=run_id)}
    assert files[SHARD] == FileStatus.READY and files["shard-r0-000002.safetensors"] == FileStatus.UPLOADING


def test_a_file_whose_validator_is_killed_is_validated_again(
    service_env: dict[str, str], worker: Worker, tmp_path: Path
) -> None:
    """A validator killed mid-file left the file 'validating' for ever: the redelivered task could not claim it.
    The validator is held at the run's row (a connection locks it) until it is killed; the redelivered task waits
    for the dead validator's lease to expire, takes the file over and finds its bytes already moved into the log."""
    from server.tasks import VALIDATE_FILE

    run_id, ids, log = _ready_to_validate(tmp_path)
    shard_id = ids[SHARD]
    url = service_env["DVEMB_DATABASE_URL"].replace("postgresql+psycopg", "postgresql")
    try:
        with psycopg.connect(url) as holder:
            holder.execute("SELECT id FROM runs WHERE id = %s FOR NO KEY UPDATE", (run_id,))
            with session_factory()() as session:  # the task the last PATCH queues
                enqueue_after_commit(session, VALIDATE_FILE, shard_id)
                session.commit()
            _wait_until(lambda: _waiting_on_locks() == 1, 60, "the validator never reached the run's row")
            assert _file(shard_id).status == FileStatus.VALIDATING
            worker.kill()
    finally:
        worker.start()  # the unacknowledged task comes back after the visibility timeout
    # The reconciler may put the file back to 'received' (queued again) before a task takes it: wait for a verdict.
    settled = (FileStatus.READY, FileStatus.REJECTED)
    _wait_until(lambda: _file(shard_id).status in settled, 60, "the file never got a verdict")
    upload = _file(shard_id)
    assert (upload.status, upload.error, upload.attempts) == (FileStatus.READY, None, 2)
    published = get_settings().storage / "runs" / str(run_id) / "log" / SHARD
    assert published.read_bytes() == (log / SHARD).read_bytes()


def test_the_reconciler_requeues_a_lost_validation_and_the_cap_rejects_it(
    service_env: dict[str, str], worker: Worker, tmp_path: Path
) -> None:
    """A file whose validator's lease expired goes back to 'received' with a new task (the reconciler); a live
    lease sends a redelivery away (LeaseHeld); past the attempt cap, the file is rejected with the reason."""
    from server.db.leases import LeaseHeld
    from server.reconciler import requeue_expired_files
    from worker.validation import run_validate_file

    _, ids, _ = _ready_to_validate(tmp_path)
    shard_id = ids[SHARD]
    now = dt.datetime.now(dt.UTC)

    def lost(file_id: int, attempts: int, lease: dt.timedelta) -> None:  # a validator claimed the file and died
        _set(file_id, status="validating", attempts=attempts, lease_expires_at=now + lease)

    worker.kill()  # no worker takes the task while the rows are set up
    try:
        lost(shard_id, 1, dt.timedelta(minutes=5))
        with pytest.raises(LeaseHeld):
            run_validate_file(shard_id)  # its validator is alive
        assert requeue_expired_files(session_factory()) == 0
        lost(shard_id, 1, -dt.timedelta(seconds=1))
        assert requeue_expired_files(session_factory()) == 1
        assert _file(shard_id).status == FileStatus.RECEIVED
    finally:
        worker.start()  # takes the reconciler's task
    _wait_until(lambda: _file(shard_id).status == FileStatus.READY, 60, "the requeued file was not validated")
    assert _file(shard_id).attempts == 2

    cap = get_settings().task_max_attempts
    worker.kill()
    try:
        lost(ids[OTHER], cap, -dt.timedelta(seconds=1))
        run_validate_file(ids[OTHER])  # the redelivered task of a validator that died for the cap-th time
    finally:
        worker.start()
    upload = _file(ids[OTHER])
    assert upload.status == FileStatus.REJECTED and f"started {cap} times" in (upload.error or ""), upload.error
    assert not part_path(get_settings().storage, upload.run_id, upload.upload_id).exists()


def _set(file_id: int, **values: object) -> None:
    with session_factory()() as session:
        session.execute(update(LogFile).where(LogFile.id == file_id).values(**values))
        session.commit()


def test_a_validator_whose_file_was_taken_over_leaves_its_bytes(
    service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validator A, alive but past its lease, finished reading and moved the part into the log while B, which had
    taken the file over, was about to read it: B found no part, rejected the file and deleted the moved bytes (a
    valid file lost). A now checks its claim, locked, before it moves anything. Heartbeats are off: the test says
    when A's lease has expired; B waits in its read until A has given up."""
    import worker.validation as validation
    from dvemb.reader import GradientLog

    run_id, ids, log = _ready_to_validate(tmp_path)
    shard_id = ids[SHARD]
    read = GradientLog.validate_file
    a_reads, b_reads = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def validate_file(self: GradientLog, name: str, part: Path) -> None:
        if not a_reads.is_set():  # A: its lease expires while it reads
            a_reads.set()
            assert b_reads.wait(30), "B never read"
        else:  # B: reads once A is done
            b_reads.set()
            a.join(30)
        read(self, name, part)

    monkeypatch.setattr(validation, "Heartbeat", lambda *args: contextlib.nullcontext())
    monkeypatch.setattr(GradientLog, "validate_file", validate_file)
    a = _in_thread(lambda: validation.run_validate_file(shard_id), errors)
    assert a_reads.wait(30), "A never read"
    _set(shard_id, lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    validation.run_validate_file(shard_id)  # B, as the reconciler's task would
    assert not a.is_alive() and not errors, errors
    upload = _file(shard_id)
    assert (upload.status, upload.error, upload.attempts) == (FileStatus.READY, None, 2), upload.error
    published = get_settings().storage / "runs" / str(run_id) / "log" / SHARD
    assert published.read_bytes() == (log / SHARD).read_bytes()


def test_a_claim_and_a_requeue_clear_the_waiting_note(
    service_env: dict[str, str], worker: Worker, tmp_path: Path
) -> None:
    """A file claimed or queued again kept an earlier attempt's 'waiting for the manifest' note: queued, it then
    looked parked (the quota skipped it, the dashboard gave a wrong reason)."""
    from server.reconciler import requeue_expired_files
    from worker.validation import _claim

    _, ids, _ = _ready_to_validate(tmp_path)
    shard_id = ids[SHARD]
    note = "waiting for the manifest(s) to be uploaded and validated"
    worker.kill()  # the re-queued task waits for the test's checks
    try:
        _set(shard_id, error=note)
        with session_factory()() as session:
            assert _claim(session, shard_id, 30) is not None
        assert (_file(shard_id).status, _file(shard_id).error) == (FileStatus.VALIDATING, None)
        _set(shard_id, error=note, lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        assert requeue_expired_files(session_factory()) == 1
        assert (_file(shard_id).status, _file(shard_id).error) == (FileStatus.RECEIVED, None)
    finally:
        worker.start()
    _wait_until(lambda: _file(shard_id).status == FileStatus.READY, 60, "the re-queued file was not validated")


def test_a_claim_handed_back_is_requeued_if_its_retry_is_lost(
    service_env: dict[str, str], worker: Worker, tmp_path: Path
) -> None:
    """After a transient database error the validator gives its claim back for the task's retry; it left no lease,
    and the reconciler looks only at leases that expired: had the retry's message been lost, the file stayed
    'validating' for ever. The lease given back has expired instead."""
    from server.db.leases import hand_back, holder
    from server.reconciler import requeue_expired_files
    from worker.validation import _claim

    _, ids, _ = _ready_to_validate(tmp_path)
    shard_id = ids[SHARD]
    worker.kill()
    try:
        with session_factory()() as session:
            upload = _claim(session, shard_id, 30)
            assert upload is not None
            hand_back(session_factory(), LogFile, shard_id, FileStatus.VALIDATING, holder(upload))
        assert _file(shard_id).attempts == 0
        assert requeue_expired_files(session_factory()) == 1  # the retry's message never came
        assert _file(shard_id).status == FileStatus.RECEIVED
    finally:
        worker.start()
    _wait_until(lambda: _file(shard_id).status == FileStatus.READY, 60, "the re-queued file was not validated")


def test_a_database_error_does_not_reject_the_file(
    service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database error other than OperationalError (here a real one: a query PostgreSQL refuses) rejected the file,
    deleting its bytes, with the SQL in its reason. It is the database's fault: the claim is given back and the
    task retries; the retry validates the file."""
    from sqlalchemy.exc import ProgrammingError

    from dvemb.reader import GradientLog
    from worker.validation import run_validate_file

    run_id, ids, _ = _ready_to_validate(tmp_path)
    shard_id = ids[SHARD]

    def broken(*args: object) -> None:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT no_such_column FROM log_files"))

    with monkeypatch.context() as patch:
        patch.setattr(GradientLog, "validate_file", broken)
        with pytest.raises(ProgrammingError):
            run_validate_file(shard_id, transient_retries_left=1)
    upload = _file(shard_id)
    assert upload.status != FileStatus.REJECTED and upload.error is None, upload.error
    assert upload.attempts == 0  # given back: a database error is not a validator that died
    assert part_path(get_settings().storage, run_id, upload.upload_id).exists()
    run_validate_file(shard_id)  # the task's retry
    assert _file(shard_id).status == FileStatus.READY
