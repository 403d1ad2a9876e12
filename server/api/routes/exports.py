"""Downloads (CSV or Parquet) of every table and curve the dashboard shows, at full resolution and with the
page's filters applied: the same rows as the JSON endpoints, every page of them (docs/compare-and-export.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.orm import Session

from server.api.cancellable import ClientGone, run_cancellable
from server.api.deps import (
    DB_INT_MAX,
    DoneJobDep,
    IdPath,
    IntQuery,
    ProjectDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    bearer,
    done_job,
    project_job,
)
from server.api.routes.compare import DifferQuery, JobsQuery, TopQuery, job_ids, time_limited
from server.api.routes.figures import SampleQuery
from server.api.routes.jobs import ExampleFiltersQuery, ExampleIdQuery, TopFiltersQuery
from server.api.routes.windows import SelectionQuery
from server.api.schemas import ExampleRank, TopRow
from server.db.models import Project
from server.figures import moving_average
from server.services import compare as comparing
from server.services import figures as data
from server.services import reads, results, selection, windows
from server.services.auth import project_for_token
from server.services.tables import ExportFormat, download

router = APIRouter(tags=["exports"])

FormatQuery = Annotated[ExportFormat, Query(description="csv or parquet")]
ALL_ROWS = DB_INT_MAX  # an export has every row the filters keep, not one page
TOP_COLUMNS = list(TopRow.model_fields)
EXAMPLE_COLUMNS = ["rank", *ExampleRank.model_fields]
CURVE_COLUMNS = ["step", "mean", "mean_per_lr", "lr", "loss"]
PHASE_COLUMNS = ["phase", "first_step", "last_step", "share_abs_per_lr", "share_abs"]


@router.get("/jobs/{job_id}/export/top")
def export_top(
    job_id: IdPath,
    session: SessionDep,
    shown: TopFiltersQuery,
    format: FormatQuery = "csv",
    window_id: Annotated[int | None, Query(ge=1, le=DB_INT_MAX, description="a window's own top rows")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """The "Top training examples" table: every row of /top (or of /windows/{window_id}/top) for these filters.
    The caller is authenticated once: by the window's lookup, or by the one statement that reads /top's rows."""
    token = bearer(authorization)
    if window_id is not None:
        job = done_job(project_job(job_id, session, project_for_token(session, token=token)))
        window = windows.get_window(session, job=job, window_id=window_id)
        rows, _ = windows.window_rows(
            session, job=job, window=window, query=shown.query, kind=shown.kind, offset=0, limit=ALL_ROWS
        )
    else:
        _, rows, _ = reads.top_rows(token, job_id, offset=0, limit=ALL_ROWS, **shown.model_dump())
    return download(TOP_COLUMNS, rows, fmt=format, name=f"job{job_id}-{shown.query_set}-top-{shown.kind}")


@router.get("/jobs/{job_id}/export/examples")
def export_examples(
    job_id: IdPath,
    shown: ExampleFiltersQuery,
    format: FormatQuery = "csv",
    limit: Annotated[int, Query(ge=1, le=DB_INT_MAX, description="the first rows only")] = ALL_ROWS,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """Examples by total influence, ranked as /examples ranks them (rank 0 first), every example by default. The
    read authenticates the caller and checks the job itself (one statement, as /examples): no second lookup."""
    found, _ = reads.ranked_examples(bearer(authorization), job_id, offset=0, limit=limit, **shown.model_dump())
    rows = [{"rank": i, **r} for i, r in enumerate(found)]
    return download(EXAMPLE_COLUMNS, rows, fmt=format, name=f"job{job_id}-{shown.query_set}-examples-{shown.kind}")


@router.get("/jobs/{job_id}/export/curve")
def export_curve(
    job: DoneJobDep,
    session: SessionDep,
    storage: StorageDep,
    query_set: str,
    format: FormatQuery = "csv",
    query: IntQuery = None,
    view: Literal["per_lr", "raw"] = "per_lr",
    smooth: Annotated[int, Query(ge=1, le=1001)] = 1,
) -> Response:
    """The phase plot's curve, one row per step (never downsampled); with smooth > 1 a column ``smoothed`` holds
    the plotted moving average of the view's values."""
    results.check_query_set(job, query_set)
    steps = max(results.summary_of(job).steps, 2)
    if query is None:
        curve = data.set_curve(session, job=job, query_set=query_set, points=steps)
    else:
        curve = data.query_curve(job=job, query_set=query_set, query=query, points=steps, storage=storage)
    columns = list(CURVE_COLUMNS)
    if smooth > 1:
        curve["smoothed"] = moving_average(list(curve["mean_per_lr" if view == "per_lr" else "mean"]), smooth)
        columns.append("smoothed")
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*(curve[c] for c in columns), strict=True)]
    name = f"job{job.id}-{query_set}-curve" + ("" if query is None else f"-query{query}")
    return download(columns, rows, fmt=format, name=name)


