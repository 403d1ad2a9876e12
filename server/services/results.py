"""Results served from the database (top-k, curves, phases, totals) and, for one example's
history, from the results files in storage (numpy and safetensors only: no torch here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from sqlalchemy import Float, cast, func, select
from sqlalchemy.orm import Session

from dvemb import formats
from dvemb.formats import Summary
from server.db.models import CurvePoint, ExampleTotal, Job, PhaseSummaryRow, TopKRow
from server.db.states import JobStatus
from server.errors import BadRequest, Conflict, NotFound
from server.storage import results_dir


def summary_of(job: Job) -> Summary:
    """The job's typed results summary (409 while it has none)."""
    results = job.results
    if results is None:
        raise Conflict(f"job {job.id} has no results yet")
    return results


def require_done(job: Job) -> None:
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"job {job.id} is {job.status}; results exist once it has succeeded")


def query_sets(job: Job) -> list[str]:
    results = job.results
    return sorted(results.query_sets) if results is not None else []


def check_query_set(job: Job, name: str) -> None:
    if name not in query_sets(job):
        raise NotFound(f"no results for query set {name!r}; this job has {query_sets(job)}")


def check_query(job: Job, query_set: str, query: int | None) -> None:
    """A 400 when ``query`` (None: the set's mean) is past the query set's last query."""
    queries = summary_of(job).query_set(query_set).num_queries
    if query is not None and query >= queries:
        raise BadRequest(f"query {query} is out of range: the query set has queries 0–{queries - 1}")


def top_rows(
    session: Session,
    *,
    job: Job,
    query_set: str,
    query: int | None,
    kind: str,
    offset: int,
    limit: int,
    step_min: int | None,
    step_max: int | None,
    phase: str | None,
    epoch: int | None,
    label: str | None = None,
    source: str | None = None,
) -> tuple[list[TopKRow], int]:
    check_query_set(job, query_set)
    q = select(TopKRow).where(
        TopKRow.job_id == job.id,
        TopKRow.query_set == query_set,
        TopKRow.query == (-1 if query is None else query),
        TopKRow.kind == kind,
    )
    for column, value in (
        (TopKRow.phase, phase),
        (TopKRow.epoch, epoch),
        (TopKRow.label, label),
        (TopKRow.source, source),
    ):
        if value is not None:
            q = q.where(column == value)
    if step_min is not None:
        q = q.where(TopKRow.step >= step_min)
    if step_max is not None:
        q = q.where(TopKRow.step <= step_max)
    count = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(TopKRow.rank).offset(offset).limit(limit)).all()
    return list(rows), count


def ranked_examples(
    session: Session,
    *,
    job: Job,
    query_set: str,
    kind: str,
    label: str | None,
    source: str | None,
    offset: int,
    limit: int,
) -> tuple[list[ExampleTotal], int]:
    """Every example ranked by its total influence on the query set (summed over its occurrences)."""
    check_query_set(job, query_set)
    q = select(ExampleTotal).where(ExampleTotal.job_id == job.id, ExampleTotal.query_set == query_set)
    if label is not None:
        q = q.where(ExampleTotal.label == label)
    if source is not None:
        q = q.where(ExampleTotal.source == source)
    count = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    order = ExampleTotal.total.desc() if kind == "helpful" else ExampleTotal.total.asc()
    rows = session.scalars(q.order_by(order, ExampleTotal.example_id).offset(offset).limit(limit)).all()
    return list(rows), count


def curve_bucket(steps: Any, points: Any, *, binned: bool) -> Any:
    """The bin of each curve point, ``step * points // steps`` (ints or bound parameters), or the step itself
    when the curve is not binned. Floor division: SQLAlchemy 2's '/' is true division, which would put every
    step in its own bin."""
    return (CurvePoint.step * points) // steps if binned else CurvePoint.step


def curve(session: Session, *, job: Job, query_set: str, points: int) -> dict[str, list[float | None]]:
    """The per-step curve averaged into at most ``points`` bins of consecutive steps (in SQL)."""
    check_query_set(job, query_set)
    steps = (job.results.steps if job.results is not None else 0) or 1
    bucket = curve_bucket(steps, points, binned=steps > points)
    q = (
        select(
            func.min(CurvePoint.step),
            func.avg(cast(CurvePoint.mean, Float)),
            func.avg(CurvePoint.mean_per_lr),
            func.avg(CurvePoint.lr),
            func.avg(CurvePoint.loss),
            func.sum(CurvePoint.abs_sum),
        )
        .where(CurvePoint.job_id == job.id, CurvePoint.query_set == query_set)
        .group_by(bucket)
        .order_by(func.min(CurvePoint.step))
    )
    rows = session.execute(q).all()
    names = ["step", "mean", "mean_per_lr", "lr", "loss", "abs_sum"]
    return {name: [r[i] for r in rows] for i, name in enumerate(names)}


def phases(session: Session, *, job: Job, query_set: str) -> dict[str, Any]:
    check_query_set(job, query_set)
    row = session.scalar(
        select(PhaseSummaryRow).where(PhaseSummaryRow.job_id == job.id, PhaseSummaryRow.query_set == query_set)
    )
    if row is None:
        raise NotFound(f"no phase summary for {query_set!r}")
    return row.summary


def example_history(session: Session, *, job: Job, query_set: str, example_id: str, storage: Path) -> dict[str, Any]:
    check_query_set(job, query_set)
    total = session.scalar(
        select(ExampleTotal).where(
            ExampleTotal.job_id == job.id, ExampleTotal.query_set == query_set, ExampleTotal.example_id == example_id
        )
    )
    if total is None:
        raise NotFound(f"example {example_id!r} does not occur in this run")
    directory = results_dir(storage, job.run_id, job.id)
    occurrences = load_file(str(directory / formats.OCCURRENCES))
    index = int(np.flatnonzero(_example_ids(directory) == example_id)[0])
    rows = np.flatnonzero(occurrences["example_index"] == index)
    scores = np.load(directory / formats.scores_file(query_set), mmap_mode="r")
    bounds = summary_of(job).query_set(query_set).boundaries
    history = [
        {
            "step": int(occurrences["row_step"][r]),
            "epoch": int(occurrences["epoch"][r]),
            "phase": formats.phase_of(int(occurrences["row_step"][r]), bounds),
            "score": float(scores[r].mean()),
            "per_query": [float(v) for v in scores[r]],
        }
        for r in rows
    ]
    return {
        "example_id": example_id,
        "total": total.total,
        "occurrences": total.occurrences,
        "history": history,
        "label": total.label,
        "source": total.source,
    }


def _example_ids(directory: Path) -> np.ndarray:
    """Every example id of the results, as strings (the API's ids), in index order."""
    return np.array([str(i) for i in formats.decode_ids(load_file(str(directory / formats.EXAMPLES)))])
