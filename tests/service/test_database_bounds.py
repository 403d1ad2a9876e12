"""Bounded work on the shared database (issue 21, item 1): a job's result tables have planner statistics as soon
as it has succeeded, and a comparison's statements stop at DVEMB_COMPARE_TIMEOUT_SECONDS with a 504 in words."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
from service_harness import Api, record_log, settings_env
from sqlalchemy import text

from dvemb.client import upload_log

RESULT_TABLES = ("topk_rows", "example_totals", "curve_points", "phase_summaries", "topk_windows", "window_topk_rows")


def analysed(api: Api, token: str, tmp_path: Path, name: str) -> int:
    log = record_log(tmp_path / name, steps=8, batch=8, shard_steps=4)
    result = upload_log(log, server=api.url, token=token, run_name=name, analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    return int(job["id"])


def analyses() -> dict[str, int]:
    """How many times each result table was analysed by hand (ANALYZE; autovacuum's runs are counted apart)."""
    from server.db.session import get_engine

    with get_engine().connect() as conn:
        found = conn.execute(
            text("SELECT relname, analyze_count FROM pg_stat_user_tables WHERE relname = ANY(:names)"),
            {"names": list(RESULT_TABLES)},
        ).all()
    return {name: int(count) for name, count in found}


def test_a_jobs_tables_have_statistics_once_it_succeeded(api: Api, token: str, tmp_path: Path) -> None:
    from server.db.session import get_engine

    before = analyses()
    analysed(api, token, tmp_path, "stats")
    after = analyses()
    assert set(after) == set(RESULT_TABLES)
    assert all(after[t] > before.get(t, 0) for t in RESULT_TABLES), (before, after)
    with get_engine().connect() as conn:
        tuples = conn.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'example_totals'"))
        rows = conn.scalar(text("SELECT count(*) FROM example_totals"))
    assert rows == 64 and tuples == rows  # the planner counts the job's rows, not "1 row" of a never-analysed table


def compare_timeout(seconds: float) -> AbstractContextManager[None]:
    return settings_env(DVEMB_COMPARE_TIMEOUT_SECONDS=str(seconds))


@contextmanager
def totals_locked() -> Iterator[None]:
    """example_totals locked against readers: any comparison waits (as one over a badly planned join runs)."""
    from server.db.session import get_engine

    with get_engine().connect() as conn:
        conn.execute(text("LOCK TABLE example_totals IN ACCESS EXCLUSIVE MODE"))
        try:
            yield
        finally:
            conn.rollback()


def test_a_comparison_stops_at_its_time_limit_with_a_504(api: Api, token: str, tmp_path: Path) -> None:
    from server.db.session import get_engine

    a, b = analysed(api, token, tmp_path, "first"), analysed(api, token, tmp_path, "second")
    params = {"jobs": f"{a},{b}", "query_set": "val"}
    with compare_timeout(1.0):
        with totals_locked():
            for path in ("/compare", "/compare/export/differences"):
                started = time.monotonic()
                got = api.get(path, params=params, timeout=httpx.Timeout(15))
                assert got.status_code == 504, got.text
                assert time.monotonic() - started < 10
                body = got.json()
                assert set(body) == {"error", "detail"} and body["error"] == "timeout"
                assert "longer than 1 s" in body["detail"] and "DVEMB_COMPARE_TIMEOUT_SECONDS" in body["detail"]
            with get_engine().connect() as conn:  # the cancelled statements are gone, not waiting on
                waiting = conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state = 'active' AND query ILIKE '%example_totals%' AND pid <> pg_backend_pid()"
                    )
                )
            assert waiting == 0
        fine = api.get("/compare", params=params)  # the same limit, an ordinary comparison: well within it
        assert fine.status_code == 200 and fine.json()["pairs"][0]["shared_examples"] == 64


@contextmanager
def request_limits(seconds: float) -> Iterator[None]:
    """Every request class's statement limit set to ``seconds`` (the hot reads' engine made again to take it)."""
    from server.db.session import get_read_engine

    def fresh() -> None:
        get_read_engine().dispose()
        get_read_engine.cache_clear()

    limits = {"DVEMB_READ_TIMEOUT_SECONDS": str(seconds), "DVEMB_WRITE_TIMEOUT_SECONDS": str(seconds)}
    try:
        with settings_env(**limits):
            fresh()
            yield
    finally:
        fresh()


@contextmanager
def locked(table: str) -> Iterator[None]:
    """``table`` locked against every reader and writer while the block runs."""
    from server.db.session import get_engine

    with get_engine().connect() as conn:
        conn.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        try:
            yield
        finally:
            conn.rollback()


