"""Waiting for a worker's answer inside a request without holding a server thread: each look at the row is a
short read in the thread pool, the waiting between looks is ``asyncio.sleep`` (so clients waiting on a busy
worker cannot starve other requests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi.concurrency import run_in_threadpool

from server.db.states import QueryStatus


def answered(found: dict[str, Any]) -> bool:
    """An ad-hoc query's or a window's answer is in once its status is no longer queued."""
    return bool(found["status"] != QueryStatus.QUEUED)


#: Seconds between the first two looks at the row; each wait doubles it, up to :data:`LONGEST_POLL_S`.
FIRST_POLL_S = 0.01
LONGEST_POLL_S = 0.1


def poll_delays() -> Iterator[float]:
    """Seconds to wait before each next look: 0.01, 0.02, 0.04, 0.08, then 0.1 for ever. Most answers (a file's
    validation, a small ad-hoc query) come within a few hundredths of a second: looking every 0.1 s from the start
    added 0.05 s on average to each, which a log of many files paid once per file (its upload waits for each
    verdict), while a long wait still costs one short read every 0.1 s."""
    delay = FIRST_POLL_S
    while True:
        yield delay
        delay = min(2 * delay, LONGEST_POLL_S)


async def wait_answer(
    answer: Callable[[int], dict[str, Any]],
    item_id: int,
    seconds: float,
    *,
    settled: Callable[[dict[str, Any]], bool] = answered,
) -> dict[str, Any]:
    """``answer(item_id)`` once ``settled`` says so, or as it is after ``seconds``."""
    deadline = time.monotonic() + seconds
    delays = poll_delays()
    while True:
        found = await run_in_threadpool(answer, item_id)
        if settled(found) or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))
