"""No accepted file or job waits for ever (issue 21, item 2): a task whose message was lost after it was sent (a
worker killed while it held the task prefetched, a broker that lost its queue) is sent again by the API's
reconciler once the row's deadline has passed; the worker then does the work once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from service_harness import Api, record_log, wait_until
from sqlalchemy import update
from test_validation_recovery import OTHER, SHARD, _file, _ready_to_validate

from dvemb.client import upload_log
from server.db.models import Job, LogFile
from server.db.session import session_factory
from server.db.states import FileStatus


def _past(seconds: float = 1.0) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)


def test_a_received_file_whose_task_was_lost_is_validated(api: Api, tmp_path: Path) -> None:
    _, ids, _ = _ready_to_validate(tmp_path)  # two shards received, their tasks never sent (as if lost)
    shards = [ids[SHARD], ids[OTHER]]
    with session_factory()() as session:
        session.execute(update(LogFile).where(LogFile.id.in_(shards)).values(lease_expires_at=_past()))
        session.commit()
    wait_until(
        lambda: all(_file(i).status == FileStatus.READY for i in shards),
        60,
        "received files past their deadline were never validated",
    )
    assert [_file(i).attempts for i in shards] == [1, 1]


def test_a_queued_job_whose_task_was_lost_runs(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log", steps=8, batch=8, shard_steps=4)
    run_id = int(upload_log(log, server=api.url, token=token, run_name="lost")["run"])
    with session_factory()() as session:
        # queued, no message anywhere: one past its deadline, one from before deadlines were kept (none, and old)
        overdue = Job(run_id=run_id, options={}, lease_expires_at=_past())
        old = Job(run_id=run_id, options={}, created_at=_past(3600))
        session.add_all([overdue, old])
        session.commit()
        job_ids = [overdue.id, old.id]
    for job_id in job_ids:
        job = api.wait_job(job_id, timeout=90)
        assert job["status"] == "succeeded", job
    with session_factory()() as session:
        assert [session.get(Job, i).attempts for i in job_ids] == [1, 1]  # type: ignore[union-attr]