def test_every_request_class_stops_at_its_time_limit_and_loses_nothing(api: Api, token: str, tmp_path: Path) -> None:
    """A GET on the ORM path, a hot read (its own autocommit engine) and a DELETE each wait on a locked table (as a
    badly planned statement runs on): past DVEMB_READ_TIMEOUT_SECONDS / DVEMB_WRITE_TIMEOUT_SECONDS the database stops
    them and the API answers 504 in the documented shape; the run the DELETE would have removed is still whole."""
    job = analysed(api, token, tmp_path, "limits")
    run = api.get(f"/jobs/{job}").json()["run_id"]
    requests = [
        ("runs", "GET", "/runs", {}),
        ("topk_rows", "GET", f"/jobs/{job}/top", {"query_set": "val"}),
        ("example_totals", "DELETE", f"/runs/{run}", {}),
    ]
    with request_limits(1.0):
        for table, method, path, params in requests:
            with locked(table):
                started = time.monotonic()
                got = api.request(method, path, params=params, timeout=httpx.Timeout(20))
                assert got.status_code == 504, (path, got.status_code, got.text)
                assert time.monotonic() - started < 10, path
                body = got.json()
                assert set(body) == {"error", "detail"} and body["error"] == "timeout", body
    assert api.get(f"/runs/{run}").status_code == 200  # the DELETE was rolled back: nothing lost
    top = api.get(f"/jobs/{job}/top", params={"query_set": "val"})
    assert top.status_code == 200 and top.json()["data"], top.text


def test_a_comparison_whose_client_left_is_cancelled_at_once(api: Api, token: str, tmp_path: Path) -> None:
    """Issue 21: a comparison's statements ran on after its client had left (for minutes, before the time limit).
    Now the API cancels the running statement when the client disconnects: with a 60 s limit and the table
    locked, nothing of the request is left on the database a few seconds after its client gave up."""
    from server.db.session import get_engine

    a, b = analysed(api, token, tmp_path, "first"), analysed(api, token, tmp_path, "second")
    params = {"jobs": f"{a},{b}", "query_set": "val"}

    def waiting() -> int:
        with get_engine().connect() as conn:
            return int(
                conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state = 'active' AND query ILIKE '%example_totals%' AND pid <> pg_backend_pid()"
                    )
                )
            )

    with compare_timeout(60.0), totals_locked():
        with pytest.raises(httpx.ReadTimeout):
            api.get("/compare", params=params, timeout=httpx.Timeout(2))  # the client gives up after 2 s
        left = time.monotonic()
        while waiting() and time.monotonic() - left < 10:
            time.sleep(0.2)
        assert waiting() == 0, "the comparison's statement still runs after its client left"
        assert time.monotonic() - left < 10
    fine = api.get("/compare", params=params)  # and the API still compares
    assert fine.status_code == 200 and fine.json()["pairs"][0]["shared_examples"] == 64


def test_hot_reads_whose_pooled_connections_died_are_retried_once(api: Api, token: str, tmp_path: Path) -> None:
    """The hot reads run on the pool's raw DBAPI connection without a ping per checkout (server/services/reads.py):
    connections the database ended while they sat in the pool (a restart, a proxy or a network cut) are found dead
    by the read itself, the pool's connections of that generation are recycled (not only the one found dead: the
    retry would take the next dead one), and the read runs again once: the client sees an ordinary 200."""
    from server.db.session import get_engine, get_read_engine

    job = analysed(api, token, tmp_path, "dead")
    reads = [(f"/jobs/{job}/{read}", {"query_set": "val"}) for read in ("top", "examples", "curve")]
    before = [api.get(path, params=params) for path, params in reads]
    assert [r.status_code for r in before] == [200, 200, 200]
    for path, params in reads:
        with ThreadPoolExecutor(6) as pool:  # reads at once: the pool keeps several connections, all to be ended
            fetch = partial(api.get, path, params=params)
            answers = [f.result() for f in [pool.submit(fetch) for _ in range(6)]]
        assert {r.status_code for r in answers} == {200}
        assert get_read_engine().pool.checkedin() >= 2  # type: ignore[attr-defined]
        with get_engine().connect() as conn:  # every idle connection of this database but this one: the read pool's
            ended = conn.scalar(
                text(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND state = 'idle' AND pid <> pg_backend_pid()) ended"
                )
            )
        assert ended and ended > 0
        again = api.get(path, params=params)
        assert again.status_code == 200, (path, again.text)
    assert [api.get(path, params=params).json() for path, params in reads] == [r.json() for r in before]
