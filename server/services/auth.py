"""Projects and API tokens. Tokens are random, shown once, and stored only as sha256."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from server.db.models import ApiToken, Project
from server.errors import Conflict, NotFound, Unauthorized

TOKEN_PREFIX = "dvemb_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, *, project: Project, name: str = "default") -> str:
    """A new token for ``project``; returns the plain token (never stored)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(project_id=project.id, name=name, token_hash=hash_token(token), prefix=token[:12]))
    session.flush()
    return token


def revoke_token(session: Session, *, project: Project, token_id: int) -> None:
    """Revoke one of the project's tokens, never its last one.

    Revocations of one project are serialised on the project's row (``SELECT ... FOR UPDATE`` on Postgres), and
    the delete itself is conditional on another token remaining, so two tokens revoking each other at once
    leave one of them (the second gets a 409), on Postgres as on SQLite.
    """
    token = session.get(ApiToken, token_id)
    if token is None or token.project_id != project.id:
        raise NotFound(f"token {token_id} not found")
    session.execute(select(Project.id).where(Project.id == project.id).with_for_update())
    others = select(func.count()).where(ApiToken.project_id == project.id, ApiToken.id != token_id).scalar_subquery()
    deleted = session.execute(
        delete(ApiToken).where(ApiToken.id == token_id, others > 0).execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if deleted != 1:
        raise Conflict("this is the project's last token; create another before revoking it")
    session.expunge(token)


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
