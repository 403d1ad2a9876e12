"""Issue 13, item 4: the broker down when a task is sent. The request used to answer 500 with its row committed
and no task sent, and nothing recovered it. Now the task waits in the outbox (written in the row's transaction)
and the API's reconciler sends it once the broker is back.

Against real parts of its own: a Redis server this test starts on a free port (and stops, and restarts), its own
PostgreSQL database, an API process and a Celery worker pointed at them (the suite's shared ones are untouched).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from service_harness import PG_ADMIN, Api, Worker, api_process, free_port, record_log, wait_until

from dvemb.client import upload_log

TUS = {"Tus-Resumable": "1.0.0"}


class RedisServer:
    """A redis-server of the test's own, on its own port, without persistence (a restart starts empty)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _accepts(self.port), 20, "redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        wait_until(lambda: not _accepts(self.port), 20, "redis-server did not stop")


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def own_services(tmp_path: Path) -> Iterator[tuple[str, str, RedisServer]]:
    """(API URL, token, the Redis server) of a service of the test's own."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    database = f"dvemb_outage_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    redis_server = RedisServer(free_port())
    redis_server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVEMB_")}
    env.update(
        DVEMB_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        DVEMB_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/0",
        DVEMB_STORAGE_DIR=str(tmp_path / "storage"),
        DVEMB_DATA_DIR=str(tmp_path / "data"),
        DVEMB_RECONCILE_SECONDS="0.5",
        DVEMB_OUTBOX_GRACE_SECONDS="1",
        DVEMB_VALIDATION_WAIT_SECONDS="2",
        DVEMB_JOB_LEASE_SECONDS="3",
        OMP_NUM_THREADS="1",
    )
    made = subprocess.run(
        [sys.executable, "-m", "dvemb.cli", "token", "--project", "outage"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    token = made.stdout.strip().splitlines()[-1]
    worker = Worker(env)
    try:
        with api_process(env) as url:
            worker.start()
            try:
                yield url, token, redis_server
            finally:
                worker.stop()
    finally:
        redis_server.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def test_tasks_sent_while_the_broker_is_down_go_out_when_it_is_back(
    own_services: tuple[str, str, RedisServer], tmp_path: Path
) -> None:
    url, token, redis_server = own_services
    log = record_log(tmp_path / "log")
    ready = upload_log(log, server=url, token=token, run_name="before")
    assert ready["status"] == "ready", ready
    api = Api(url, token)
    try:
        redis_server.stop()
        # A job started while the broker is down: accepted (its task waits in the outbox), not a 500.
        started = api.post(f"/runs/{ready['run']}/jobs", json={"top_k": 5})
        assert started.status_code == 201, started.text
        job_id = started.json()["id"]
        # A file uploaded while the broker is down: its bytes are kept and its validation waits too.
        run_id = api.post("/runs", json={"name": "during"}).json()["id"]
        manifest = (log / "manifest.json").read_bytes()
        meta = "filename " + base64.b64encode(b"manifest.json").decode()
        created = api.post(
            f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(len(manifest)), "Upload-Metadata": meta}
        )
        assert created.status_code == 201, created.text
        patched = api.patch(
            created.headers["Location"],
            content=manifest,
            headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        )
        assert patched.status_code == 204, patched.text
        time.sleep(2)  # several reconciler passes find the broker still down
        assert api.get(f"/jobs/{job_id}").json()["status"] == "queued"
        assert [f["status"] for f in api.get(f"/runs/{run_id}").json()["files"]] == ["received"]

        redis_server.start()  # back, empty: only the outbox knows what is owed
        job = api.wait_job(job_id, timeout=120)
        assert job["status"] == "succeeded", job
        deadline = time.monotonic() + 60
        while (files := api.get(f"/runs/{run_id}").json()["files"])[0]["status"] != "ready":
            assert time.monotonic() < deadline, files
            time.sleep(0.2)
        top = api.get(f"/jobs/{job_id}/top", params={"query_set": "val", "limit": 3})
        assert top.status_code == 200 and len(top.json()["data"]) == 3
    finally:
        api.client.close()
