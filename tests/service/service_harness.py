"""Helpers (not fixtures) for the service tests: ports, tokens, a killable Celery worker, an API client,
a small real log."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
import torch.nn.functional as F

import dvemb

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
#: Redis databases a suite may claim for itself (it flushes the one it gets).
SUITE_REDIS_DBS = range(5, 16)
_CLAIM = "dvemb:test-suite:redis-db:{}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_abandoned_databases(conn: Any) -> list[str]:
    """Drop the test databases of suites that were killed before their teardown (named ``dvemb_test_<pid>_<hex>``
    by the session that made them; that process gone and nobody connected), so that killed runs do not pile up
    databases on a developer's PostgreSQL. Returns the names dropped.

    Args:
        conn: an autocommit psycopg connection to the maintenance database.
    """
    dropped = []
    names = conn.execute(
        "SELECT datname FROM pg_database d WHERE datname ~ '^dvemb_test_[0-9]+_[0-9a-f]+$' "
        "AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)"
    ).fetchall()
    for (name,) in names:
        if not _alive(int(name.split("_")[2])):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')  # without FORCE: a database someone opened stays
            dropped.append(name)
    return dropped


def claim_redis_db() -> int:
    """The Redis database this suite flushes: ``DVEMB_TEST_REDIS_DB`` when set, else the first of
    :data:`SUITE_REDIS_DBS` that no other running suite holds, so that two copies of the suite on one machine
    never take each other's tasks. Claims are keys in database 0 holding the claimer's pid, deleted at exit and
    taken over when that process is gone; the choice is exported so that the suite's subprocesses share it."""
    given = os.environ.get("DVEMB_TEST_REDIS_DB")
    # The process that claimed it exports its xdist worker id with it: pytest-xdist's controller loads this module
    # too (when paths under tests/service are named), and its workers, which inherit its environment, must each
    # claim their own; the subprocesses a worker starts share the worker's.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    claimer = os.environ.get("DVEMB_TEST_REDIS_DB_CLAIMER")
    if given is not None and claimer is not None and claimer != worker:
        given = None
    elif given is not None and claimer is None and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        raise RuntimeError(
            f"DVEMB_TEST_REDIS_DB={given} is set by hand for {os.environ['PYTEST_XDIST_WORKER_COUNT']} test processes, "
            "which would take each other's tasks: unset it (each process claims its own) or run one process "
            "(DVEMB_TEST_PROCESSES=1 bash scripts/test.sh, or pytest without -n)"
        )
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    if given is not None:  # chosen by hand: claimed too when free, so that other suites pass it over
        if client.set(_CLAIM.format(int(given)), os.getpid(), nx=True, ex=12 * 3600):
            atexit.register(release_redis_db, int(given))
        return int(given)
    for db in SUITE_REDIS_DBS:
        key = _CLAIM.format(db)
        holder = client.get(key)
        if holder is not None and not _alive(int(holder)):
            client.delete(key)
        if client.set(key, os.getpid(), nx=True, ex=12 * 3600):
            atexit.register(release_redis_db, db)
            os.environ["DVEMB_TEST_REDIS_DB"] = str(db)
            os.environ["DVEMB_TEST_REDIS_DB_CLAIMER"] = worker
            return db
    raise RuntimeError(
        f"Redis databases {SUITE_REDIS_DBS.start}-{SUITE_REDIS_DBS.stop - 1} are all held by running test suites; "
        "set DVEMB_TEST_REDIS_DB to choose one"
    )


