"""Segmented jobs (influence checkpointing) on real Celery workers: two worker processes share a job's
segments and the stored rows are those of the sequential engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_harness import Api, Worker, record_log
from test_jobs import _rows

from dvemb.client import upload_log
from server.db.models import Job
from server.db.session import session_factory
from server.settings import get_settings
from server.storage import results_dir


@pytest.fixture
def second_worker(service_env: dict[str, str], worker: Worker) -> Iterator[Worker]:
    extra = Worker(service_env)
    extra.start()
    yield extra
    extra.stop()


def _close(a: dict[str, list[tuple[object, ...]]], b: dict[str, list[tuple[object, ...]]]) -> None:
    """Rows equal up to float32 rounding (the two paths sum in different orders)."""
    assert a.keys() == b.keys()
    for key in a:
        assert len(a[key]) == len(b[key]), key
        for left, right in zip(a[key], b[key], strict=True):
            for x, y in zip(left, right, strict=True):
                if isinstance(x, float) and isinstance(y, float):
                    assert x == pytest.approx(y, rel=1e-4, abs=1e-7), (key, left, right)
                else:
                    assert x == y, (key, left, right)


def test_segmented_job_on_two_workers_equals_sequential(
    api: Api, token: str, second_worker: Worker, tmp_path: Path
) -> None:
    log = record_log(tmp_path / "log", steps=160, batch=8, shard_steps=5, dim=48)
    result = upload_log(log, server=api.url, token=token, run_name="segmented")
    assert result["status"] == "ready", result
    run_id = int(result["run"])
    sequential = api.wait_job(api.post(f"/runs/{run_id}/jobs", json={"top_k": 20, "segments": 1}).json()["id"])
    assert sequential["status"] == "succeeded", sequential
    job = api.wait_job(api.post(f"/runs/{run_id}/jobs", json={"top_k": 20, "segments": 6}).json()["id"])
    assert job["status"] == "succeeded", job
    assert job["current_step"] is None  # it counted segments: no 'step 0' shown while they ran
    assert sequential["current_step"] == 0  # the backward pass ends at the first step
    with session_factory()() as session:
        stored = session.get(Job, job["id"])
        assert stored is not None
        summary = stored.summary
    assert summary["segments"] == 6
    assert len(set(summary["segment_processes"])) == 2, summary["segment_processes"]  # both workers computed
    _close(_rows(job["id"]), _rows(sequential["id"]))


def test_segments_option_is_validated(api: Api, token: str) -> None:
    response = api.post("/runs/999999/jobs", json={"segments": 0})
    assert response.status_code == 422
    assert "segments" in response.text


def test_killed_worker_reruns_only_its_segment(api: Api, token: str, worker: Worker, tmp_path: Path) -> None:
    """Kill the only worker once some segments are finished: after a restart the job completes, the segments
    finished before the kill keep the process that computed them (not recomputed), and the rows equal the
    sequential job's."""
    log = record_log(tmp_path / "log", steps=240, batch=8, shard_steps=3, dim=48)
    result = upload_log(log, server=api.url, token=token, run_name="segmented-kill")
    assert result["status"] == "ready", result
    run_id = int(result["run"])
    sequential = api.wait_job(api.post(f"/runs/{run_id}/jobs", json={"top_k": 20, "segments": 1}).json()["id"])
    job_id = api.post(f"/runs/{run_id}/jobs", json={"top_k": 20, "segments": 12}).json()["id"]
    segments_dir = results_dir(get_settings().storage, run_id, job_id) / "segments"
    deadline = time.monotonic() + 120
    while not list(segments_dir.glob("segment-*.safetensors")):  # kill as soon as a segment has finished
        assert time.monotonic() < deadline, api.get(f"/jobs/{job_id}").json()
        time.sleep(0.002)
    worker.kill()
    finished_before = sorted(p.name for p in segments_dir.glob("segment-*.safetensors"))
    assert 0 < len(finished_before) < 12, finished_before
    with session_factory()() as session:
        stored = session.get(Job, job_id)
        assert stored is not None and stored.status == "running"
    worker.start()
    job = api.wait_job(job_id, timeout=180)
    assert job["status"] == "succeeded", job
    with session_factory()() as session:
        stored = session.get(Job, job_id)
        assert stored is not None
        processes = stored.summary["segment_processes"]
    before = {processes[int(name[8:12])] for name in finished_before}
    first_pid = before.pop()
    assert not before  # one process computed every segment finished before the kill...
    assert len(set(processes)) == 2 and processes.count(first_pid) == len(finished_before)  # ...and only those
    _close(_rows(job_id), _rows(sequential["id"]))
