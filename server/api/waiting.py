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
        await asyncio.sleep(0.1)
