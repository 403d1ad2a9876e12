"""Top examples per window of training (phases, tenths, epochs, any step range) and when to run data selection."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from server.api.deps import DoneJobDep, IdPath, IntQuery, Kind, LimitQuery, OffsetQuery, SessionDep
from server.api.schemas import (
    ApproximationPublic,
    TopRow,
    WindowCreate,
    WindowPublic,
    WindowsPublic,
    WindowTopPublic,
)
from server.api.waiting import wait_answer
from server.db.models import Job
from server.db.session import session_factory
from server.db.states import QueryStatus
from server.db.window_models import TopKWindow
from server.errors import NotFound
from server.services import selection, windows

router = APIRouter(tags=["windows"])


@router.get("/jobs/{job_id}/windows")
def list_windows(job: DoneJobDep, session: SessionDep, query_set: str) -> WindowsPublic:
    """The windows whose top examples are ranked on their own: each phase, tenth of training and epoch (stored
    with the job), then the step ranges asked for so far (cached)."""
    found = windows.list_windows(session, job=job, query_set=query_set)
    return WindowsPublic(data=[WindowPublic(**windows.public(w)) for w in found], count=len(found))


@router.post("/jobs/{job_id}/windows", responses={202: {"description": "still being computed"}})
async def ask_window(job: DoneJobDep, body: WindowCreate, session: SessionDep) -> Response:
    """The window of a step range (and epoch): found among the stored and cached windows, or ranked exactly by a
    worker from the scores file. Waits up to ``wait_seconds`` without holding a server thread; 200 once it is
    computed (or failed), 202 while it is queued (poll its Location)."""
    window_id = await run_in_threadpool(_ask, session, job, body)
    answer = await wait_answer(_answer, window_id, body.wait_seconds)
    status = 202 if answer["status"] == QueryStatus.QUEUED else 200
    location = f"/api/v1/jobs/{job.id}/windows/{window_id}"
    return JSONResponse(answer, status_code=status, headers={"Location": location})


def _ask(session: Session, job: Job, body: WindowCreate) -> int:
    window = windows.ask_window(
        session, job=job, query_set=body.query_set, step_min=body.step_min, step_max=body.step_max, epoch=body.epoch
    )
    session.commit()  # the task is sent on commit
    return window.id


def _answer(window_id: int) -> dict[str, Any]:
    with session_factory()() as session:
        window = session.get(TopKWindow, window_id)
        if window is None:  # deleted with its run while the client waited
            raise NotFound(f"window {window_id} was deleted with its run")
        return WindowPublic(**windows.public(window)).model_dump()


@router.get("/jobs/{job_id}/windows/{window_id}")
def get_window(job: DoneJobDep, window_id: IdPath, session: SessionDep) -> WindowPublic:
    return WindowPublic(**windows.public(windows.get_window(session, job=job, window_id=window_id)))


@router.get("/jobs/{job_id}/windows/{window_id}/top")
def window_top(
    job: DoneJobDep,
    window_id: IdPath,
    session: SessionDep,
    kind: Kind = "helpful",
    query: IntQuery = None,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 20,
) -> WindowTopPublic:
    """A page of the window's own top rows for one query (or the set mean), best first (409 while computing)."""
    window = windows.get_window(session, job=job, window_id=window_id)
    rows, count = windows.window_rows(
        session, job=job, window=window, query=query, kind=kind, offset=offset, limit=limit
    )
    described = windows.public(window)
    found = job.approximations
    return WindowTopPublic(
        query_set=window.query_set,
        query=query,
        kind=kind,
        propagation=job.propagation,
        approximations=None if found is None else [ApproximationPublic(**a) for a in found],
        chosen=described["chosen"],
        data=[TopRow(**r) for r in rows],
        count=count,
        window=WindowPublic(**described),
    )


class SelectionOptions(BaseModel):
    """The query parameters of when to select data, shared by GET /selection and its export."""

    share: Annotated[float, Query(gt=0, le=1, description="share of the influence to carry")] = 0.9
    max_windows: Annotated[int, Query(alias="windows", ge=1, le=4, description="the most windows of selection")] = 2
    measure: Annotated[
        Literal["per_lr", "raw"], Query(description="per_lr: |influence| / lr (the paper's view); raw: |influence|")
    ] = "per_lr"
    points: Annotated[int, Query(ge=10, le=2000, description="resolution: bins of consecutive steps")] = 1000


SelectionQuery = Annotated[SelectionOptions, Query()]  # its fields are job_selection's arguments


@router.get("/jobs/{job_id}/selection")
def selection_timing(job: DoneJobDep, session: SessionDep, query_set: str, options: SelectionQuery) -> dict[str, Any]:
    """When to run data selection: the step windows that carry ``share`` of the influence in the fewest steps,
    and the paper's early+late rule evaluated on this run (docs/dashboard.md explains both and their limits)."""
    return selection.job_selection(session, job=job, query_set=query_set, **options.model_dump())
