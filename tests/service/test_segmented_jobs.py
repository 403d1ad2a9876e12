"""Segmented jobs (influence checkpointing) on real Celery workers: two worker processes share a job's
segments and the stored rows are those of the sequential engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from service_harness import Api, Worker, record_log
from test_jobs import _rows

from dvemb.client import upload_log
from server.db.models import Job
from server.db.session import session_factory


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
