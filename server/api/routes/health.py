"""Health check: the only endpoint without authentication."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from server.db.session import get_engine

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    # One pooled connection in one thread-pool hop (a session dependency cost two more hops per request).
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))
    return {"status": "ok"}
