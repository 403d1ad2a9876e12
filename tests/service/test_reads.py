"""The hot reads (issue 14.6): top-k, ranked examples and the curve answered by one SQL statement each
(server/services/reads.py) give exactly what the ORM services give, and the same errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service_harness import Api, make_token, record_log
from sqlalchemy import update

from dvemb.client import upload_log
from server.db.models import Job
from server.db.session import session_factory
from server.services import results


def _reference(job_id: int, call: str, **kwargs: Any) -> Any:
    """The ORM service's answer (the reference the one-statement reads must equal)."""
    with session_factory()() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return getattr(results, call)(session, job=job, **kwargs)


def test_the_one_statement_reads_equal_the_services(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log", steps=24, shard_steps=8)
    job_id = api.wait_job(upload_log(log, server=api.url, token=token, run_name="reads", analyze=True)["job"]["id"])[
        "id"
    ]
    for params in (
        {"kind": "harmful"},
        {"kind": "helpful", "query": 3, "limit": 5, "offset": 2},
        {"phase": "late", "label": "1"},
        {"step_min": 5, "step_max": 15, "epoch": 0, "source": "even"},
        {"offset": 1000},  # past the end: no rows, the right count
    ):
        got = api.get(f"/jobs/{job_id}/top", params={"query_set": "val", **params})
        assert got.status_code == 200, got.text
        filters = {k: params.get(k) for k in ("phase", "epoch", "label", "source", "step_min", "step_max")}
        rows, count = _reference(
            job_id,
            "top_rows",
            query_set="val",
            query=params.get("query"),
            kind=params.get("kind", "helpful"),
            offset=params.get("offset", 0),
            limit=params.get("limit", 20),
            **filters,
        )
        fields = ("rank", "score", "step", "epoch", "phase", "example_id", "label", "source")
        assert got.json()["data"] == [{f: getattr(r, f) for f in fields} for r in rows], params
        assert got.json()["count"] == count, params
    for params in ({"kind": "harmful"}, {"kind": "helpful", "label": "2", "offset": 1, "limit": 3}, {"offset": 9999}):
        got = api.get(f"/jobs/{job_id}/examples", params={"query_set": "val", **params})
        rows, count = _reference(
            job_id,
            "ranked_examples",
            query_set="val",
            kind=params.get("kind", "helpful"),
            label=params.get("label"),
            source=None,
            offset=params.get("offset", 0),
            limit=params.get("limit", 20),
        )
        fields = ("example_id", "total", "occurrences", "label", "source")
        assert got.json() == {"data": [{f: getattr(r, f) for f in fields} for r in rows], "count": count}, params
    for points in (2, 5, 1000):  # binned (fewer points than steps) and not
        for _ in range(2):  # the first request of a job learns its number of steps
            got = api.get(f"/jobs/{job_id}/curve", params={"query_set": "val", "points": points}).json()
            assert got == _reference(job_id, "curve", query_set="val", points=points), points

    # The same errors as everywhere else.
    assert api.get(f"/jobs/{job_id}/top", params={"query_set": "nope"}).status_code == 404
    assert api.get(f"/jobs/{job_id}/curve", params={"query_set": "nope"}).status_code == 404
    assert api.get(f"/jobs/{job_id + 1}/top", params={"query_set": "val"}).status_code == 404
    anonymous = api.get(f"/jobs/{job_id}/top", params={"query_set": "val"}, headers={"Authorization": "Bearer x"})
    assert anonymous.status_code == 401 and set(anonymous.json()) == {"error", "detail"}
    other = Api(api.url, make_token("someone-else"))
    try:
        for path in ("top", "examples", "curve"):
            assert other.get(f"/jobs/{job_id}/{path}", params={"query_set": "val"}).status_code == 404
    finally:
        other.client.close()
    # Rows of a job that is not 'succeeded' (a retry writing them again) are never shown.
    with session_factory()() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running"))
        session.commit()
    for path in ("top", "examples", "curve"):
        refused = api.get(f"/jobs/{job_id}/{path}", params={"query_set": "val"})
        assert refused.status_code == 409 and "results exist once it has succeeded" in refused.json()["detail"]
