"""Two copies of the suite on one machine flush and use different Redis databases (issue 26)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from service_harness import _CLAIM, PG_ADMIN, REDIS_DB, drop_abandoned_databases


def test_a_second_suite_claims_another_redis_database_and_gives_it_back() -> None:
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "DVEMB_TEST_REDIS_DB"}
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parents[1])])
    code = "import os, service_harness as h; print(h.REDIS_DB, os.environ['DVEMB_TEST_REDIS_DB'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    theirs, exported = (int(v) for v in out.stdout.split())
    assert theirs == exported and theirs != REDIS_DB
    assert redis.Redis(host="127.0.0.1", port=6379, db=0).get(_CLAIM.format(theirs)) is None  # released at exit
    assert redis.Redis(host="127.0.0.1", port=6379, db=0).get(_CLAIM.format(REDIS_DB)) is not None  # ours is held


def _claimed_in_a_child(env: dict[str, str]) -> int:
    here = Path(__file__).resolve().parent
    env = {**env, "PYTHONPATH": os.pathsep.join([str(here), str(here.parents[1])])}
    code = "import service_harness as h; print(h.REDIS_DB)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout)


def test_each_test_process_claims_its_own_and_its_subprocesses_share_it() -> None:
    """pytest-xdist's controller loads the harness too and its workers inherit its environment: a worker claims a
    database of its own instead of the controller's, while a process started by a worker shares the worker's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DVEMB_TEST_REDIS_DB", "PYTEST_XDIST"))}
    claimed = {"DVEMB_TEST_REDIS_DB": str(REDIS_DB), "DVEMB_TEST_REDIS_DB_CLAIMER": "gw0"}
    inherited_by_another_worker = {**base, **claimed, "PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}
    assert _claimed_in_a_child(inherited_by_another_worker) != REDIS_DB
    started_by_that_worker = {**base, **claimed, "PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2"}
    assert _claimed_in_a_child(started_by_that_worker) == REDIS_DB
    by_hand = {**base, "DVEMB_TEST_REDIS_DB": "9", "PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2"}
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _claimed_in_a_child(by_hand)
    assert "is set by hand for 2 test processes" in failed.value.stderr


def test_databases_of_killed_suites_are_dropped_and_live_ones_kept() -> None:
    """A suite killed before its teardown leaves its PostgreSQL database behind; the next session drops it, and
    never one whose suite still runs."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    abandoned, live = f"dvemb_test_{gone.pid}_dead000000", f"dvemb_test_{os.getpid()}_a11ce00000"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        for name in (abandoned, live):
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            dropped = drop_abandoned_databases(conn)
            assert abandoned in dropped and live not in dropped
            left = {row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall()}
            assert abandoned not in left and live in left
        finally:
            for name in (abandoned, live):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_test_processes_share_the_cores_instead_of_oversubscribing_them() -> None:
    """Under pytest-xdist each process runs its share of the cores' math threads and passes it on to what it starts
    (tests/conftest.py); alone, a process keeps PyTorch's default."""
    import torch

    from tests.conftest import threads_per_process

    assert [threads_per_process(2, n) for n in (1, 2, 3)] == [2, 1, 1]
    assert threads_per_process(16, 2) == 8 and threads_per_process(1, 0) == 1
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) <= 1:
        return  # one process: nothing to share (the unit checks above still run)
    chosen = int(os.environ["OMP_NUM_THREADS"])
    assert torch.get_num_threads() == chosen
    code = "import torch; print(torch.get_num_threads())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert int(child.stdout) == chosen  # a Celery worker or a training subprocess inherits the share
