"""Figures of the dashboard (Plotly JSON), built by the pure functions of server/figures.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from server import figures
from server.api.deps import DoneJobDep, IntQuery, JobDep, SessionDep, StorageDep
from server.errors import BadRequest
from server.services import figures as data
from server.services import results

router = APIRouter(tags=["figures"])

#: How many evenly spaced occurrences the box plot of scores by phase draws (and its export holds).
SampleQuery = Annotated[int, Query(ge=10, le=200_000, description="evenly spaced occurrences to sample")]


@router.get("/jobs/{job_id}/figures/phase")
def phase_figure(
    job: DoneJobDep,
    session: SessionDep,
    storage: StorageDep,
    query_set: str,
    query: IntQuery = None,
    view: Literal["per_lr", "raw"] = "per_lr",
    smooth: Annotated[int, Query(ge=1, le=1001)] = 1,
    points: Annotated[int, Query(ge=2, le=20000)] = 1000,
) -> dict[str, Any]:
    results.check_query_set(job, query_set)
    if query is None:
        curve = data.set_curve(session, job=job, query_set=query_set, points=points)
    else:
        curve = data.query_curve(job=job, query_set=query_set, query=query, points=points, storage=storage)
    phases = results.phases(session, job=job, query_set=query_set)
    ids = results.summary_of(job).query_set(query_set).query_ids
    name = ids[query] if query is not None and query < len(ids) else query  # the query's id, not its index
    title = query_set + ("" if query is None else f", query {name}")
    return figures.phase_figure(curve, phases, view=view, smooth=smooth, title=title)


@router.get("/jobs/{job_id}/figures/distribution")
def distribution_figure(
    job: DoneJobDep,
    session: SessionDep,
    storage: StorageDep,
    query_set: str,
    sample: SampleQuery = 20_000,
) -> dict[str, Any]:
    """The box plot of the scores by phase, with how many occurrences it draws (``drawn``: every one, or an evenly
    spaced sample of ``sample``), of how many (``occurrences``), and how many lie beyond its y axis (``beyond``)."""
    by_phase = data.scores_by_phase(job=job, query_set=query_set, sample=sample, storage=storage)
    figure = figures.distribution_figure(by_phase, title=f"scores by phase, {query_set}")
    summary = job.results
    return {**figure, "occurrences": summary.occurrences if summary is not None else figure["drawn"]}


@router.get("/jobs/{job_id}/dynamics")
def value_dynamics(job: DoneJobDep) -> dict[str, Any]:
    """Value dynamics of the job's checkpoint query sets (empty when the log recorded none), by series."""
    return {"series": data.dynamics(job)}


@router.get("/jobs/{job_id}/figures/dynamics")
def dynamics_figure(job: DoneJobDep, series: str) -> dict[str, Any]:
    """The value-dynamics plot of one series (``GET /jobs/{id}/dynamics`` lists them)."""
    return figures.dynamics_figure(data.dynamics_series(job, series), title=f"value dynamics, {series}")


@router.get("/jobs/{job_id}/metadata")
def examples_metadata(
    job: JobDep,
    storage: StorageDep,
    ids: Annotated[str | None, Query(description="comma-separated ids (ids without a comma)")] = None,
    id: Annotated[list[str] | None, Query(description="one id per parameter, any characters: id=a&id=b")] = None,
) -> dict[str, Any]:
    """What the listed examples are (at most 200): ``id=`` once per example takes any id, ``ids=a,b`` ids without
    a comma."""
    if ids is None and id is None:
        raise BadRequest("name the examples: id=<id> once per example (any id), or ids=<id>,<id> (ids without a comma)")
    wanted = {i for i in (ids or "").split(",") if i} | set(id or [])
    if len(wanted) > 200:
        raise BadRequest("ask for at most 200 examples at a time")
    return data.examples_metadata(job=job, example_ids=wanted, storage=storage)
