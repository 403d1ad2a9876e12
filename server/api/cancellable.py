"""Database work that stops when its client leaves: a request's statements are cancelled on PostgreSQL the moment
the client disconnects, instead of running on to their time limit (issue 21: a comparison's queries ran for
minutes after its client had gone).

The request's own session runs the work in the thread pool while the event loop watches the connection; on a
disconnect it asks PostgreSQL to cancel the session's running statement (``pg_cancel_backend`` on the backend the
session holds, from another pooled connection). SQLite (embedded, one user) has no such cancel: the work runs
to its end, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from server.db.session import get_engine, timed_out

__all__ = ["ClientGone", "run_cancellable"]

T = TypeVar("T")
_POLL_SECONDS = 0.25
logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected and the request's statement was cancelled: nobody is left to answer."""


def _backend_pid(session: Session) -> int | None:
    """PostgreSQL's process id of the connection the session holds (taken now, for the request); None on SQLite."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return None
    driver = connection.connection.driver_connection
    return int(driver.info.backend_pid)  # type: ignore[union-attr]


def _cancel(pid: int) -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})


async def run_cancellable(request: Request, session: Session, work: Callable[[], T]) -> T:
    """``work()`` (which uses ``session``) in the thread pool; if the client disconnects before it ends, its running
    statement is cancelled and :class:`ClientGone` is raised once the work has stopped.

    Args:
        request: the request whose client is watched.
        session: the request's session: the statement cancelled is the one running on its connection.
        work: the database work, a function of nothing.
    """
    pid = await run_in_threadpool(_backend_pid, session)
    task = asyncio.ensure_future(run_in_threadpool(work))
    cancelled = False
    while True:
        done, _ = await asyncio.wait({task}, timeout=_POLL_SECONDS)
        if done:
            break
        if not cancelled and pid is not None and await request.is_disconnected():
            logger.info("client left during %s: cancelling its statement (backend %s)", request.url.path, pid)
            await run_in_threadpool(_cancel, pid)
            cancelled = True
    try:
        return task.result()
    except OperationalError as exc:
        if cancelled and timed_out(exc):  # pg_cancel_backend's SQLSTATE is the statement timeout's
            await run_in_threadpool(session.rollback)  # the transaction is aborted: nothing of it is kept
            raise ClientGone from None
        raise
