"""Dependencies shared by the routes: session, settings, current project."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from server.db.models import Project
from server.db.session import get_session
from server.services.auth import project_for_token
from server.settings import Settings, get_settings

# scope="function": the session's commit runs before the response is sent, so a failed commit
# is an error response, not a 200 for work that was lost.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def current_project(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Project:
    token = None
    if authorization and authorization.lower().startswith("bearer "):
        token = authorization[7:].strip()
    return project_for_token(session, token=token)


ProjectDep = Annotated[Project, Depends(current_project)]
