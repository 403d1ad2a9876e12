"""Computing a job with the core engine (resuming its checkpoint after a crash), then storing its
aggregates; the job's status moves through server/db/states.py, so a cancel always wins."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, literal, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from dvemb.engine import ComputeArguments, ComputeProgress, compute
from dvemb.engine.compute import is_segmented, prepare_out
from dvemb.errors import DvembError
from dvemb.formats import Summary, is_replay_bundle_name
from dvemb.reader import open_log
from server.db.leases import Lease, LeaseHeld, hold
from server.db.models import Job, Run
from server.db.session import session_factory
from server.db.states import JobStatus, transition
from server.settings import get_settings
from server.storage import get_storage, log_key
from server.tasks import COMPUTE_SEGMENT
from worker.results_store import example_metadata, refresh_statistics, store_results
from worker.row_writes import ShortTransactions
from worker.segments import SegmentedJob, compute_segmented_job, run_segment_task, stored_plan

__all__ = ["JobCancelled", "LeaseHeld", "compute_arguments", "run_compute", "run_compute_segment"]

logger = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The job was cancelled through the API while computing, or another attempt took it over."""


def _log_only(name: str) -> bool:
    """The files a computation reads: the log without its replay bundle (a model and a data set, read by replays)."""
    return not is_replay_bundle_name(name)


def compute_arguments(options: dict[str, Any]) -> ComputeArguments:
    """The engine's arguments from a job's stored options: what the user set, the engine's defaults for the
    rest (the one place the options become arguments; the API stores only what was given)."""
    known = {f.name for f in dataclasses.fields(ComputeArguments)}
    given = {k: v for k, v in options.items() if k in known and v is not None}
    if "query_sets" in given:
        given["query_sets"] = tuple(given["query_sets"])
    given.setdefault("segments", max(1, get_settings().compute_workers))
    return ComputeArguments(**given)


def run_compute(job_id: int, transient_retries_left: int = 0) -> None:
    """Compute a job (resuming the engine's checkpoint after a crash) and store its aggregates.
    ``transient_retries_left``: how many more times the task will be retried after a database error.

    Raises:
        LeaseHeld: another worker is computing the job (its lease is alive): the task should come back later.
    """
    storage = get_storage()
    factory = session_factory()
    lease = get_settings().job_lease_seconds
    now = dt.datetime.now(dt.UTC)
    # Claimed conditionally (server/db/leases.py, Lease): a cancel committed after we would have read the row must
    # not be overwritten by a plain write of 'running' (the job would then run to 'succeeded'); a running job is
    # taken over only when its lease has expired (its worker died), never while its worker computes it (LeaseHeld).
    # Every later write of this attempt is conditional on the claim's token (held.mine), so a worker whose lease was
    # taken over (or whose job was cancelled and retried) can no longer write anything. A transient database error
    # (OperationalError: a hiccup, a lock timeout) hands the claim back uncounted: the cap is for workers that die.
    with Lease(
        Job,
        job_id,
        working=JobStatus.RUNNING,
        waiting=JobStatus.QUEUED,
        lease=lease,
        transient_retries_left=transient_retries_left,
        gave_up=_gave_up,
        fail=_fail_over_cap,
        started_at=func.coalesce(Job.started_at, literal(now, Job.__table__.c.started_at.type)),
        stored_fraction=None,  # an earlier attempt's rows are deleted and written again
    ) as held:
        if not held:
            return  # done, cancelled, deleted, or past the attempt cap: nothing to do (idempotent re-delivery)
        mine, options, run_id = held.mine, dict(held.row.options), int(held.row.run_id)
        # On a bucket: the log is copied to this machine (a bounded cache), the results are computed in its scratch
        # directory (where a redelivered task on this machine resumes from the checkpoint) and put back once
        # complete.
        out = storage.results_workdir(run_id, job_id)
        args = compute_arguments(options)
        try:
            _compute_and_store(SegmentedJob(job_id, run_id, Path(), out, args, storage, lease), mine)
        except JobCancelled:
            return
        except OperationalError:
            raise  # transient: the lease hands the claim back and the task retries
        except Exception as exc:  # the job fails with the reason in words rather than staying 'running'
            problem = storage.public_message(_in_words(exc))
            with factory() as session:
                job = session.get(Job, job_id)
                if job is not None:  # a cancel that came first, or another attempt, stands
                    now = dt.datetime.now(dt.UTC)
                    transition(session, job, JobStatus.FAILED, when=mine, error=problem, finished_at=now)
                session.commit()


