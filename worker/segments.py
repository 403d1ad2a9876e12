"""A segmented job on any number of Celery workers (influence checkpointing, dvemb/engine/segmented.py).

The job's own task (which holds the job's lease) plans the segments, sends one ``dvemb.compute_segment``
task per unfinished segment, and then works through the segments itself: it claims one nobody holds,
runs it, and repeats; once every segment is finished (by it or by other workers) it combines them.
A claim is a file created exclusively next to the segment's result and kept fresh by a heartbeat; a
claim whose worker died goes stale after the job's lease and is taken over. Segment results are
deterministic and written atomically, so a segment run twice (a race on a stale claim, a task
delivered twice) costs time, never correctness; a finished segment is never run again, so a killed
worker's segment reruns alone. With one worker process the job's task simply runs every segment.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvemb.engine import ComputeArguments
from dvemb.engine.segmented import (
    PLAN_FILE,
    SEGMENTS_DIR,
    SegmentPlan,
    combine_segments,
    prepare_segments,
    run_segment,
    segment_done,
)

__all__ = ["compute_segmented_job", "run_segment_task", "segments_planned"]

logger = logging.getLogger(__name__)
_POLL_SECONDS = 0.5


def _claim_path(out: Path, index: int) -> Path:
    return out / SEGMENTS_DIR / f"segment-{index:04d}.claim"


class _Claim:
    """An exclusive claim on one segment, refreshed every third of ``lease`` while held."""

    def __init__(self, path: Path, lease: float) -> None:
        self.path, self.lease = path, lease
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"claim-{path.name}")

    @classmethod
    def take(cls, path: Path, lease: float) -> _Claim | None:
        """The claim, or None when a live claim of another worker holds the segment."""
        try:
            age = time.time() - path.stat().st_mtime
            if age < lease:
                return None
            path.unlink(missing_ok=True)  # its worker stopped refreshing it: take over
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        claim = cls(path, lease)
        claim.thread.start()
        return claim

    def _beat(self) -> None:
        while not self.stopped.wait(self.lease / 3):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self.stopped.set()
        self.thread.join(self.lease)
        self.path.unlink(missing_ok=True)


def _run_claimed(log: Path, out: Path, args: ComputeArguments, plan: SegmentPlan, index: int, lease: float) -> bool:
    """Run segment ``index`` if nobody else holds it; True when this call ran it."""
    claim = _Claim.take(_claim_path(out, index), lease)
    if claim is None:
        return False
    try:
        if not segment_done(out, plan, index):
            run_segment(log, out, args, plan, index)
    finally:
        claim.release()
    return True


def compute_segmented_job(
    log: Path,
    out: Path,
    args: ComputeArguments,
    *,
    lease: float,
    send_segment: Callable[[int], None],
    progress: Callable[[int, int], None],
) -> dict[str, Any]:
    """The job's own task: plan, hand segments out, work on them, wait for the others, combine.

    Args:
        log, out: the job's gradient log and results directory (shared by every worker).
        args: the engine's arguments (``args.segments`` > 1).
        lease: seconds after which a claim that is not refreshed is taken over.
        send_segment: sends ``dvemb.compute_segment`` for a segment index (errors are logged: this task
            then runs the segment itself).
        progress: called with (segments finished, segments) while waiting; may raise to stop.
    """
    plan = prepare_segments(log, out, args, args.segments)
    todo = [j for j in range(plan.num_segments) if not segment_done(out, plan, j)]
    for index in reversed(todo[1:]):  # the first one this task starts at once
        try:
            send_segment(index)
        except Exception:  # the broker is down: this task runs them
            logger.warning("could not send segment %s; running it here", index, exc_info=True)
    while True:
        left = [j for j in range(plan.num_segments) if not segment_done(out, plan, j)]
        progress(plan.num_segments - len(left), plan.num_segments)
        if not left:
            break
        if not any(_run_claimed(log, out, args, plan, j, lease) for j in left):
            time.sleep(_POLL_SECONDS)  # every unfinished segment is running elsewhere
    return combine_segments(log, out, args, plan)


def segments_planned(out: Path) -> bool:
    """Whether a segmented job's plan is in ``out`` (its own task wrote it there and has not finished)."""
    return (out / SEGMENTS_DIR / PLAN_FILE).exists()


def run_segment_task(log: Path, out: Path, args: ComputeArguments, index: int, lease: float) -> None:
    """A ``dvemb.compute_segment`` task: run the segment unless it is finished or held by another worker."""
    plan_path = out / SEGMENTS_DIR / PLAN_FILE
    if not plan_path.exists():
        return  # the job finished (the plan is removed with the scratch files) or was cancelled
    stored = json.loads(plan_path.read_text())
    plan = SegmentPlan(tuple(stored["boundaries"]), str(stored["fingerprint"]))
    if index >= plan.num_segments or segment_done(out, plan, index):
        return
    _run_claimed(log, out, args, plan, index, lease)
