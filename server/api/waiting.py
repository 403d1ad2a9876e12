"""Waiting for a worker's answer inside a request without holding a server thread: each look at the row is a
short read in the thread pool, the waiting between looks is ``asyncio.sleep`` (so clients waiting on a busy
worker cannot starve other requests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool

from server.db.states import QueryStatus

#: Seconds between two looks at the row. Looking sooner first (0.01 s, doubling) was tried: every waiting request
#: then read the database several times in its first tenth of a second, and 45 clients waiting on one API at once
#: grew its connection pool to the full 40, enough with a second API on the same PostgreSQL to exhaust its
#: connections ("too many clients"); uploads of many files gain more from sending four at a time (dvemb upload).
POLL_S = 0.1


def answered(found: dict[str, Any]) -> bool:
    """An ad-hoc query's or a window's answer is in once its status is no longer queued."""
    return bool(found["status"] != QueryStatus.QUEUED)


async def wait_answer(
    answer: Callable[[int], dict[str, Any]],
    item_id: int,
    seconds: float,
    *,
    settled: Callable[[dict[str, Any]], bool] = answered,
) -> dict[str, Any]:
    """``answer(item_id)`` once ``settled`` says so, or as it is after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        found = await run_in_threadpool(answer, item_id)
        if settled(found) or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(POLL_S)
