"""The lease helper itself (server/db/leases.py, Lease), on SQLite (the embedded mode's database, made by the
migrations): it claims a row, sends a second claim away while the first holds it (LeaseHeld), fails a row past the
attempt cap in the caller's words, gives the block a fencing token, renews the lease while the block runs, and
hands the claim back uncounted after a transient database error while the task has retries left."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.db import leases
from server.db.leases import Lease, LeaseHeld
from server.db.models import Job, Project, Run
from server.db.session import make_engine
from server.db.states import JobStatus, transition
from server.migrate import upgrade
from server.settings import get_settings

CAP = 2


@pytest.fixture
def job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A queued job in a fresh SQLite database, which the lease helper's sessions (and its heartbeat's) use within
    the test; the process's own engine and settings are left alone (the in-process API's reconciler uses them)."""
    url = f"sqlite:///{tmp_path / 'dvemb.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    settings = get_settings().model_copy(update={"task_max_attempts": CAP})
    monkeypatch.setattr(leases, "session_factory", lambda: factory)
    monkeypatch.setattr(leases, "get_settings", lambda: settings)
    try:
        with factory() as session:
            project = Project(name="p")
            session.add(project)
            session.flush()
            run = Run(project_id=project.id, name="r", status="ready")
            session.add(run)
            session.flush()
            job = Job(run_id=run.id, status=JobStatus.QUEUED, options={})
            session.add(job)
            session.commit()
            yield job.id
    finally:
        engine.dispose()


def lease(job_id: int, seconds: float = 30.0, **options: Any) -> Lease:
    return Lease(Job, job_id, working=JobStatus.RUNNING, waiting=JobStatus.QUEUED, lease=seconds, **options)


def job(job_id: int) -> Job:
    with leases.session_factory()() as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row


def set_job(job_id: int, **values: Any) -> None:
    with leases.session_factory()() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def fenced_write(job_id: int, mine: Any, progress: float) -> bool:
    """A write of this attempt's: lost once another attempt holds the row."""
    with leases.session_factory()() as session:
        written = session.execute(update(Job).where(Job.id == job_id, mine).values(progress=progress))
        session.commit()
        return bool(written.rowcount == 1)  # type: ignore[attr-defined]


def test_a_claim_holds_the_row_and_a_second_claim_is_sent_away(job_id: int) -> None:
    with lease(job_id) as held:
        assert held and held.row.id == job_id and held.row.attempts == 1
        assert (job(job_id).status, job(job_id).attempts) == (JobStatus.RUNNING, 1)
        with pytest.raises(LeaseHeld), lease(job_id):  # a redelivery while this worker's lease is alive
            pytest.fail("a held row was claimed again")
        with lease(job_id, raise_if_held=False) as other:  # a segment's way: move on
            assert not other
        assert fenced_write(job_id, held.mine, 0.5)
    assert (job(job_id).attempts, job(job_id).progress) == (1, 0.5)  # the refusals counted nothing

    with leases.session_factory()() as session:  # the job is done: a redelivered task has nothing to do
        row = session.get(Job, job_id)
        assert row is not None and transition(session, row, JobStatus.SUCCEEDED)
        session.commit()
    with lease(job_id) as done, lease(job_id + 1) as missing:
        assert not done and not missing


def test_a_row_whose_worker_died_is_taken_over_and_the_old_token_writes_nothing(job_id: int) -> None:
    with lease(job_id) as first:
        set_job(job_id, lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))  # as if it had died
        with lease(job_id) as second:
            assert second and second.row.attempts == 2
            assert not fenced_write(job_id, first.mine, 0.25)
            assert fenced_write(job_id, second.mine, 0.75)
    assert job(job_id).progress == 0.75


def test_the_attempt_cap_fails_the_row_in_the_callers_words(job_id: int) -> None:
    failures: list[tuple[int, str]] = []

    def fail(session: Session, row: Job, mine: Any, problem: str) -> None:
        failures.append((row.attempts, problem))
        transition(session, row, JobStatus.FAILED, when=mine, error=problem)
        session.commit()

    def gave_up(cap: int) -> str:
        return f"its worker died {cap} times"

    expired = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    set_job(job_id, status=JobStatus.RUNNING, attempts=CAP - 1, lease_expires_at=expired)
    with lease(job_id, gave_up=gave_up, fail=fail) as held:  # the cap-th attempt still runs
        assert held and held.row.attempts == CAP
        set_job(job_id, lease_expires_at=expired)  # ... and its worker dies too
    with lease(job_id, gave_up=gave_up, fail=fail) as held:
        assert not held
    assert failures == [(CAP + 1, f"its worker died {CAP} times")]
    assert (job(job_id).status, job(job_id).error) == (JobStatus.FAILED, f"its worker died {CAP} times")

    with pytest.raises(ValueError, match="fail"):
        lease(job_id, gave_up=gave_up)


