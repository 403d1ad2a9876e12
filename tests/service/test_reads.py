"""The hot reads (issue 14.6): top-k, ranked examples and the curve answered by one SQL statement each
(server/services/reads.py) give exactly what naive references give (the rows filtered and paged in Python; the
ORM service for the curve), and the same errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service_harness import Api, make_token, record_log
from sqlalchemy import select, update

from dvemb.client import upload_log
from server.db.models import ExampleTotal, Job, TopKRow
from server.db.session import session_factory
from server.services import results


def _reference(job_id: int, call: str, **kwargs: Any) -> Any:
    """The ORM service's answer (the reference the one-statement read must equal)."""
    with session_factory()() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return getattr(results, call)(session, job=job, **kwargs)


def _stored(job_id: int, model: Any) -> list[Any]:
    """Every row of the job in ``model``'s table, for the naive references below."""
    with session_factory()() as session:
        return list(session.scalars(select(model).where(model.job_id == job_id)))


def _top_reference(job_id: int, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """/top's page and count, filtered and paged in Python."""
    query = params.get("query", -1)
    step_min, step_max = params.get("step_min", 0), params.get("step_max", 2**31)
    kept = sorted(
        (
            r
            for r in _stored(job_id, TopKRow)
            if (r.query_set, r.query, r.kind) == ("val", query, params.get("kind", "helpful"))
            and step_min <= r.step <= step_max
            and (r.score > 0 if r.kind == "helpful" else r.score < 0)  # a kind's rows have its sign
            and all(getattr(r, f) == params[f] for f in ("phase", "epoch", "label", "source") if f in params)
        ),
        key=lambda r: r.rank,
    )
    offset = params.get("offset", 0)
    page = kept[offset : offset + params.get("limit", 20)]
    fields = ("rank", "score", "step", "epoch", "phase", "example_id", "label", "source")
    return [{f: getattr(r, f) for f in fields} for r in page], len(kept)


def _examples_reference(job_id: int, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """/examples' page and count: every example of the query set, filtered, sorted and paged in Python."""
    sign = 1 if params.get("kind", "helpful") == "helpful" else -1
    kept = sorted(
        (
            r
            for r in _stored(job_id, ExampleTotal)
            if r.query_set == "val" and all(getattr(r, f) == params[f] for f in ("label", "source") if f in params)
        ),
        key=lambda r: (-sign * r.total, r.example_id),
    )
    offset = params.get("offset", 0)
    page = kept[offset : offset + params.get("limit", 20)]
    fields = ("example_id", "total", "occurrences", "label", "source")
    return [{f: getattr(r, f) for f in fields} for r in page], len(kept)


def test_the_one_statement_reads_equal_the_references(api: Api, token: str, tmp_path: Path) -> None:
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
        rows, count = _top_reference(job_id, params)
        assert got.json()["data"] == rows and got.json()["count"] == count, params
        assert count > 0 or params == {"offset": 1000}, params  # the filters keep rows: not a vacuous check
    for params in ({"kind": "harmful"}, {"kind": "helpful", "label": "2", "offset": 1, "limit": 3}, {"offset": 9999}):
        got = api.get(f"/jobs/{job_id}/examples", params={"query_set": "val", **params})
        rows, count = _examples_reference(job_id, params)
        assert got.json() == {"data": rows, "count": count} and count > 0, params
    for points in (2, 5, 23, 24, 1000):  # binned (fewer points than steps) and not
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
