"""Results served from the database (curves, phases, an example's total; the top-k rows and the ranked examples
are read by server/services/reads.py) and, for one example's history, from the results files in storage (numpy
and safetensors only: no torch here)."""

from __future__ import annotations

from typing import Any

import numpy as np
from safetensors.numpy import load_file
from sqlalchemy import Float, cast, func, select
from sqlalchemy.orm import Session

from dvemb import formats
from dvemb.formats import Summary
from server.db.models import CurvePoint, ExampleTotal, Job, PhaseSummaryRow
from server.db.states import JobStatus
from server.errors import BadRequest, Conflict, NotFound
from server.storage import Storage, results_key


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
    check_query_set_among(name, query_sets(job))


def check_query_set_among(name: str, known: list[str]) -> None:
    """A 404 naming the job's query sets ``known`` when ``name`` is not one of them."""
    if name not in known:
        raise NotFound(f"no results for query set {name!r}; this job has {known}")


def check_query(job: Job, query_set: str, query: int | None) -> None:
    """A 400 when ``query`` (None: the set's mean) is not one of the query set's queries."""
    queries = summary_of(job).query_set(query_set).num_queries
    if query is not None and not 0 <= query < queries:
        raise BadRequest(f"query {query} is out of range: the query set has queries 0–{queries - 1}")


def of_its_kind(score: Any, kind: str) -> Any:
    """The rule of every list of helpful or harmful occurrences (``/top``, a window's ``/top`` and their exports):
    a helpful row has a positive score and a harmful row a negative one. The engine keeps the ``top_k`` largest and
    smallest scores, whatever their sign: when a window holds fewer than ``top_k`` occurrences of a sign, the
    others (a positive score among the "harmful") are left out here, so no occurrence is in both lists and an empty
    list means that none helped (or hurt). ``score`` is a SQL column."""
    return score > 0 if kind == "helpful" else score < 0


def curve_bucket(steps: Any, points: Any, *, binned: bool) -> Any:
    """The bin of each curve point, ``step * points // steps`` (ints or SQL expressions), or the step itself
    when the curve is not binned. Floor division: SQLAlchemy 2's '/' is true division, which would put every
    step in its own bin."""
    return (CurvePoint.step * points) // steps if binned else CurvePoint.step


#: The columns of a curve, one value per bin of consecutive steps (those of :func:`curve_columns`).
CURVE = ("step", "mean", "mean_per_lr", "lr", "loss", "abs_sum")


def curve_columns() -> tuple[Any, ...]:
    """The aggregates of a bin of curve points, in the order of :data:`CURVE`: its first step, the means of
    the step values and the sum of |influence|."""
    return (
        func.min(CurvePoint.step).label("first"),
        func.avg(cast(CurvePoint.mean, Float)),
        func.avg(CurvePoint.mean_per_lr),
        func.avg(CurvePoint.lr),
        func.avg(CurvePoint.loss),
        func.sum(CurvePoint.abs_sum),
    )


def curve(session: Session, *, job: Job, query_set: str, points: int) -> dict[str, list[float | None]]:
    """The per-step curve averaged into at most ``points`` bins of consecutive steps (in SQL)."""
    check_query_set(job, query_set)
    steps = (job.results.steps if job.results is not None else 0) or 1
    bucket = curve_bucket(steps, points, binned=steps > points)
    q = (
        select(*curve_columns())
        .where(CurvePoint.job_id == job.id, CurvePoint.query_set == query_set)
        .group_by(bucket)
        .order_by(func.min(CurvePoint.step))
    )
    rows = session.execute(q).all()
    return {name: [r[i] for r in rows] for i, name in enumerate(CURVE)}


def phases(session: Session, *, job: Job, query_set: str) -> dict[str, Any]:
    check_query_set(job, query_set)
    row = session.scalar(
        select(PhaseSummaryRow).where(PhaseSummaryRow.job_id == job.id, PhaseSummaryRow.query_set == query_set)
    )
    if row is None:
        raise NotFound(f"no phase summary for {query_set!r}")
    return row.summary


def example_history(session: Session, *, job: Job, query_set: str, example_id: str, storage: Storage) -> dict[str, Any]:
    check_query_set(job, query_set)
    total = session.scalar(
        select(ExampleTotal).where(
            ExampleTotal.job_id == job.id, ExampleTotal.query_set == query_set, ExampleTotal.example_id == example_id
        )
    )
    if total is None:
        raise NotFound(f"example {example_id!r} does not occur in this run")
    occurrences = load_file(str(storage.local_file(results_key(job.run_id, job.id, formats.OCCURRENCES))))
    index = int(np.flatnonzero(_example_ids(storage, job) == example_id)[0])
    rows = np.flatnonzero(occurrences["example_index"] == index)
    scores = np.load(storage.local_file(results_key(job.run_id, job.id, formats.scores_file(query_set))), mmap_mode="r")
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


def _example_ids(storage: Storage, job: Job) -> np.ndarray:
    """Every example id of the job's results, as strings (the API's ids), in index order."""
    path = storage.local_file(results_key(job.run_id, job.id, formats.EXAMPLES))
    return np.array([str(i) for i in formats.decode_ids(load_file(str(path)))])
