"""The statuses of the service's resources: the values the API's answers carry (typed in its OpenAPI schema), that
the client waits on and the database stores. Their moves are server/db/states.py's."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "JOB_FINISHED",
    "REPLAY_FINISHED",
    "FileStatus",
    "JobStatus",
    "QueryStatus",
    "ReplayStatus",
    "RunStatus",
    "SegmentStatus",
]


class RunStatus(StrEnum):
    CREATED = "created"
    UPLOADING = "uploading"
    READY = "ready"
    FAILED = "failed"


class FileStatus(StrEnum):
    UPLOADING = "uploading"
    RECEIVED = "received"
    VALIDATING = "validating"
    READY = "ready"
    REJECTED = "rejected"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class QueryStatus(StrEnum):
    QUEUED = "queued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ReplayStatus(StrEnum):
    """An exact replay of a job's run on one query set (worker/replays.py)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class SegmentStatus(StrEnum):
    """One segment of a segmented job (worker/segments.py)."""

    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


#: A job in one of these statuses does not move on by itself.
JOB_FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: A replay in one of these statuses is over.
REPLAY_FINISHED = frozenset({ReplayStatus.SUCCEEDED, ReplayStatus.FAILED})
