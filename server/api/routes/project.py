"""The caller's project and its API tokens (a token sees only its own project)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy import select

from server.api.deps import IdPath, ProjectDep, SessionDep
from server.api.schemas import TokenCreate
from server.db.models import ApiToken
from server.services import auth
from server.services.auth import create_token

router = APIRouter(tags=["project"])


@router.get("/project")
def get_project(session: SessionDep, project: ProjectDep) -> dict[str, Any]:
    tokens = session.scalars(select(ApiToken).where(ApiToken.project_id == project.id).order_by(ApiToken.id)).all()
    return {
        "id": project.id,
        "name": project.name,
        "created_at": project.created_at,
        "tokens": [{"id": t.id, "name": t.name, "prefix": t.prefix, "created_at": t.created_at} for t in tokens],
    }


@router.post("/tokens", status_code=201)
def new_token(body: TokenCreate, session: SessionDep, project: ProjectDep) -> dict[str, Any]:
    """A new token for the caller's project; the plain token is shown only in this response."""
    return {"name": body.name, "token": create_token(session, project=project, name=body.name)}


@router.delete("/tokens/{token_id}", status_code=204)
def revoke_token(token_id: IdPath, session: SessionDep, project: ProjectDep) -> Response:
    auth.revoke_token(session, project=project, token_id=token_id)
    return Response(status_code=204)
