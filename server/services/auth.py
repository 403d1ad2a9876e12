"""Projects and API tokens. Tokens are random, shown once, and stored only as sha256."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import ApiToken, Project
from server.errors import Unauthorized

TOKEN_PREFIX = "dvemb_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, *, project: Project, name: str = "default") -> str:
    """A new token for ``project``; returns the plain token (never stored)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(project_id=project.id, name=name, token_hash=hash_token(token), prefix=token[:12]))
    session.flush()
    return token


def get_or_create_project(session: Session, *, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def project_for_token(session: Session, *, token: str | None) -> Project:
    """The project a bearer token belongs to, or 401."""
    if not token:
        raise Unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    # One query: the token's project (the token row itself is not needed).
    project = session.scalar(
        select(Project)
        .join(ApiToken, ApiToken.project_id == Project.id)
        .where(ApiToken.token_hash == hash_token(token))
    )
    if project is None:
        raise Unauthorized("unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return project
