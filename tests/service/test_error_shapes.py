"""Every error answer has the documented ``{"error", "detail"}`` shape (issue 21, partly held): during a database
outage (a plain-text 500 before), for a deeply nested JSON body (FastAPI's ``{"detail"}`` only), an unknown route,
a method not allowed, and an API process whose database connections are all in use."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from service_harness import Api, api_process, free_port, wait_until
from sqlalchemy import Connection


def _shaped(response: httpx.Response, status: int, error: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == error, body
    assert "Traceback" not in body["detail"] and "psycopg" not in body["detail"], body
    return str(body["detail"])


def test_a_database_outage_is_a_503_in_the_documented_shape(tmp_path: Path) -> None:
    """The API of a PostgreSQL that is down (nothing listens on its port): every request that needs it."""
    dead = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVEMB_")}
    env.update(
        DVEMB_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{dead}/down",
        DVEMB_DATA_DIR=str(tmp_path / "data"),
        DVEMB_BROKER_URL="memory://",
    )
    with api_process(env, log_level="critical") as server:
        url = f"{server}/api/v1"
        health = httpx.get(f"{url}/health")
        detail = _shaped(health, 503, "unavailable")
        assert "database cannot be reached" in detail and health.headers["Retry-After"] == "5"
        auth = {"Authorization": "Bearer dvemb_anything"}
        # The hot reads too: on PostgreSQL they run on the pool's DBAPI connection (server/services/reads.py), whose
        # driver errors must come out as the same 503.
        hot = [("GET", f"/jobs/1/{read}?query_set=val") for read in ("top", "examples", "curve")]
        for method, path in (("GET", "/runs"), ("POST", "/runs"), ("GET", "/jobs/1"), ("DELETE", "/runs/1"), *hot):
            kwargs = {"json": {"name": "x"}} if method == "POST" else {}
            _shaped(httpx.request(method, f"{url}{path}", headers=auth, **kwargs), 503, "unavailable")


def test_a_deeply_nested_body_and_framework_errors_keep_the_shape(api: Api) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    detail = _shaped(api.post("/runs", content=deep, headers={"Content-Type": "application/json"}), 400, "bad_request")
    assert "cannot be parsed" in detail
    deep_object = '{"name": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}"
    _shaped(api.post("/runs", content=deep_object, headers={"Content-Type": "application/json"}), 400, "bad_request")
    _shaped(api.get("/no-such-route"), 404, "not_found")
    _shaped(api.delete("/health"), 405, "method_not_allowed")
    assert api.get("/runs").status_code == 200  # the API goes on


def test_a_process_whose_connections_are_all_in_use_answers_503_busy_and_recovers(
    service_env: dict[str, str], token: str, tmp_path: Path
) -> None:
    """An API process with one pooled connection (DVEMB_DATABASE_POOL_SIZE=1, no overflow): while a request holds it
    (waiting on a locked table), the next request waits DVEMB_DATABASE_POOL_TIMEOUT_SECONDS for it, then is answered
    503 `unavailable` naming the settings (a 500 before); once the connection is back, requests succeed again."""
    from server.db.session import get_engine

    env = {**os.environ, **service_env}
    env.update(
        DVEMB_DATABASE_POOL_SIZE="1",
        DVEMB_DATABASE_MAX_OVERFLOW="0",
        DVEMB_DATABASE_POOL_TIMEOUT_SECONDS="0.5",
        DVEMB_RECONCILE_SECONDS="0",  # no reconciler taking the one connection between requests
        DVEMB_READ_TIMEOUT_SECONDS="60",
        DVEMB_DATA_DIR=str(tmp_path / "data"),
    )
    auth = {"Authorization": f"Bearer {token}"}
    with (
        api_process(env, log_level="critical") as server,
        get_engine().connect() as locker,
        httpx.Client(base_url=f"{server}/api/v1", headers=auth, timeout=120) as client,
    ):
        assert client.get("/runs").status_code == 200
        locker.exec_driver_sql("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
        with ThreadPoolExecutor(1) as pool:
            holding = pool.submit(client.get, "/runs")  # holds the process's one connection, waiting on the lock
            wait_until(lambda: _waiting_on_runs(locker) == 1, 60, "the first request waiting on the lock")
            detail = _shaped(client.get("/runs"), 503, "unavailable")
            assert "DVEMB_DATABASE_POOL_SIZE" in detail and "retry" in detail
            locker.rollback()  # the lock goes: the first request ends and gives its connection back
            assert holding.result().status_code == 200
        assert client.get("/runs").status_code == 200


def _waiting_on_runs(conn: Connection) -> int:
    """How many other sessions wait for a lock on the runs table."""
    return int(
        conn.exec_driver_sql(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'runs' AND NOT l.granted AND l.pid <> pg_backend_pid()"
        ).scalar_one()
    )