def release_redis_db(db: int) -> None:
    """Give a claimed database back (only if this process still holds it)."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    key = _CLAIM.format(db)
    if client.get(key) == str(os.getpid()).encode():
        client.delete(key)


REDIS_DB = claim_redis_db()


def screenshot_dir() -> Path:
    """Where the browser tests put screenshots: artifacts/ (untracked), or docs/images/ when
    DVEMB_UPDATE_SCREENSHOTS=1 asks to refresh the documentation's pictures."""
    root = Path(__file__).resolve().parents[2]
    folder = root / "docs" / "images" if os.environ.get("DVEMB_UPDATE_SCREENSHOTS") == "1" else root / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_until(condition: Callable[[], object], timeout: float, what: str, *, poll: float = 0.1) -> None:
    """Polls ``condition`` until it is true; fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_process(env: dict[str, str], *, log_level: str = "warning") -> Iterator[str]:
    """The API served by uvicorn in a process of its own with environment ``env``; yields its URL
    (``http://127.0.0.1:PORT``) once it answers HTTP (any status: a database outage answers 503), and terminates it
    on exit."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "server.main:app", "--port", str(port), "--log-level", log_level]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers_http(url), 120, "the API process did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers_http(url: str) -> bool:
    try:
        httpx.get(f"{url}/api/v1/health", timeout=2)
    except httpx.TransportError:  # not listening yet
        return False
    return True


class Worker:
    """A real Celery worker process that tests can kill and restart."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        from server.tasks import worker_command

        command = [*worker_command(), "--loglevel", "INFO"]
        self.process = subprocess.Popen(command, env=self.env, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def watch() -> None:
            assert self.process is not None and self.process.stderr is not None
            try:
                for line in self.process.stderr:
                    if " ready." in line:
                        ready.set()
                    if os.environ.get("DVEMB_TEST_WORKER_LOG"):
                        sys.stderr.write(line)
            except (OSError, ValueError):  # _reap closed the pipe under us: the worker is gone, nothing to watch
                return

        threading.Thread(target=watch, daemon=True).start()
        assert ready.wait(60), "the Celery worker did not start"

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no clean-up, the task stays unacknowledged
        self._reap()

    def _reap(self) -> None:
        assert self.process is not None
        self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self._reap()


def make_token(project: str = "test") -> str:
    from server.db.session import session_factory
    from server.services.auth import create_token, get_or_create_project

    with session_factory()() as session:
        token = create_token(session, project=get_or_create_project(session, name=project))
        session.commit()
    return token


class Api:
    """A small authenticated client."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def wait_job(self, job_id: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.client.get(f"/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish: {job}")


def record_log(
    directory: Path,
    *,
    steps: int = 12,
    batch: int = 8,
    shard_steps: int = 4,
    dim: int = 16,
    seed: int = 0,
    optimizer_name: str = "sgd",
    query_ids: list[str] | None = None,
    id_of: Callable[[int], Any] | None = None,
    label_of: Callable[[int], Any] | None = None,
    text_of: Callable[[int], str] | None = None,
    **recorder_options: Any,
) -> Path:
    """A small real log: an MLP trained with the recorder (plain SGD, or ``"adam"``), one query set;
    ``id_of`` names the i-th example (default: i), ``label_of`` labels it (default: its class), ``text_of`` gives
    it a text (default: none);
    ``recorder_options`` go to the Recorder (``curvature=``, ``projection=``...)."""
    name = id_of or (lambda i: i)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, dim), torch.nn.Tanh(), torch.nn.Linear(dim, 4))
    optimizer = (
        torch.optim.Adam(model.parameters(), lr=0.01)
        if optimizer_name == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.1)
    )
    x, y = torch.randn(steps * batch, 10), torch.randint(0, 4, (steps * batch,))
    rec = dvemb.Recorder(model, directory, proj_dim=64, shard_steps=shard_steps, **recorder_options)
    for step in range(steps):
        rows = list(range(step * batch, (step + 1) * batch))
        with rec.step([name(i) for i in rows], optimizer):
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
            optimizer.zero_grad()
    queries, targets = torch.randn(6, 10), torch.randint(0, 4, (6,))
    rec.record_queries("val", [(queries, targets) if query_ids is None else (queries, targets, query_ids)])
    everyone = list(range(steps * batch))
    sources = ["even" if i % 2 == 0 else "odd" for i in everyone]
    labels = y.tolist() if label_of is None else [label_of(i) for i in everyone]
    texts = None if text_of is None else [text_of(i) for i in everyone]
    rec.describe([name(i) for i in everyone], labels=labels, sources=sources, texts=texts)
    rec.close()
    return directory


class S3Server:
    """A real S3-compatible server process on a free port: moto's standalone server (``moto_server``, installed by
    the dev extra), spoken to over HTTP like any bucket. Its objects live in its memory: stopping it forgets them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The usual variables that point an S3 client (obstore, boto3, the AWS CLI) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "dvemb-test",
            "AWS_SECRET_ACCESS_KEY": "dvemb-test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self) -> None:
        command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                return httpx.get(self.endpoint, timeout=1).status_code < 500
            except httpx.TransportError:
                return False

        wait_until(answers, 60, "moto_server did not start")

    def bucket(self, name: str) -> str:
        """Create a bucket (a test's own: tests do not share objects)."""
        response = httpx.put(f"{self.endpoint}/{name}", timeout=10)
        assert response.status_code == 200, response.text
        return name

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@contextmanager
def settings_env(**variables: str) -> Iterator[None]:
    """The API in this process reads these ``DVEMB_*`` variables within the block (its settings made again on
    entry and on exit)."""
    from server.settings import get_settings

    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in variables.items():
                mp.setenv(name, value)
            get_settings.cache_clear()
            yield
    finally:
        get_settings.cache_clear()
