"""Real parts for the service tests: a fresh PostgreSQL database made by the migrations, Redis, a real
Celery worker process and the API served by uvicorn on a free port."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
import uvicorn
from service_harness import (
    PG_ADMIN,
    REDIS_DB,
    Api,
    S3Server,
    Worker,
    drop_abandoned_databases,
    free_port,
    make_token,
)
from sqlalchemy import text
from sqlalchemy.exc import OperationalError


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    name = f"dvemb_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        drop_abandoned_databases(conn)
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """An S3-compatible server process for the session (tests/service/test_storage.py, test_object_storage.py)."""
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_env(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment of the API (in this process) and of the worker processes."""
    storage = tmp_path_factory.mktemp("storage")
    env = {
        "DVEMB_DATABASE_URL": postgres_url,
        "DVEMB_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "DVEMB_STORAGE_DIR": str(storage),
        "DVEMB_DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "DVEMB_TASK_VISIBILITY_TIMEOUT": "4",
        "DVEMB_TASK_RESTORE_INTERVAL": "1",
        "DVEMB_MAX_FILE_BYTES": str(8 << 20),
        "DVEMB_VALIDATION_WAIT_SECONDS": "30",
        "DVEMB_UPLOAD_IDLE_SECONDS": "2",
        "DVEMB_JOB_LEASE_SECONDS": "3",
        "DVEMB_MAX_PENDING_FILES": "40",
    }
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        from server.db.session import get_engine
        from server.migrate import upgrade
        from server.settings import get_settings
        from server.tasks import sender

        for cache in (get_settings, get_engine, sender):
            cache.cache_clear()
        upgrade(postgres_url)
        yield env
        get_engine().dispose()
        for cache in (get_settings, get_engine, sender):
            cache.cache_clear()


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str]) -> Iterator[Worker]:
    w = Worker(service_env)
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def server_url(service_env: dict[str, str]) -> Iterator[str]:
    from server.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(autouse=True)
def _clean_tables(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "service_env" not in request.fixturenames:
        return
    from server.db.session import get_engine

    tables = (
        "projects, api_tokens, runs, log_files, jobs, topk_rows, example_totals, curve_points, phase_summaries, "
        "task_outbox"
    )
    for attempt in range(5):
        try:
            with get_engine().begin() as conn:
                conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
            break
        except OperationalError:  # a deadlock with the API's reconciler or a worker's last writes: again
            if attempt == 4:
                raise
            time.sleep(0.5)
    from server.settings import get_settings

    shutil.rmtree(get_settings().storage / "runs", ignore_errors=True)  # ids restart: so must storage


@pytest.fixture
def token(service_env: dict[str, str]) -> str:
    return make_token()


@pytest.fixture
def api(server_url: str, token: str, worker: Worker) -> Iterator[Api]:
    client = Api(server_url, token)
    yield client
    client.client.close()