def phase_rows(phases: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per phase: its steps and its shares of |influence / lr| and of |influence|."""
    return [
        {
            "phase": name,
            "first_step": first,
            "last_step": last,
            "share_abs_per_lr": phases.get("share_abs_per_lr", {}).get(name),
            "share_abs": phases.get("share_abs", {}).get(name),
        }
        for name, (first, last) in phases.get("ranges", {}).items()
    ]


@router.get("/jobs/{job_id}/export/phases")
def export_phases(job: DoneJobDep, session: SessionDep, query_set: str, format: FormatQuery = "csv") -> Response:
    """The phases of the job's curve: steps and shares."""
    rows = phase_rows(results.phases(session, job=job, query_set=query_set))
    return download(PHASE_COLUMNS, rows, fmt=format, name=f"job{job.id}-{query_set}-phases")


@router.get("/jobs/{job_id}/export/selection")
def export_selection(
    job: DoneJobDep, session: SessionDep, query_set: str, options: SelectionQuery, format: FormatQuery = "csv"
) -> Response:
    """The "When to select data" table (as /selection answers it): one row per selection and window of steps."""
    found = selection.job_selection(session, job=job, query_set=query_set, **options.model_dump())
    rows = [
        {
            "selection": name,
            "first_step": window["first"],
            "last_step": window["last"],
            "share_of_steps": found[key]["share_of_steps"],
            "share_of_influence": found[key]["share_of_influence"],
        }
        for name, key in (("fewest steps", "fewest_steps"), ("early + late", "early_late"), ("early", "early_only"))
        for window in found[key]["windows"]
    ]
    columns = ["selection", "first_step", "last_step", "share_of_steps", "share_of_influence"]
    return download(columns, rows, fmt=format, name=f"job{job.id}-{query_set}-selection")


@router.get("/jobs/{job_id}/export/distribution")
def export_distribution(
    job: DoneJobDep, storage: StorageDep, query_set: str, sample: SampleQuery = 20_000, format: FormatQuery = "csv"
) -> Response:
    """The "Scores by phase" box plot's points: the sampled occurrences (row, step, phase, query-set mean score)."""
    rows = data.sampled_scores(job=job, query_set=query_set, sample=sample, storage=storage)
    return download(["row", "step", "phase", "score"], rows, fmt=format, name=f"job{job.id}-{query_set}-distribution")


@router.get("/jobs/{job_id}/export/dynamics")
def export_dynamics(job: DoneJobDep, series: str, format: FormatQuery = "csv") -> Response:
    """The value-dynamics plot: one row per checkpoint and tenth of training (its steps, the mean influence on
    the checkpoint of what was trained in it, and how many occurrences that mean is over; no mean before the
    tenth was trained)."""
    dynamics = data.dynamics_series(job, series)
    rows = [
        {"checkpoint": checkpoint, "first_step": first, "last_step": last, "mean": mean, "count": count}
        for checkpoint, means, row_counts in zip(
            dynamics["checkpoints"], dynamics["mean"], dynamics["count"], strict=True
        )
        for (first, last), mean, count in zip(dynamics["buckets"], means, row_counts, strict=True)
    ]
    columns = ["checkpoint", "first_step", "last_step", "mean", "count"]
    return download(columns, rows, fmt=format, name=f"job{job.id}-{series}-dynamics")


@router.get("/jobs/{job_id}/export/example")
def export_example_by_id(
    job: DoneJobDep,
    example_id: ExampleIdQuery,
    session: SessionDep,
    storage: StorageDep,
    query_set: str,
    format: FormatQuery = "csv",
    query: IntQuery = None,
) -> Response:
    """An example's table, the id a query parameter (any id, a '/' in it included)."""
    return export_example(job, example_id, session, storage, query_set, format, query)


@router.get("/jobs/{job_id}/export/example/{example_id:path}")
def export_example(
    job: DoneJobDep,
    example_id: str,
    session: SessionDep,
    storage: StorageDep,
    query_set: str,
    format: FormatQuery = "csv",
    query: IntQuery = None,
) -> Response:
    """An example's page's table: its influence at each occurrence, on the query set (mean) or on one query."""
    history = results.example_history(session, job=job, query_set=query_set, example_id=example_id, storage=storage)[
        "history"
    ]
    results.check_query(job, query_set, query)
    rows = [
        {
            "step": h["step"],
            "epoch": h["epoch"],
            "phase": h["phase"],
            "influence": h["score"] if query is None else h["per_query"][query],
        }
        for h in history
    ]
    name = f"job{job.id}-{query_set}-example-{example_id}" + ("" if query is None else f"-query{query}")
    return download(["step", "epoch", "phase", "influence"], rows, fmt=format, name=name)


@router.get("/compare/export/{table}")
async def export_comparison(
    request: Request,
    table: Literal["curves", "phases", "overlap", "differences"],
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectDep,
    jobs: JobsQuery,
    query_set: str,
    format: FormatQuery = "csv",
    top: TopQuery = 100,
    differ: DifferQuery = 20,
) -> Response:
    """A table of the comparison page: the runs' curves (every step, with the share of training done), their
    phases, the pairs' overlap and rank correlations, or the most differing examples."""
    ids = job_ids(jobs)

    def work() -> Response:
        with time_limited(session, settings):
            return _comparison_table(table, session, project, ids, query_set, format, top, differ)

    try:  # cancelled when its client leaves, as the comparison itself
        return await run_cancellable(request, session, work)
    except ClientGone:
        return Response(status_code=499)


def _comparison_table(
    table: str,
    session: Session,
    project: Project,
    ids: list[int],
    query_set: str,
    format: ExportFormat,
    top: int,
    differ: int,
) -> Response:
    """The comparison's table ``table`` as a file (its statements under the comparison's time limit)."""
    name = f"compare-{'-'.join(map(str, ids))}-{query_set}-{table}"
    if table in ("curves", "phases"):
        found = comparing.compared_jobs(session, project=project, job_ids=ids, query_set=query_set)
        if table == "curves":
            return download(*_curve_table(session, found, query_set), fmt=format, name=name)
        rows = [
            {"job_id": job.id, "label": comparing.label_of(session, job), **row}
            for job in found
            for row in phase_rows(results.phases(session, job=job, query_set=query_set))
        ]
        return download(["job_id", "label", *PHASE_COLUMNS], rows, fmt=format, name=name)
    pairs = comparing.compare(
        session, project=project, job_ids=ids, query_set=query_set, points=2, top=top, differ=differ
    )["pairs"]
    if table == "overlap":
        columns = ["a", "b", "shared_examples", "kind", "shared", "of", "share", "spearman_all", "spearman_top"]
        rows = [{**p, "kind": kind, **p["overlap"][kind]} for p in pairs for kind in ("helpful", "harmful")]
        return download(columns, rows, fmt=format, name=name)
    columns = ["a", "b", "example_id", "total_a", "total_b", "difference"]
    rows = [{"a": p["a"], "b": p["b"], **d} for p in pairs for d in p["differences"]]
    return download(columns, rows, fmt=format, name=name)


def _curve_table(session: Any, jobs: list[Any], query_set: str) -> tuple[list[str], list[dict[str, Any]]]:
    columns = ["job_id", "label", "progress", *CURVE_COLUMNS]
    rows = []
    for job in jobs:
        steps = max(results.summary_of(job).steps, 1)
        curve = results.curve(session, job=job, query_set=query_set, points=max(steps, 2))
        label = comparing.label_of(session, job)
        for values in zip(*(curve[c] for c in CURVE_COLUMNS), strict=True):
            row = dict(zip(CURVE_COLUMNS, values, strict=True))
            rows.append({"job_id": job.id, "label": label, "progress": 100.0 * row["step"] / steps, **row})
    return columns, rows
