"""Analyses (jobs): start, cancel, retry. The worker writes progress and results."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.leases import task_deadline
from server.db.models import Job, Project, Run
from server.db.run_files import missing_files
from server.db.states import JobStatus, RunStatus, transition
from server.errors import Conflict, NotFound
from server.services.runs import get_run
from server.tasks import COMPUTE, enqueue_after_commit


def get_job(session: Session, *, project: Project, job_id: int) -> Job:
    # One query: the job, if its run belongs to the project.
    job = session.scalar(
        select(Job).join(Run, Run.id == Job.run_id).where(Job.id == job_id, Run.project_id == project.id)
    )
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def start_job(session: Session, *, project: Project, run_id: int, options: dict[str, Any]) -> Job:
    run = get_run(session, project=project, run_id=run_id)
    missing = missing_files(session, run=run)
    if run.status != RunStatus.READY or missing:
        raise Conflict(f"run {run.name!r} is not ready to analyse: missing or unvalidated files {missing[:5]}")
    ranks = run.rank_manifests
    available = {q.name for q in ranks[0].query_sets} if ranks else set()
    unknown = sorted(set(options.get("query_sets") or []) - available)
    if unknown:
        raise Conflict(f"query set(s) {unknown} are not in this run's log, which has {sorted(available)}")
    if not available:
        raise Conflict("the run's log has no query set; record one with rec.record_queries(...)")
    job = Job(run_id=run.id, options=options, lease_expires_at=task_deadline())  # claimed by then, or sent again
    session.add(job)
    session.flush()
    enqueue_after_commit(session, COMPUTE, job.id)
    return job


def list_jobs(session: Session, *, project: Project, run_id: int) -> list[Job]:
    run = get_run(session, project=project, run_id=run_id)
    return list(session.scalars(select(Job).where(Job.run_id == run.id).order_by(Job.id.desc())).all())


def cancel_job(session: Session, *, job: Job) -> Job:
    """Cancel a queued or running job (the worker stops at its next progress report)."""
    if not transition(session, job, JobStatus.CANCELLED):
        raise Conflict(f"job {job.id} is {job.status}; only queued or running jobs can be cancelled")
    return job


def retry_job(session: Session, *, job: Job) -> Job:
    """Queue a failed or cancelled job again."""
    retryable = (JobStatus.FAILED, JobStatus.CANCELLED)
    again = {
        "error": None,
        "progress": 0.0,
        "current_step": None,  # the last attempt's step and estimate are not this one's ("reading the log")
        "eta_seconds": None,
        "stored_fraction": None,
        "attempts": 0,
        "lease_expires_at": task_deadline(),
    }
    if not transition(session, job, JobStatus.QUEUED, only_from=retryable, **again):
        raise Conflict(f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried")
    enqueue_after_commit(session, COMPUTE, job.id)
    return job
