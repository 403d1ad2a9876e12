"""Tasks: thin wrappers, ids in, a run_* function does the work."""

from __future__ import annotations

from celery import Task
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from server.db.leases import LeaseHeld
from server.tasks import ADHOC_QUERY, COMPUTE, COMPUTE_SEGMENT, REPLAY, VALIDATE_FILE, WINDOW_TOPK
from worker.adhoc import run_adhoc_query
from worker.celery_app import app
from worker.computation import run_compute, run_compute_segment
from worker.replays import run_replay
from worker.validation import run_validate_file
from worker.windows import run_window_topk

RELIABLE = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "max_retries": 5,
}


def _retries_left(task: Task) -> int:
    return int(task.max_retries or 0) - int(task.request.retries)


# Any database error retries a validation (the validator gives the claim back first): rejecting the file would
# blame it and delete its bytes. A job fails instead, with the error in words (worker/computation.py).
@app.task(name=VALIDATE_FILE, bind=True, **{**RELIABLE, "autoretry_for": (SQLAlchemyError,)})
def validate_file(self: Task, file_id: int) -> None:
    try:
        run_validate_file(file_id, transient_retries_left=_retries_left(self))
    except LeaseHeld as held:
        validate_file.apply_async((file_id,), countdown=held.seconds)  # as compute_job below


@app.task(name=COMPUTE, bind=True, **RELIABLE)
def compute_job(self: Task, job_id: int) -> None:
    try:
        run_compute(job_id, transient_retries_left=_retries_left(self))
    except LeaseHeld as held:
        # A redelivery of a job another worker computes: look again when its lease would end, with a fresh
        # message (a retry would count against max_retries and end, leaving nothing to take over a dead worker).
        compute_job.apply_async((job_id,), countdown=held.seconds)


@app.task(name=COMPUTE_SEGMENT, **RELIABLE)
def compute_segment(job_id: int, index: int) -> None:
    run_compute_segment(job_id, index)


@app.task(name=ADHOC_QUERY, **RELIABLE)
def adhoc_query(query_id: int) -> None:
    run_adhoc_query(query_id)


@app.task(name=REPLAY, bind=True, **RELIABLE)
def replay_job(self: Task, replay_id: int) -> None:
    try:
        run_replay(replay_id, transient_retries_left=_retries_left(self))
    except LeaseHeld as held:  # as compute_job
        replay_job.apply_async((replay_id,), countdown=held.seconds)


@app.task(name=WINDOW_TOPK, **RELIABLE)
def window_topk(window_id: int) -> None:
    run_window_topk(window_id)
