"""A segmented job on any number of Celery workers, on machines that share nothing but the database, the broker and
the storage (influence checkpointing, dvemb/engine/segmented.py).

The job's own task (which holds the job's lease) plans the segments, puts the plan into the storage under the job's
results (``segments/plan.json``) and one row per segment into ``job_segments``, sends one ``dvemb.compute_segment``
task per unfinished segment, and then works through the segments itself: it claims one nobody holds, runs it, and
repeats; once every segment is done (by it or by other workers) it fetches the segments' files it lacks from the
storage and combines them.

A segment is claimed through the database with the jobs' own lease (server/db/leases.py, Lease: a compare-and-set,
renewed by a heartbeat), so a claim whose worker died expires after the job's lease and is taken over. A worker runs
its segment in its own working directory, puts the segment's two files into the storage, and only then marks it done
(conditional on its claim). Segment results are deterministic and written atomically, so a segment run twice (a
takeover race) costs time, never correctness; a done segment is never run again, so a killed worker's segment reruns
alone. With one worker process the job's task simply runs every segment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, select

from dvemb.atomic import replacing
from dvemb.engine import ComputeArguments
from dvemb.engine.segmented import (
    PLAN_FILE,
    SEGMENTS_DIR,
    SegmentPlan,
    combine_segments,
    prepare_segments,
    run_segment,
    segment_done,
    segment_file_names,
)
from server.db.leases import Lease
from server.db.models import JobSegment
from server.db.session import session_factory
from server.db.states import SegmentStatus, transition
from server.storage import Storage, results_key

__all__ = ["SegmentedJob", "compute_segmented_job", "run_segment_task", "stored_plan"]

logger = logging.getLogger(__name__)
_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class SegmentedJob:
    """What every worker of a segmented job needs: the job, its log (a local copy), this machine's working
    directory for its results, the engine's arguments, the storage and the lease."""

    job_id: int
    run_id: int
    log: Path
    out: Path
    args: ComputeArguments
    storage: Storage
    lease: float

    def key(self, name: str) -> str:
        """The storage key of a file of the job's segments."""
        return results_key(self.run_id, self.job_id, f"{SEGMENTS_DIR}/{name}")

    def local(self, name: str) -> Path:
        """The same file in this machine's working directory."""
        return self.out / SEGMENTS_DIR / name


def compute_segmented_job(
    job: SegmentedJob, *, send_segment: Callable[[int], None], progress: Callable[[int, int], None]
) -> dict[str, Any]:
    """The job's own task: plan, hand segments out, work on them, wait for the others, fetch, combine.

    Args:
        job: the job (``job.args.segments`` > 1).
        send_segment: sends ``dvemb.compute_segment`` for a segment index (errors are logged: this task then runs
            the segment itself).
        progress: called with (segments done, segments) while waiting; may raise to stop.
    """
    plan = prepare_segments(job.log, job.out, job.args, job.args.segments)
    job.storage.write_bytes(job.key(PLAN_FILE), json.dumps(plan.to_json()).encode())
    _plan_rows(job.job_id, plan)
    todo = _unfinished(job.job_id)
    for index in reversed(todo[1:]):  # the first one this task starts at once
        try:
            send_segment(index)
        except Exception:  # the broker is down: this task runs them
            logger.warning("could not send segment %s; running it here", index, exc_info=True)
    while True:
        left = _unfinished(job.job_id)
        progress(plan.num_segments - len(left), plan.num_segments)
        if not left:
            break
        if not any(_run_claimed(job, plan, j) for j in left):
            time.sleep(_POLL_SECONDS)  # every unfinished segment is running elsewhere
    _fetch_segments(job, plan)
    summary = combine_segments(job.log, job.out, job.args, plan)
    # The rows first: a worker killed between the two leaves files that a retry's new plan overwrites, never rows
    # marked done whose files are gone.
    with session_factory()() as session:
        session.execute(delete(JobSegment).where(JobSegment.job_id == job.job_id))
        session.commit()
    job.storage.delete_prefix(results_key(job.run_id, job.job_id, SEGMENTS_DIR))
    return summary


