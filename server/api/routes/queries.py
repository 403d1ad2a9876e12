"""Ad-hoc queries: POST projected test gradients for a job, get the top-k back."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from server.api.deps import JobDep, ProjectDep, SessionDep, SettingsDep
from server.api.schemas import QueryCreate
from server.db.models import Run
from server.db.session import session_factory
from server.db.states import QueryStatus
from server.services import adhoc

router = APIRouter(tags=["queries"])


@router.post("/jobs/{job_id}/queries", status_code=201)
def create_query(job: JobDep, body: QueryCreate, session: SessionDep, settings: SettingsDep) -> Response:
    run = session.get(Run, job.run_id)
    assert run is not None
    query = adhoc.create_query(
        session, job=job, run=run, gradients=body.gradients, top_k=body.top_k, storage=settings.storage
    )
    session.commit()  # the task is sent on commit; then wait a little for its answer
    answer = _wait(query.id, body.wait_seconds)
    status = 200 if answer["status"] in (QueryStatus.SUCCEEDED, QueryStatus.FAILED) else 202
    return JSONResponse(answer, status_code=status, headers={"Location": f"/api/v1/queries/{query.id}"})


@router.get("/queries/{query_id}")
def get_query(query_id: int, session: SessionDep, project: ProjectDep) -> dict[str, Any]:
    return adhoc.public(adhoc.get_query(session, project_id=project.id, query_id=query_id))


def _wait(query_id: int, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        with session_factory()() as session:
            query = session.get(adhoc.AdhocQuery, query_id)
            assert query is not None
            answer = adhoc.public(query)
        if answer["status"] != QueryStatus.QUEUED or time.monotonic() >= deadline:
            return answer
        time.sleep(0.05)
