"""Jobs: a worker killed mid-job resumes and writes exactly the rows of an uninterrupted run; cancel; retry."""

from __future__ import annotations

import time
from pathlib import Path

from service_harness import Api, Worker, record_log
from sqlalchemy import select

from dvemb.client import upload_log
from server.db.models import CurvePoint, ExampleTotal, TopKRow
from server.db.session import session_factory


def _rows(job_id: int) -> dict[str, list[tuple[object, ...]]]:
    with session_factory()() as session:
        top = session.execute(
            select(
                TopKRow.query_set,
                TopKRow.query,
                TopKRow.kind,
                TopKRow.rank,
                TopKRow.score,
                TopKRow.step,
                TopKRow.example_id,
            )
            .where(TopKRow.job_id == job_id)
            .order_by(TopKRow.query, TopKRow.kind, TopKRow.rank)
        ).all()
        totals = session.execute(
            select(ExampleTotal.example_id, ExampleTotal.total, ExampleTotal.occurrences)
            .where(ExampleTotal.job_id == job_id)
            .order_by(ExampleTotal.example_id)
        ).all()
        curve = session.execute(
            select(CurvePoint.step, CurvePoint.mean).where(CurvePoint.job_id == job_id).order_by(CurvePoint.step)
        ).all()
    return {"top": [tuple(r) for r in top], "totals": [tuple(r) for r in totals], "curve": [tuple(r) for r in curve]}


def _long_run(api: Api, token: str, tmp_path: Path, name: str) -> int:
    log = record_log(tmp_path / name, steps=240, batch=8, shard_steps=3, dim=48)
    result = upload_log(log, server=api.url, token=token, run_name=name)
    if result["status"] != "ready":
        files = api.get(f"/runs/{result['run']}").json()["files"]
        raise AssertionError([(f["name"], f["status"], f["error"]) for f in files][:8])
    return int(result["run"])


def _short_run(api: Api, token: str, tmp_path: Path, name: str) -> int:
    """A run for the tests that call the task in this process on a job's row set up by hand: no worker races them,
    so the job need not last (the default small log: 12 steps)."""
    result = upload_log(record_log(tmp_path / name), server=api.url, token=token, run_name=name)
    assert result["status"] == "ready", result
    return int(result["run"])


