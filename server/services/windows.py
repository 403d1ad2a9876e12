"""Top examples per window of training (docs/dashboard.md): the windows stored with a job (phases, tenths,
epochs), a step range asked for (found in the cache, or queued for a worker to rank exactly from the scores
file) and a page of a window's rows, each with a sentence saying how its rows were chosen."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import case, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dvemb.formats import phase_of
from server.db.models import Job
from server.db.states import QueryStatus
from server.db.window_models import ANY_EPOCH, TopKWindow, WindowTopKRow
from server.errors import BadRequest, Conflict, NotFound
from server.services.results import check_query, check_query_set, of_its_kind, summary_of
from server.tasks import WINDOW_TOPK, enqueue_after_commit

__all__ = ["ask_window", "chosen", "chosen_overall", "get_window", "list_windows", "public", "window_rows"]

KIND_ORDER = ("phase", "tenth", "epoch", "range")
MAX_CACHED_RANGES = 100  # asked-for windows kept per job; the oldest go first


def chosen_overall(kept: int, filters: Mapping[str, object], step_min: int | None, step_max: int | None) -> str:
    """How /top's rows were chosen: the run's overall top ``kept``, filtered by what was given."""
    given = [f"{name} {value}" for name, value in filters.items() if value is not None]
    if step_min is not None or step_max is not None:
        given.append(f"steps {step_min or 0}–{'end' if step_max is None else step_max}")
    if not given:
        return f"overall top {kept} of the whole run"
    return (
        f"overall top {kept} of the whole run, filtered to {', '.join(given)} "
        f"(only the kept {kept} are filtered: ask /windows for a window's own top)"
    )


def chosen(window: TopKWindow) -> str:
    """How the window's rows were chosen, e.g. "top 100 of steps 0–99 (early phase), exact"."""
    span = f"steps {window.step_min}–{window.step_max}"
    if window.kind == "phase":
        where = f"{span} ({window.name} phase)"
    elif window.kind == "tenth":
        where = f"{span} ({window.name} of training)"
    elif window.kind == "epoch":
        where = f"epoch {window.epoch} (every step)"
    else:
        where = span + ("" if window.epoch == ANY_EPOCH else f", epoch {window.epoch}")
    how = "exact, computed on demand from the scores file" if window.kind == "range" else "exact"
    return f"top {window.top_k} of {where}, {how}"


def public(window: TopKWindow) -> dict[str, Any]:
    return {
        "id": window.id,
        "query_set": window.query_set,
        "kind": window.kind,
        "name": window.name,
        "step_min": window.step_min,
        "step_max": window.step_max,
        "epoch": None if window.epoch == ANY_EPOCH else window.epoch,
        "top_k": window.top_k,
        "occurrences": window.occurrences,
        "status": window.status,
        "error": window.error,
        "chosen": chosen(window),
    }


def list_windows(session: Session, *, job: Job, query_set: str) -> list[TopKWindow]:
    """The job's windows of a query set: phases, tenths, epochs, then the asked-for ranges, each by first step."""
    check_query_set(job, query_set)
    order = case({kind: i for i, kind in enumerate(KIND_ORDER)}, value=TopKWindow.kind)
    return list(
        session.scalars(
            select(TopKWindow)
            .where(TopKWindow.job_id == job.id, TopKWindow.query_set == query_set)
            .order_by(order, TopKWindow.step_min, TopKWindow.epoch, TopKWindow.id)
        )
    )


def get_window(session: Session, *, job: Job, window_id: int) -> TopKWindow:
    window = session.get(TopKWindow, window_id)
    if window is None or window.job_id != job.id:
        raise NotFound(f"window {window_id} not found for job {job.id}")
    return window


def ask_window(
    session: Session, *, job: Job, query_set: str, step_min: int, step_max: int, epoch: int | None
) -> TopKWindow:
    """The window of these steps (and epoch): a stored or cached one when it exists, else a new one queued for a
    worker (sent on commit). A failed one is asked again."""
    check_query_set(job, query_set)
    steps = summary_of(job).steps
    if not 0 <= step_min <= step_max:
        raise BadRequest(f"steps {step_min}–{step_max}: give 0 <= step_min <= step_max")
    if step_max >= steps:
        raise BadRequest(f"step_max {step_max} is past the run's last step {steps - 1}; ask for steps 0–{steps - 1}")
    key = ANY_EPOCH if epoch is None else epoch
    same = (
        TopKWindow.job_id == job.id,
        TopKWindow.query_set == query_set,
        TopKWindow.step_min == step_min,
        TopKWindow.step_max == step_max,
        TopKWindow.epoch == key,
    )
    found = session.scalars(select(TopKWindow).where(*same).order_by(TopKWindow.id)).all()
    for window in found:
        if window.status != QueryStatus.FAILED:
            return window
    session.execute(delete(TopKWindow).where(*same, TopKWindow.status == QueryStatus.FAILED))
    _forget_oldest_ranges(session, job)
    name = f"steps {step_min}-{step_max}" + ("" if epoch is None else f", epoch {epoch}")
    window = TopKWindow(
        job_id=job.id,
        query_set=query_set,
        kind="range",
        name=name,
        step_min=step_min,
        step_max=step_max,
        epoch=key,
        top_k=summary_of(job).top_k,
        status=QueryStatus.QUEUED,
    )
    try:
        with session.begin_nested():
            session.add(window)
    except IntegrityError:  # asked for at the same moment by another request: that one is the window
        return session.scalars(select(TopKWindow).where(*same, TopKWindow.kind == "range")).one()
    enqueue_after_commit(session, WINDOW_TOPK, window.id)
    return window


def _forget_oldest_ranges(session: Session, job: Job) -> None:
    ranges = select(TopKWindow.id).where(TopKWindow.job_id == job.id, TopKWindow.kind == "range")
    count = session.scalar(select(func.count()).select_from(ranges.subquery())) or 0
    if count >= MAX_CACHED_RANGES:
        oldest = ranges.order_by(TopKWindow.id).limit(count - MAX_CACHED_RANGES + 1)
        session.execute(delete(TopKWindow).where(TopKWindow.id.in_(oldest.scalar_subquery())))


def window_rows(
    session: Session, *, job: Job, window: TopKWindow, query: int | None, kind: str, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """A page of the window's rows for a query (None: the set mean) and kind, best first, with each row's phase;
    only the rows of the kind's sign (:func:`server.services.results.of_its_kind`)."""
    if window.status == QueryStatus.QUEUED:
        raise Conflict(f"window {window.id} is still being computed; ask again in a moment")
    if window.status == QueryStatus.FAILED:
        raise Conflict(f"window {window.id} failed: {window.error}; ask for it again to retry")
    check_query(job, window.query_set, query)
    where = (
        WindowTopKRow.window_id == window.id,
        WindowTopKRow.query == (-1 if query is None else query),
        WindowTopKRow.kind == kind,
        of_its_kind(WindowTopKRow.score, kind),  # helpful rows positive, harmful rows negative
    )
    count = session.scalar(select(func.count()).select_from(WindowTopKRow).where(*where)) or 0
    rows = session.scalars(select(WindowTopKRow).where(*where).order_by(WindowTopKRow.rank).offset(offset).limit(limit))
    bounds = summary_of(job).query_set(window.query_set).boundaries
    return [
        {
            "rank": r.rank,
            "score": r.score,
            "step": r.step,
            "epoch": r.epoch,
            "phase": phase_of(r.step, bounds),
            "example_id": r.example_id,
            "label": r.label,
            "source": r.source,
        }
        for r in rows
    ], count
