"""Waiting for a worker's answer inside a request (server/api/waiting.py): a look at the row every 0.1 s."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from server.api.waiting import POLL_S, wait_answer


def test_an_answer_is_returned_at_the_look_that_finds_it_settled() -> None:
    looks: list[int] = []

    def answer(item_id: int) -> dict[str, Any]:
        looks.append(item_id)
        return {"status": "done" if len(looks) == 3 else "queued"}

    found = asyncio.run(wait_answer(answer, 7, 30, settled=lambda f: f["status"] == "done"))
    assert found == {"status": "done"} and looks == [7, 7, 7]


def test_an_answer_that_never_settles_is_returned_as_it_is_at_the_deadline() -> None:
    looks: list[float] = []

    def answer(item_id: int) -> dict[str, Any]:
        looks.append(time.monotonic())
        return {"status": "queued", "look": len(looks)}

    started = time.monotonic()
    found = asyncio.run(wait_answer(answer, 1, 0.5))
    assert found["status"] == "queued" and found["look"] == len(looks)
    assert looks[-1] - started >= 0.5  # looked once more at the deadline
    assert len(looks) <= 0.5 / POLL_S + 2  # a long wait costs one short read per 0.1 s, not more
