"""Process-wide resources (engines, the Celery sender, storage) are made once, even when their first callers
arrive together: ``functools.lru_cache`` let each of them make its own, and the dropped engines' pools held their
PostgreSQL connections until a garbage collection (a ResourceWarning in whichever test ran then)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from server.once import made_once

ROOT = Path(__file__).resolve().parents[2]


def _together(call: object, threads: int = 8) -> list[object]:
    """``call()`` from ``threads`` threads released at once; their results."""
    barrier, results = threading.Barrier(threads), []

    def run() -> None:
        barrier.wait()
        results.append(call())  # type: ignore[operator]

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def test_concurrent_first_callers_share_one_making() -> None:
    calls = []

    @made_once
    def slow() -> object:
        calls.append(1)
        time.sleep(0.05)  # long enough that every thread misses the cache before the first one fills it
        return object()

    results = _together(slow)
    assert len(calls) == 1 and len({id(r) for r in results}) == 1
    slow.cache_clear()
    assert slow() is not results[0] and len(calls) == 2  # made again after clearing


def test_results_are_cached_per_arguments() -> None:
    @made_once
    def make(a: int, b: str = "x") -> tuple[int, str, object]:
        return a, b, object()

    assert make(1) is make(1) and make(1) is not make(2) and make(1, "y")[1] == "y"


def test_a_forked_child_is_not_blocked_by_a_lock_held_in_the_parent() -> None:
    @made_once
    def make() -> int:
        return os.getpid()

    with make._lock:  # another thread of the parent making it when the fork happens
        pid = os.fork()
        if pid == 0:  # the child: exits 0 only if it can make its own
            os._exit(0 if make() == os.getpid() else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError("the forked child waited on the parent's lock")


# A fresh process (nothing imported, no engine made yet: the first create_engine is slow) whose threads all ask
# for each resource at once.
_FIRST_CALLS = """
import json, threading
from server.db.session import get_engine, get_read_engine
from server.storage import get_storage
from server.tasks import sender
seen = {}
for get in (get_engine, get_read_engine, sender, get_storage):
    barrier, got = threading.Barrier(8), []
    def run():
        barrier.wait()
        got.append(id(get()))
    threads = [threading.Thread(target=run) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    seen[get.__name__] = len(set(got))
print(json.dumps(seen))
"""


def test_the_service_makes_each_resource_once_under_concurrent_first_calls(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DVEMB_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",  # engines connect lazily
        "DVEMB_DATA_DIR": str(tmp_path),
    }
    env.pop("DVEMB_STORAGE_URL", None)
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_CALLS], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "get_engine": 1,
        "get_read_engine": 1,
        "sender": 1,
        "get_storage": 1,
    }
