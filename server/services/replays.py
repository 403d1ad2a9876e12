"""Exact replays computed by the workers (issue 22): a job's run replayed from its replay bundle on one query set,
its agreement with the job's scores stored when it succeeds (worker/replays.py; docs/replay.md, "In the service")."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dvemb.formats import REPLAY_BUNDLE
from server.db.leases import task_deadline
from server.db.models import Job, LogFile, ReplayJob
from server.db.states import FileStatus, ReplayStatus
from server.errors import Conflict, NotFound
from server.services import results
from server.tasks import REPLAY, enqueue_after_commit

__all__ = ["get_replay", "list_replays", "start_replay"]


def start_replay(session: Session, *, job: Job, query_set: str, options: dict[str, Any]) -> ReplayJob:
    """Queue a replay of ``job``'s run on ``query_set``: 404 for a set the job has no scores of, 409 without a
    validated replay bundle or while a replay of the same set is queued or running."""
    results.check_query_set(job, query_set)
    bundle = session.scalar(select(LogFile.status).where(LogFile.run_id == job.run_id, LogFile.name == REPLAY_BUNDLE))
    if bundle != FileStatus.READY:
        state = "is still being uploaded or validated" if bundle is not None else "was not uploaded"
        raise Conflict(
            f"this run's {REPLAY_BUNDLE} {state}: write it next to the log (dvemb.replay.write_bundle, or "
            "bundle_trainer for a Trainer run) and upload it with the log (dvemb upload), then ask again"
        )
    busy = session.scalar(
        select(ReplayJob.id).where(
            ReplayJob.job_id == job.id,
            ReplayJob.query_set == query_set,
            ReplayJob.status.in_((ReplayStatus.QUEUED, ReplayStatus.RUNNING)),
        )
    )
    if busy is not None:
        raise Conflict(f"replay {busy} of query set {query_set!r} is already queued or running for this job")
    replay = ReplayJob(
        job_id=job.id,
        query_set=query_set,
        status=ReplayStatus.QUEUED,
        options=options,
        progress=0.0,
        attempts=0,
        lease_expires_at=task_deadline(),
    )
    session.add(replay)
    session.flush()
    enqueue_after_commit(session, REPLAY, replay.id)
    return replay


def list_replays(session: Session, *, job: Job) -> list[ReplayJob]:
    return list(session.scalars(select(ReplayJob).where(ReplayJob.job_id == job.id).order_by(ReplayJob.id)))


def get_replay(session: Session, *, job: Job, replay_id: int) -> ReplayJob:
    replay = session.get(ReplayJob, replay_id)
    if replay is None or replay.job_id != job.id:
        raise NotFound(f"replay {replay_id} of job {job.id} not found")
    return replay