def _compute_and_store(job: SegmentedJob, mine: Any) -> None:
    """The claimed job's computation, its rows and results stored, and the job 'succeeded' (unless a cancel won)."""
    factory = session_factory()
    storage, job_id, run_id, out = job.storage, job.job_id, job.run_id, job.out
    with storage.local_copy(log_key(run_id), keep=_log_only) as log:
        summary = _compute(dataclasses.replace(job, log=log), mine)
        # The rows are written while the job is still running, in short transactions fenced by this claim;
        # the job becomes 'succeeded' (its rows visible) only in the last one.
        writer = ShortTransactions(factory, _fence(job_id, mine, job.lease), _stored_fraction(job_id))
        store_results(writer, job_id, out, summary, example_metadata(log))
        storage.save_results(run_id, job_id, out)  # before the job is visible as succeeded
        # Before the job is visible as succeeded: its first comparison is planned with the new rows counted.
        refresh_statistics(factory)
        with factory() as session:
            # Conditional: a cancel that lands while the rows are written wins (the rows are then unused).
            row = session.get(Job, job_id)
            done = row is not None and transition(
                session,
                row,
                JobStatus.SUCCEEDED,
                when=mine,
                summary=summary,
                progress=1.0,
                eta_seconds=0.0,
                stored_fraction=1.0,
                finished_at=dt.datetime.now(dt.UTC),
            )
            if not done:
                session.rollback()
                return
            # The runs list shows how many examples the run trained on (known once a computation read it).
            examples = Summary.from_json(summary).examples
            session.execute(update(Run).where(Run.id == run_id).values(num_examples=examples))
            session.commit()
        storage.release_workdir(run_id, job_id)


def _gave_up(cap: int) -> str:
    return (
        f"the job was started {cap} times and its worker stopped each time before it finished (out of "
        "memory? killed?); retry it once the cause is fixed, or with fewer query sets or a smaller top_k"
    )


def _fail_over_cap(session: Session, job: Job, mine: Any, problem: str) -> None:
    """Each attempt ended with its worker gone (killed, out of memory): the job fails rather than loop."""
    transition(session, job, JobStatus.FAILED, error=problem, finished_at=dt.datetime.now(dt.UTC))
    session.commit()


def _compute(job: SegmentedJob, mine: Any) -> dict[str, Any]:
    """The engine in this task, or a segmented job spread over every worker (worker/segments.py)."""
    job_id, log, out, args = job.job_id, job.log, job.out, job.args
    report = _progress_writer(job_id, mine)
    gradient_log = open_log(log)
    if not is_segmented(gradient_log, args):
        return compute(log, out, args, progress=report)
    finished = prepare_out(gradient_log, out, args)
    if finished is not None:
        return finished
    started = time.monotonic()

    def segments_done(done: int, total: int) -> None:
        elapsed = time.monotonic() - started
        report(ComputeProgress(done, total, None, elapsed, elapsed / done * (total - done) if done else None))

    def send(index: int) -> None:
        from worker.celery_app import app

        app.send_task(COMPUTE_SEGMENT, args=(job_id, index))

    return compute_segmented_job(job, send_segment=send, progress=segments_done)


def run_compute_segment(job_id: int, index: int) -> None:
    """A ``dvemb.compute_segment`` task: one segment of a running segmented job, unless it is done or held."""
    storage = get_storage()
    with session_factory()() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.RUNNING:
            return  # finished, cancelled or deleted
        options, run_id = dict(job.options), int(job.run_id)
    args = compute_arguments(options)
    out = storage.results_workdir(run_id, job_id)
    lease = get_settings().job_lease_seconds
    probe = SegmentedJob(job_id, run_id, Path(), out, args, storage, lease)
    if stored_plan(probe) is None:
        return  # not planned yet (the job's task sends segments after planning), or combined already
    with storage.local_copy(log_key(run_id), keep=_log_only) as log:
        run_segment_task(dataclasses.replace(probe, log=log), index)


def _in_words(exc: Exception) -> str:
    """What a user is told about a failure: dvemb's own message, or the kind of error; never SQL text."""
    if isinstance(exc, DvembError):
        return str(exc)
    if isinstance(exc, SQLAlchemyError):
        logger.exception("database error in a job")
        return f"a database error stopped the job ({type(exc).__name__}; the worker's log has the details)"
    return f"{type(exc).__name__}: {exc}"


def _fence(job_id: int, mine: Any, lease: float) -> Any:
    """A write that opens each transaction storing this attempt's rows: it renews the lease and locks the job's
    row for the transaction (one writer of a job's rows at a time), or raises JobCancelled when this attempt no
    longer holds the job (cancelled, or taken over after its lease expired)."""

    def fence(session: Any) -> None:
        if not hold(session, Job, job_id, JobStatus.RUNNING, mine, lease):
            raise JobCancelled

    return fence


def _stored_fraction(job_id: int) -> Any:
    """Writes the share of the job's rows stored so far, in the writer's fenced transaction (which holds the job)."""

    def write(session: Any, fraction: float) -> None:
        session.execute(update(Job).where(Job.id == job_id).values(stored_fraction=fraction))

    return write


def _progress_writer(job_id: int, mine: Any) -> Any:
    last = [0.0]

    def report(p: ComputeProgress) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and p.steps_done < p.total_steps:
            return
        last[0] = now
        with session_factory()() as session:
            job = session.get(Job, job_id)
            progress = {"progress": p.fraction, "current_step": p.current_step, "eta_seconds": p.eta_s}
            if job is None or not transition(
                session, job, JobStatus.RUNNING, only_from=(JobStatus.RUNNING,), when=mine, **progress
            ):
                raise JobCancelled  # cancelled, or another attempt holds the job now
            session.commit()

    return report
