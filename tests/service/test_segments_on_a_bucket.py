"""Issue 25.2: a segmented job on two worker processes that share no filesystem (each its own data and scratch
directory; logs, segments and results in a bucket of a real S3-compatible server), one of them killed mid-segment:
the job completes on the other, the killed segment is run again elsewhere, and the stored rows are those of the
sequential engine."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from service_harness import PG_ADMIN, Api, S3Server, Worker, record_log
from test_object_storage import _BucketService, _serve_from_a_bucket
from test_segmented_jobs import _close

from dvemb.client import upload_log


@pytest.fixture(scope="module")
def two_machines(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_BucketService]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in s3_server.env.items():
            monkeypatch.setenv(key, value)
        yield from _serve_from_a_bucket(s3_server, tmp_path_factory.mktemp("machines"), workers=2)


def _connect(database: str) -> psycopg.Connection[Any]:
    return psycopg.connect(PG_ADMIN.replace("dbname=postgres", f"dbname={database}"), autocommit=True)


def _rows(database: str, job_id: int) -> dict[str, list[tuple[object, ...]]]:
    """The job's stored rows, as tests/service/test_jobs.py reads them from the suite's own database."""
    with _connect(database) as conn:
        top = conn.execute(
            "SELECT query_set, query, kind, rank, score, step, example_id FROM topk_rows WHERE job_id = %s "
            "ORDER BY query, kind, rank",
            (job_id,),
        ).fetchall()
        totals = conn.execute(
            "SELECT example_id, total, occurrences FROM example_totals WHERE job_id = %s ORDER BY example_id",
            (job_id,),
        ).fetchall()
        curve = conn.execute(
            "SELECT step, mean FROM curve_points WHERE job_id = %s ORDER BY step", (job_id,)
        ).fetchall()
    return {"top": [tuple(r) for r in top], "totals": [tuple(r) for r in totals], "curve": [tuple(r) for r in curve]}


def _parent_of(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))


def _running_segment(database: str, job_id: int, workers: list[Worker]) -> tuple[int, str, Worker, int] | None:
    """A segment that a worker process of ``workers`` is computing now: (segment, host:pid, worker, pid)."""
    with _connect(database) as conn:
        running = conn.execute(
            "SELECT segment, process FROM job_segments WHERE job_id = %s AND status = 'running'", (job_id,)
        ).fetchall()
    for segment, process in running:
        pid = int(process.rsplit(":", 1)[1])
        for worker in workers:
            assert worker.process is not None
            if pid == worker.process.pid or _parent_of(pid) == worker.process.pid:
                return segment, process, worker, pid
    return None


def test_two_machines_share_a_segmented_job_and_survive_a_killed_worker(
    two_machines: _BucketService, tmp_path: Path
) -> None:
    log = record_log(tmp_path / "log", steps=240, batch=8, shard_steps=3, dim=48)
    api = Api(two_machines.url, two_machines.token)
    try:
        result = upload_log(log, server=two_machines.url, token=two_machines.token, run_name="two-machines")
        assert result["status"] == "ready", result
        run_id = int(result["run"])
        sequential = api.wait_job(api.post(f"/runs/{run_id}/jobs", json={"top_k": 20, "segments": 1}).json()["id"])
        assert sequential["status"] == "succeeded", sequential
        job_id = int(api.post(f"/runs/{run_id}/jobs", json={"top_k": 20, "segments": 12}).json()["id"])
        deadline = time.monotonic() + 120
        found = None
        while found is None:  # kill a worker while it computes a segment (its task process and the worker)
            assert time.monotonic() < deadline, api.get(f"/jobs/{job_id}").json()
            found = _running_segment(two_machines.database, job_id, two_machines.workers)
            time.sleep(0.01)
        segment, process, victim, pid = found
        if pid != victim.process.pid:  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
        victim.kill()
        job = api.wait_job(job_id, timeout=240)
        assert job["status"] == "succeeded", job
        summary = api.get(f"/jobs/{job_id}/summary").json()
        processes = summary["segment_processes"]
        assert summary["segments"] == 12 and len(processes) == 12
        assert processes[segment] != process  # the killed segment was run again, by the other machine
        _close(_rows(two_machines.database, job_id), _rows(two_machines.database, int(sequential["id"])))
        # Nothing went through a shared directory: neither machine has a storage directory, and the job's segment
        # files and its rows in job_segments are gone once combined.
        for name, directory in two_machines.dirs.items():
            assert not (directory / "storage").exists(), name
        keys = two_machines.keys(f"service/runs/{run_id}/results/{job_id}")
        assert keys and not [k for k in keys if "/segments/" in k], keys
        with _connect(two_machines.database) as conn:
            left = conn.execute("SELECT count(*) FROM job_segments WHERE job_id = %s", (job_id,)).fetchone()
        assert left == (0,)
    finally:
        api.client.close()
        for worker in two_machines.workers:  # the module's fixture stops them; a killed one is restarted first
            if worker.process is not None and worker.process.poll() is not None:
                worker.start()
