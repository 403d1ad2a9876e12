"""Run listings read only what they show (issue 21, partly held): a 15 MB manifest was loaded with every run
listing (`GET /runs?limit=500` with ten of them: 1.45 s and +280 MB of API memory for a 3.7 kB answer)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from service_harness import Api
from sqlalchemy import event, update


@pytest.fixture
def statements(api: Api) -> Iterator[list[str]]:
    """The SQL the API (served in this process) sends to PostgreSQL while the test runs."""
    from server.db.session import get_engine

    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(get_engine(), "before_cursor_execute", record)
    yield seen
    event.remove(get_engine(), "before_cursor_execute", record)


def test_a_run_listing_does_not_read_manifests(api: Api, statements: list[str]) -> None:
    from server.db.models import Run
    from server.db.session import session_factory

    ids = [int(api.post("/runs", json={"name": f"big-{i}"}).json()["id"]) for i in range(3)]
    big = {"ranks": [{"layers": [{"name": "x" * 100} for _ in range(20_000)]}]}  # about 2.4 MB of JSON each
    with session_factory()() as session:
        session.execute(update(Run).where(Run.id.in_(ids)).values(manifest=big, num_steps=7))
        session.commit()
    statements.clear()
    listing = api.get("/runs", params={"limit": 500})
    assert listing.status_code == 200 and listing.json()["count"] == 3
    assert {r["num_steps"] for r in listing.json()["data"]} == {7}
    assert len(listing.content) < 2_000
    selects = [s for s in statements if "FROM runs" in s]
    assert selects and not [s for s in selects if "runs.manifest" in s], selects
    # one run's page still has what its manifest says (the files it is missing)
    assert api.get(f"/runs/{ids[0]}").json()["missing_files"] == ["manifest.json"]
