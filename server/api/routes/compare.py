"""Comparing analyses of one project: the jobs that can be compared, and the comparison itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from server import figures
from server.api.cancellable import ClientGone, run_cancellable
from server.api.deps import ProjectDep, SessionDep, SettingsDep
from server.db.session import limit_statement_time, timed_out
from server.errors import BadRequest, TimedOut
from server.services import compare as service
from server.settings import Settings

router = APIRouter(tags=["compare"])

JobsQuery = Annotated[str, Query(max_length=200, description="the jobs to compare, comma-separated: 3,5")]
TopQuery = Annotated[int, Query(ge=1, le=1000, description="how many top examples per kind are matched")]
DifferQuery = Annotated[int, Query(ge=1, le=1000, description="how many most-differing examples are listed")]


def job_ids(jobs: str) -> list[int]:
    """The ids of ``jobs=3,5`` (400 naming the bad part otherwise)."""
    parts = [p.strip() for p in jobs.split(",") if p.strip()]
    if not all(p.isdigit() and 0 < int(p) < 2**31 for p in parts):
        raise BadRequest(f"jobs={jobs!r}: give job ids separated by commas, e.g. jobs=3,5")
    return [int(p) for p in parts]


@contextmanager
def time_limited(session: Session, settings: Settings) -> Iterator[None]:
    """A comparison's statements stop at DVEMB_COMPARE_TIMEOUT_SECONDS (PostgreSQL): one request cannot hold the
    shared database for minutes, and its statements end even when its client has left. Past it: 504 in words."""
    limit = settings.compare_timeout_seconds
    limit_statement_time(session, limit)
    try:
        yield
    except OperationalError as exc:
        if not timed_out(exc):
            raise
        raise TimedOut(
            f"the comparison took longer than {limit:g} s and the database stopped it: compare fewer jobs or ask "
            "for smaller top= and differ=; the operator can raise DVEMB_COMPARE_TIMEOUT_SECONDS"
        ) from None


@router.get("/compare/jobs")
def comparable_jobs(session: SessionDep, project: ProjectDep) -> dict[str, Any]:
    """Every succeeded job of the project, newest first: the ones a comparison can take."""
    found = service.candidates(session, project=project)
    return {"data": found, "count": len(found)}


@router.get("/compare", response_model=None)
async def compare(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectDep,
    jobs: JobsQuery,
    query_set: str,
    view: Literal["per_lr", "raw"] = "per_lr",
    smooth: Annotated[int, Query(ge=1, le=1001)] = 1,
    points: Annotated[int, Query(ge=2, le=20000)] = 1000,
    top: TopQuery = 100,
    differ: DifferQuery = 20,
) -> dict[str, Any] | Response:
    """Two or more jobs side by side: their runs and phases, overlaid curves (x: share of training), phase
    shares, and per pair the overlap and rank correlation of their top examples (matched by example id) and the
    examples whose total influence differs most."""
    ids = job_ids(jobs)

    def work() -> dict[str, Any]:
        with time_limited(session, settings):
            return service.compare(
                session, project=project, job_ids=ids, query_set=query_set, points=points, top=top, differ=differ
            )

    try:  # its statements stop when its client leaves (not only at the time limit)
        found = await run_cancellable(request, session, work)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    curves = [{"label": r["label"], "steps": r["steps"], **r["curve"]} for r in found["runs"]]
    found["figures"] = {
        "curves": figures.compare_curves_figure(curves, view=view, smooth=smooth),
        "shares": figures.compare_shares_figure(found["runs"], view=view),
    }
    return found
