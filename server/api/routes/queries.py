"""Ad-hoc queries: POST projected test gradients for a job, get the top-k back."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from server.api.deps import IdPath, JobDep, ProjectDep, SessionDep, StorageDep
from server.api.schemas import QueryCreate
from server.api.waiting import wait_answer
from server.db.models import Job, Run
from server.db.session import session_factory
from server.db.states import QueryStatus
from server.errors import NotFound
from server.services import adhoc
from server.storage import Storage

router = APIRouter(tags=["queries"])


@router.post("/jobs/{job_id}/queries", status_code=201)
async def create_query(job: JobDep, body: QueryCreate, session: SessionDep, storage: StorageDep) -> Response:
    """Store the vectors and queue their scoring; then wait up to ``wait_seconds`` for the answer without
    holding a server thread (server/api/waiting.py)."""
    query_id = await run_in_threadpool(_create, session, job, body, storage)
    answer = await wait_answer(_answer, query_id, body.wait_seconds)
    status = 200 if answer["status"] in (QueryStatus.SUCCEEDED, QueryStatus.FAILED) else 202
    return JSONResponse(answer, status_code=status, headers={"Location": f"/api/v1/queries/{query_id}"})


def _create(session: Session, job: Job, body: QueryCreate, storage: Storage) -> int:
    run = session.get(Run, job.run_id)
    assert run is not None
    query = adhoc.create_query(session, job=job, run=run, gradients=body.gradients, top_k=body.top_k, storage=storage)
    session.commit()  # the task is sent on commit
    return query.id


@router.get("/queries/{query_id}")
def get_query(query_id: IdPath, session: SessionDep, project: ProjectDep) -> dict[str, Any]:
    return adhoc.public(adhoc.get_query(session, project_id=project.id, query_id=query_id))


def _answer(query_id: int) -> dict[str, Any]:
    with session_factory()() as session:
        query = session.get(adhoc.AdhocQuery, query_id)
        if query is None:  # its job's run was deleted while the client waited
            raise NotFound(f"query {query_id} was deleted with its run")
        return adhoc.public(query)