def test_killed_worker_resumes_with_identical_rows(api: Api, token: str, worker: Worker, tmp_path: Path) -> None:
    run_id = _long_run(api, token, tmp_path, "long")
    reference = api.wait_job(api.post(f"/runs/{run_id}/jobs", json={"top_k": 20}).json()["id"])
    assert reference["status"] == "succeeded"

    job_id = api.post(f"/runs/{run_id}/jobs", json={"top_k": 20}).json()["id"]
    deadline = time.monotonic() + 60
    while True:  # kill the worker once the job is under way (progress is written from the first shard on)
        job = api.get(f"/jobs/{job_id}").json()
        if job["status"] == "running" and 0 < job["progress"] < 0.9:
            break
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.01)
    worker.kill()
    killed_at = api.get(f"/jobs/{job_id}").json()["progress"]
    assert killed_at < 1.0
    worker.start()  # the unacknowledged task is redelivered; the engine resumes from its checkpoint
    job = api.wait_job(job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0
    assert _rows(job_id) == _rows(reference["id"])
    assert len(_rows(job_id)["curve"]) == 240


def test_cancel_and_retry(api: Api, token: str, tmp_path: Path) -> None:
    run_id = _long_run(api, token, tmp_path, "cancel-me")
    job_id = api.post(f"/runs/{run_id}/jobs", json={}).json()["id"]
    cancelled = api.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    time.sleep(1.0)
    assert api.get(f"/jobs/{job_id}").json()["status"] == "cancelled"  # the worker stopped or skipped it
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 409
    assert api.get(f"/jobs/{job_id}/top", params={"query_set": "val"}).status_code == 409
    retried = api.post(f"/jobs/{job_id}/retry")
    assert retried.status_code == 200 and retried.json()["status"] == "queued"
    assert api.wait_job(job_id)["status"] == "succeeded"
    assert api.post(f"/jobs/{job_id}/retry").status_code == 409


def test_a_job_that_keeps_losing_its_worker_fails_with_the_reason(
    api: Api, token: str, worker: Worker, tmp_path: Path
) -> None:
    """Issue 13, item 7: a job whose worker dies every time (out of memory) was redelivered for ever. Here the
    job is already at the attempt cap when its task is delivered once more: it fails, saying why."""
    from sqlalchemy import update

    from server.db.models import Job
    from server.db.session import session_factory
    from server.settings import get_settings
    from worker.computation import run_compute

    run_id = _short_run(api, token, tmp_path, "doomed")
    worker.kill()  # no real worker takes the task while the row is set up
    try:
        job_id = api.post(f"/runs/{run_id}/jobs", json={}).json()["id"]
        cap = get_settings().task_max_attempts
        with session_factory()() as session:
            # running with no lease (its worker died); queued, the row held the deadline for its task instead
            values = {"status": "running", "attempts": cap, "lease_expires_at": None}
            session.execute(update(Job).where(Job.id == job_id).values(**values))
            session.commit()
        run_compute(job_id)  # the redelivered task
    finally:
        worker.start()
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed" and f"started {cap} times" in job["error"], job
    retried = api.post(f"/jobs/{job_id}/retry").json()
    assert retried["status"] == "queued"
    assert api.wait_job(job_id)["status"] == "succeeded"


def test_a_job_whose_lease_is_alive_is_not_computed_twice(api: Api, token: str, worker: Worker, tmp_path: Path) -> None:
    """Issue 13, item 6: a job longer than the broker's visibility timeout was delivered to a second worker,
    computed twice and ended 'failed' with a duplicate key. A delivery while the job's lease is alive now backs
    off (LeaseHeld: the task retries later) without touching the row; once the lease has expired, it takes over."""
    import datetime as dt

    import pytest
    from sqlalchemy import update

    from server.db.models import Job
    from worker.computation import LeaseHeld, run_compute

    run_id = _short_run(api, token, tmp_path, "lease")
    worker.kill()
    try:
        job_id = api.post(f"/runs/{run_id}/jobs", json={"top_k": 20}).json()["id"]
        alive = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        with session_factory()() as session:  # as if another worker were computing it
            session.execute(update(Job).where(Job.id == job_id).values(status="running", lease_expires_at=alive))
            session.commit()
        with pytest.raises(LeaseHeld):
            run_compute(job_id)
        held = api.get(f"/jobs/{job_id}").json()
        assert held["status"] == "running" and held["progress"] == 0.0
        expired = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        with session_factory()() as session:  # that worker died: its lease ran out
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=expired))
            session.commit()
        run_compute(job_id)
    finally:
        worker.start()
    assert api.get(f"/jobs/{job_id}").json()["status"] == "succeeded"


def test_a_database_error_is_retried_without_counting_as_an_attempt(
    api: Api, token: str, worker: Worker, tmp_path: Path, service_env: dict[str, str]
) -> None:
    """A review finding: a transient database error (here a real lock timeout) made the task retry, and each
    retry counted as a lost worker: with the attempt cap at 1 the job failed, saying its worker had died. The
    attempt is now handed back: the job succeeds on its first counted attempt."""
    import psycopg

    from server.db.models import Job

    log = record_log(tmp_path / "log")
    run_id = upload_log(log, server=api.url, token=token, run_name="locked")["run"]
    url = service_env["DVEMB_DATABASE_URL"]
    impatient = Worker(
        {
            **service_env,
            "DVEMB_DATABASE_URL": url + "?options=-c%20lock_timeout%3D200",  # gives up on a lock after 0.2 s
            "DVEMB_TASK_MAX_ATTEMPTS": "1",
        }
    )
    worker.kill()
    try:
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as locker:
            locker.execute("LOCK TABLE example_totals IN ACCESS EXCLUSIVE MODE")  # held until the block ends
            impatient.start()
            job_id = api.post(f"/runs/{run_id}/jobs", json={}).json()["id"]
            time.sleep(4)  # the job computes in under a second; storing its rows fails on the lock, again and again
            assert api.get(f"/jobs/{job_id}").json()["status"] == "running"
        job = api.wait_job(job_id, timeout=120)
        assert job["status"] == "succeeded", job
        with session_factory()() as session:
            assert session.get(Job, job_id).attempts == 1  # type: ignore[union-attr]
    finally:
        impatient.stop()
        worker.start()
