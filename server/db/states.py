"""The lifecycle of every resource with a status: the statuses, the moves allowed between them, and the
one function that makes a move.

::

    Run:    created ──▶ uploading ◀──▶ ready            (failed: reserved, never entered today)
    File:   uploading ──▶ received ──▶ validating ──▶ ready | rejected
                              ▲            │
                              └────────────┘  (waits for the manifest; a lost validator's lease expired)
            validating ──▶ validating (a redelivery takes over a lost validator's file)
    Job:    queued ──▶ running ──▶ succeeded | failed | cancelled;   queued ──▶ cancelled;
            failed | cancelled ──▶ queued (retry);   running ──▶ queued (a lost worker's redelivery)
    Query:  queued ──▶ succeeded | failed
    Segment: waiting ──▶ running ──▶ done;   running ──▶ running (a lost worker's segment taken over)
    Replay: queued ──▶ running ──▶ succeeded | failed;   running ──▶ queued (a lost worker's replay, resumed)

:func:`transition` is a compare-and-set: one ``UPDATE ... WHERE id = :id AND status IN (allowed sources)``,
so two writers racing (a cancel and the worker's claim, two validators) cannot overwrite each other, on
SQLite as on Postgres. Every route, service and task changes a status through it.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

# The statuses are part of the API's contract: they live with the formats, where the client reads them too.
from dvemb.formats.statuses import FileStatus, JobStatus, QueryStatus, ReplayStatus, RunStatus, SegmentStatus

__all__ = [
    "FileStatus",
    "JobStatus",
    "QueryStatus",
    "ReplayStatus",
    "RunStatus",
    "SegmentStatus",
    "can_move",
    "transition",
]


#: For each status, the statuses a resource may move to from it (a status may be "moved" to itself when the
#: move only updates other columns, e.g. a running job's progress).
ALLOWED: dict[type[StrEnum], dict[str, frozenset[str]]] = {
    RunStatus: {
        RunStatus.CREATED: frozenset({RunStatus.UPLOADING}),
        RunStatus.UPLOADING: frozenset({RunStatus.UPLOADING, RunStatus.READY, RunStatus.FAILED}),
        RunStatus.READY: frozenset({RunStatus.UPLOADING, RunStatus.READY}),
        RunStatus.FAILED: frozenset({RunStatus.UPLOADING}),
    },
    FileStatus: {
        FileStatus.UPLOADING: frozenset({FileStatus.RECEIVED}),
        FileStatus.RECEIVED: frozenset({FileStatus.RECEIVED, FileStatus.VALIDATING}),
        FileStatus.VALIDATING: frozenset(
            {FileStatus.VALIDATING, FileStatus.RECEIVED, FileStatus.READY, FileStatus.REJECTED}
        ),
        FileStatus.READY: frozenset(),
        FileStatus.REJECTED: frozenset(),
    },
    JobStatus: {
        JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
        JobStatus.RUNNING: frozenset(
            {JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
        ),
        JobStatus.SUCCEEDED: frozenset(),
        JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
        JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
    },
    QueryStatus: {
        QueryStatus.QUEUED: frozenset({QueryStatus.SUCCEEDED, QueryStatus.FAILED}),
        QueryStatus.SUCCEEDED: frozenset(),
        QueryStatus.FAILED: frozenset(),
    },
    ReplayStatus: {
        ReplayStatus.QUEUED: frozenset({ReplayStatus.RUNNING, ReplayStatus.FAILED}),
        ReplayStatus.RUNNING: frozenset(
            {ReplayStatus.RUNNING, ReplayStatus.SUCCEEDED, ReplayStatus.FAILED, ReplayStatus.QUEUED}
        ),
        ReplayStatus.SUCCEEDED: frozenset(),
        ReplayStatus.FAILED: frozenset(),
    },
    SegmentStatus: {
        SegmentStatus.WAITING: frozenset({SegmentStatus.RUNNING}),
        SegmentStatus.RUNNING: frozenset({SegmentStatus.RUNNING, SegmentStatus.DONE}),
        SegmentStatus.DONE: frozenset(),
    },
}


def can_move(source: str, target: StrEnum) -> bool:
    """True when a resource in status ``source`` may move to ``target``."""
    return target in ALLOWED[type(target)].get(source, frozenset())


def sources(target: StrEnum) -> list[str]:
    """Every status from which ``target`` can be reached, in declaration order."""
    return [str(source) for source, moves in ALLOWED[type(target)].items() if target in moves]


def transition(
    session: Session,
    row: Any,
    target: StrEnum,
    *,
    only_from: Collection[str] | None = None,
    when: Any = None,
    **values: Any,
) -> bool:
    """Move ``row`` (an ORM object with ``id`` and ``status``) to ``target`` and set ``values`` with it, if its
    status *in the database* allows the move; returns whether it moved. The row is refreshed either way, so
    the caller sees the status that won.

    Args:
        session: the session the row belongs to (the change is part of its transaction).
        row: a Run, LogFile, Job or AdhocQuery.
        target: the new status (its enum says which lifecycle applies).
        only_from: narrower sources than the lifecycle allows (a user's retry may not take a running job).
        when: an extra SQL condition on the row (a job's lease has expired).
        **values: other columns written in the same UPDATE (``error=...``, ``progress=...``).
    """
    model = type(row)
    allowed = [s for s in sources(target) if only_from is None or s in only_from]
    session.flush()  # the row's pending changes must not be lost by the refresh below
    conditions = [model.id == row.id, model.status.in_(allowed)] + ([when] if when is not None else [])
    statement = (
        update(model)
        .where(*conditions)
        .values(status=str(target), **values)
        .execution_options(synchronize_session=False)
    )
    moved = bool(session.execute(statement).rowcount == 1)  # type: ignore[attr-defined]
    try:
        session.refresh(row)
    except InvalidRequestError:  # the row was deleted meanwhile (its run deleted): nothing moved
        session.expunge(row)
        return False
    return moved
