"""Dependencies shared by the routes: session, settings, current project, and a job of the project (any, or
one whose results exist)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Header, Path, Query
from sqlalchemy.orm import Session

from server.db.models import Job, Project
from server.db.session import get_session
from server.services import jobs, results
from server.services.auth import project_for_token
from server.settings import Settings, get_settings
from server.storage import Storage, get_storage

# scope="function": the session's commit runs before the response is sent, so a failed commit
# is an error response, not a 200 for work that was lost.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
#: Database integers are 32-bit on Postgres: every id in a path and every integer filter is bounded, so that a
#: too large number is a 422 naming the parameter, never a database error (SQLite's limit is 2^63).
DB_INT_MAX = 2**31 - 1
IdPath = Annotated[int, Path(ge=1, le=DB_INT_MAX)]
IntQuery = Annotated[int | None, Query(ge=0, le=DB_INT_MAX)]
#: A page of a table: its first row and its length (at most 1000 rows a page).
OffsetQuery = Annotated[int, Query(ge=0, le=DB_INT_MAX)]
LimitQuery = Annotated[int, Query(ge=1, le=1000)]
Kind = Literal["helpful", "harmful"]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def current_project(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Project:
    return project_for_token(session, token=bearer(authorization))


ProjectDep = Annotated[Project, Depends(current_project)]


def project_job(job_id: IdPath, session: SessionDep, project: ProjectDep) -> Job:
    """The job ``job_id`` of the caller's project (404 otherwise)."""
    return jobs.get_job(session, project=project, job_id=job_id)


JobDep = Annotated[Job, Depends(project_job)]


def done_job(job: JobDep) -> Job:
    """The job, once it has succeeded (409 otherwise: its results do not exist yet)."""
    results.require_done(job)
    return job


DoneJobDep = Annotated[Job, Depends(done_job)]
