"""Waiting for a worker's answer inside a request (server/api/waiting.py): quick first looks, then one every 0.1 s."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from server.api.waiting import LONGEST_POLL_S, poll_delays, wait_answer


def test_the_first_looks_come_quickly_then_every_tenth_of_a_second() -> None:
    assert list(itertools.islice(poll_delays(), 7)) == [0.01, 0.02, 0.04, 0.08, 0.1, 0.1, 0.1]


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
    # 0.01 + 0.02 + 0.04 + 0.08 s, then one look per 0.1 s: a long wait costs a read per 0.1 s, not more
    gaps = [b - a for a, b in itertools.pairwise(looks)]
    assert len(looks) <= 4 + 0.5 / LONGEST_POLL_S + 2, gaps