def test_without_a_cap_a_row_is_claimed_whatever_its_attempts(job_id: int) -> None:
    set_job(job_id, attempts=CAP + 5)
    with lease(job_id) as held:
        assert held and held.row.attempts == CAP + 6


def test_a_transient_error_hands_the_claim_back_uncounted_while_retries_are_left(job_id: int) -> None:
    before = dt.datetime.now(dt.UTC)
    with pytest.raises(OperationalError), lease(job_id, transient_retries_left=1):
        raise OperationalError("UPDATE jobs", {}, Exception("a lock timeout"))
    handed = job(job_id)
    expires = handed.lease_expires_at
    assert expires is not None
    expires = expires if expires.tzinfo else expires.replace(tzinfo=dt.UTC)  # SQLite keeps naive UTC
    assert (handed.status, handed.attempts) == (JobStatus.RUNNING, 0)
    assert before <= expires <= dt.datetime.now(dt.UTC)  # expired: the retry takes it at once
    with lease(job_id) as retry:  # the task's retry
        assert retry and retry.row.attempts == 1

    set_job(job_id, lease_expires_at=before)
    with pytest.raises(OperationalError), lease(job_id, transient_retries_left=0):  # the last retry
        raise OperationalError("UPDATE jobs", {}, Exception("a lock timeout"))
    assert job(job_id).attempts == 2  # counted: the lease expires and the reconciler queues the job again

    set_job(job_id, lease_expires_at=before)
    with pytest.raises(RuntimeError), lease(job_id, transient_retries_left=3):  # not transient: the caller's
        raise RuntimeError("a bug")
    assert job(job_id).attempts == 3


def test_a_session_given_to_the_lease_is_rolled_back_before_the_claim_is_handed_back(job_id: int) -> None:
    """The block's session may hold the row's lock (a verdict half-written): handing back from another connection
    would wait for it (on SQLite, for the whole database's write lock)."""
    with (
        leases.session_factory()() as session,
        pytest.raises(OperationalError),
        lease(job_id, session=session, transient_retries_left=1) as held,
    ):
        session.execute(update(Job).where(Job.id == job_id, held.mine).values(progress=0.5))  # locks it
        raise OperationalError("UPDATE runs", {}, Exception("a lost connection"))
    assert (job(job_id).attempts, job(job_id).progress) == (0, 0.0)


def test_the_lease_is_renewed_while_the_block_runs(job_id: int) -> None:
    with lease(job_id, seconds=0.6) as held:
        assert held
        time.sleep(1.0)  # past the claim's lease: only the heartbeat keeps it alive
        with pytest.raises(LeaseHeld), lease(job_id):
            pass
    beats: list[tuple[Any, ...]] = []

    class Recorded:
        def __init__(self, *args: Any) -> None:
            beats.append(args)

        def __enter__(self) -> None:
            beats.append(("enter",))

        def __exit__(self, *exc: object) -> None:
            beats.append(("exit",))

    set_job(job_id, status=JobStatus.QUEUED)
    with lease(job_id, heartbeat=Recorded) as held:
        assert beats[:1] == [(Job, job_id, JobStatus.RUNNING, 30.0, held.mine)]
    assert [b[0] for b in beats[1:]] == ["enter", "exit"]


def test_a_renewal_that_comes_late_is_logged_with_the_fix(
    job_id: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat starved of CPU renews late; past two thirds of the lease (one renewal missed) it says so, naming
    the setting to raise, since a renewal later than the lease lets another worker take the row over."""
    ticks = iter([0.0, 5.0, *(5.0 + 0.1 * i for i in range(1, 100_000))])  # the first beat comes 5 s late
    monkeypatch.setattr(leases, "monotonic", lambda: next(ticks))

    def late() -> list[str]:
        return [r.getMessage() for r in caplog.records if "renewed" in r.getMessage()]

    with caplog.at_level("WARNING", logger=leases.logger.name), lease(job_id, seconds=0.3) as held:
        assert held
        deadline = time.monotonic() + 30  # the first beat is due after 0.1 s: ample room on a loaded machine
        while not late() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert late() == [
        f"the lease of jobs {job_id} was renewed 5.0 s after the last (lease 0.3 s): this process is starved of CPU, and "
        "another worker takes the row over (counting an attempt) once a renewal comes later than the lease; raise "
        "DVEMB_JOB_LEASE_SECONDS on a machine this loaded"
    ]