def stored_plan(job: SegmentedJob) -> SegmentPlan | None:
    """The plan the job's own task stored, or None (not planned yet, or the job has combined its segments)."""
    try:
        stored = json.loads(job.storage.read_bytes(job.key(PLAN_FILE)))
    except FileNotFoundError:
        return None
    return SegmentPlan(tuple(stored["boundaries"]), str(stored["fingerprint"]))


def run_segment_task(job: SegmentedJob, index: int) -> None:
    """A ``dvemb.compute_segment`` task: run the segment unless it is done or held by another worker."""
    plan = stored_plan(job)
    if plan is None or index >= plan.num_segments:
        return  # the job finished (its segments are removed once combined), was cancelled, or is re-planning
    _run_claimed(job, plan, index, keep_local=job.storage.workdir_is_shared)


def _process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _plan_rows(job_id: int, plan: SegmentPlan) -> None:
    """One waiting row per segment of ``plan``, unless the rows of this plan are there (a resumed job keeps its done
    segments); rows of another plan are replaced."""
    with session_factory()() as session:
        rows = session.scalars(select(JobSegment).where(JobSegment.job_id == job_id)).all()
        if len(rows) == plan.num_segments and all(row.plan == plan.fingerprint for row in rows):
            return
        session.execute(delete(JobSegment).where(JobSegment.job_id == job_id))
        session.add_all(
            JobSegment(job_id=job_id, segment=j, plan=plan.fingerprint, status=SegmentStatus.WAITING)
            for j in range(plan.num_segments)
        )
        session.commit()


def _unfinished(job_id: int) -> list[int]:
    with session_factory()() as session:
        return list(
            session.scalars(
                select(JobSegment.segment)
                .where(JobSegment.job_id == job_id, JobSegment.status != SegmentStatus.DONE)
                .order_by(JobSegment.segment)
            )
        )


def _run_claimed(job: SegmentedJob, plan: SegmentPlan, index: int, *, keep_local: bool = True) -> bool:
    """Run segment ``index`` if nobody else holds it and it is not done; True when this call ran it.
    ``keep_local``: False for a helper on a bucket, whose copies go once they are in the storage, before the segment
    is marked done (a job's task on the same machine, seeing it done, then fetches it rather than finding files
    that are about to go)."""
    # The jobs' Lease (server/db/leases.py), with what a segment did before it: one that another live worker holds
    # is skipped, not waited for (raise_if_held=False: the caller moves on to another segment, or polls); it has
    # no attempt cap of its own (no gave_up: the job's cap counts the job's own task, which takes over a segment
    # whose worker died); and no claim of a segment is handed back after a database error (no retries given: a
    # helper's dvemb.compute_segment task passes none, and the job's own task hands back the job's claim,
    # worker/computation.py); the segment's lease expires and it is run again.
    segment = and_(JobSegment.job_id == job.job_id, JobSegment.segment == index, JobSegment.plan == plan.fingerprint)
    with Lease(
        JobSegment,
        segment,
        working=SegmentStatus.RUNNING,
        waiting=SegmentStatus.WAITING,
        lease=job.lease,
        raise_if_held=False,
        process=_process(),
    ) as held:
        if not held:
            return False
        run_segment(job.log, job.out, job.args, plan, index)
        for name in segment_file_names(index):  # the done marker (the .safetensors) last
            job.storage.put_file(job.key(name), job.local(name))
        if not keep_local:
            for name in segment_file_names(index):
                job.local(name).unlink(missing_ok=True)
        with session_factory()() as session:
            row = session.get(JobSegment, held.row.id)
            if row is not None:  # a worker that took the segment over meanwhile marks it done itself
                transition(session, row, SegmentStatus.DONE, when=held.mine)
            session.commit()
    return True


def _fetch_segments(job: SegmentedJob, plan: SegmentPlan) -> None:
    """Copy into this machine's working directory the files of the segments other machines ran."""
    for index in range(plan.num_segments):
        if segment_done(job.out, plan, index):
            continue
        for name in segment_file_names(index):
            with replacing(job.local(name), unique=True) as tmp:
                shutil.copyfile(job.storage.local_file(job.key(name)), tmp)
