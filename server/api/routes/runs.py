"""Runs: create, list (paginated, searchable), get, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from server.api.deps import DB_INT_MAX, IdPath, ProjectDep, SessionDep, StorageDep
from server.api.schemas import LogFilePublic, RunCreate, RunDetail, RunPublic, RunsPublic
from server.db.run_files import missing_files
from server.services import runs as service

router = APIRouter(prefix="/runs", tags=["runs"])


@router.post("", status_code=201)
def create_run(body: RunCreate, session: SessionDep, project: ProjectDep) -> RunPublic:
    return RunPublic.model_validate(service.create_run(session, project=project, name=body.name))


@router.get("")
def list_runs(
    session: SessionDep,
    project: ProjectDep,
    search: str | None = None,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> RunsPublic:
    runs, count = service.list_runs(session, project=project, search=search, offset=offset, limit=limit)
    return RunsPublic(data=[RunPublic.model_validate(r) for r in runs], count=count)


@router.get("/{run_id}")
def get_run(run_id: IdPath, session: SessionDep, project: ProjectDep) -> RunDetail:
    run = service.get_run(session, project=project, run_id=run_id)
    files = [LogFilePublic.model_validate(f) for f in service.run_files(session, run=run)]
    return RunDetail(
        **RunPublic.model_validate(run).model_dump(), files=files, missing_files=missing_files(session, run=run)
    )


@router.delete("/{run_id}", status_code=204)
def delete_run(run_id: IdPath, session: SessionDep, project: ProjectDep, storage: StorageDep) -> Response:
    service.delete_run(session, run=service.get_run(session, project=project, run_id=run_id), storage=storage)
    return Response(status_code=204)
