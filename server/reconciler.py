"""The reconciler: what the broker could not be trusted with, put right from the database, periodically.

Several things can leave a row waiting for a task that will never come:

* the broker was down when the task was sent: its outbox entry (server/tasks.py) is still there; the reconciler
  sends it once it is due, and deletes it once the broker has it;
* a job's worker died (killed, out of memory) and its message is gone with it (the filesystem broker of the
  embedded mode deletes a message when a worker takes it; a Redis message comes back only after the visibility
  timeout): the job stays ``running`` with a lease nobody renews. Once the lease has expired, the reconciler
  moves the job back to ``queued`` and queues a compute task in the same transaction; the next worker resumes
  from the engine's checkpoint, and the attempt cap (worker/computation.py) still stops a job that kills every
  worker;
* likewise a file whose validator died stays ``validating``: it moves back to ``received`` with a new
  validation task, and the cap (worker/validation.py) rejects a file that kills every validator, saying so;
* a message lost after it was sent (a worker killed while it held the task prefetched and unstarted, a broker
  restarted without its queue) leaves a job ``queued`` or a file ``received`` with no lease, no outbox entry and
  nothing in the broker: every row waiting for a task has a deadline (server/db/leases.py, ``task_deadline``),
  past which its task is sent again.

Every API process runs one (a thread started by the app's lifespan, every ``DVEMB_RECONCILE_SECONDS``); they
may run side by side: each move is a compare-and-set, and every task is idempotent.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from server.db.leases import requeue_expired, resend_overdue
from server.db.models import Job, LogFile, OutboxTask, ReplayJob
from server.db.states import FileStatus, JobStatus, ReplayStatus
from server.settings import get_settings
from server.tasks import COMPUTE, REPLAY, VALIDATE_FILE, send_outboxed

__all__ = [
    "Reconciler",
    "reconcile_once",
    "release_lost_worker",
    "requeue_expired_files",
    "requeue_expired_jobs",
    "requeue_expired_replays",
    "resend_overdue_tasks",
    "send_due_tasks",
]

logger = logging.getLogger(__name__)

BATCH = 200  # outbox entries handled per pass: a long backlog is worked off over several passes


def requeue_expired_jobs(factory: sessionmaker[Session]) -> int:
    """Queue again every running job whose lease has expired (its worker is gone); returns how many."""
    moved = requeue_expired(factory, Job, working=JobStatus.RUNNING, waiting=JobStatus.QUEUED, task=COMPUTE)
    for job_id in moved:
        logger.warning("job %s lost its worker (lease expired): queued again", job_id)
    return len(moved)


def requeue_expired_replays(factory: sessionmaker[Session]) -> int:
    """Queue again every running replay whose lease has expired; its next worker resumes from the checkpoints the
    last one left in storage (worker/replays.py). Returns how many."""
    moved = requeue_expired(factory, ReplayJob, working=ReplayStatus.RUNNING, waiting=ReplayStatus.QUEUED, task=REPLAY)
    for replay_id in moved:
        logger.warning("replay %s lost its worker (lease expired): queued again", replay_id)
    return len(moved)


def requeue_expired_files(factory: sessionmaker[Session]) -> int:
    """Queue again every file being validated whose lease has expired (its validator is gone); returns how many."""
    working, waiting = FileStatus.VALIDATING, FileStatus.RECEIVED
    moved = requeue_expired(factory, LogFile, working=working, waiting=waiting, task=VALIDATE_FILE)
    for file_id in moved:
        logger.warning("file %s lost its validator (lease expired): queued again", file_id)
    return len(moved)


def release_lost_worker(factory: sessionmaker[Session]) -> int:
    """The only worker died (the embedded mode's local worker, which ``dvemb serve`` restarts): every running job
    and every file being validated was its, so their leases end now and they are queued again at once, instead of
    showing ``running`` until the lease would have expired. Never call it where other workers may hold leases.
    Returns how many rows were queued again."""
    now = dt.datetime.now(dt.UTC)
    with factory() as session:
        lost = ((Job, JobStatus.RUNNING), (LogFile, FileStatus.VALIDATING), (ReplayJob, ReplayStatus.RUNNING))
        for model, working in lost:
            session.execute(
                update(model)
                .where(model.status == working, model.lease_expires_at.is_not(None), model.lease_expires_at > now)
                .values(lease_expires_at=now - dt.timedelta(microseconds=1))
            )
        session.commit()
    return requeue_expired_jobs(factory) + requeue_expired_files(factory) + requeue_expired_replays(factory)


def resend_overdue_tasks(factory: sessionmaker[Session]) -> int:
    """Send again the task of every queued job and received file past its deadline (its message is lost); returns
    how many. A file waiting for its manifest (noted in ``error``) waits for no task."""
    jobs = resend_overdue(factory, Job, waiting=JobStatus.QUEUED, task=COMPUTE)
    files = resend_overdue(
        factory, LogFile, waiting=FileStatus.RECEIVED, task=VALIDATE_FILE, expects_task=LogFile.error.is_(None)
    )
    replays = resend_overdue(factory, ReplayJob, waiting=ReplayStatus.QUEUED, task=REPLAY)
    for kind, ids in (("job", jobs), ("file", files), ("replay", replays)):
        for row_id in ids:
            logger.warning("%s %s waited past its deadline for a worker: its task is sent again", kind, row_id)
    return len(jobs) + len(files) + len(replays)


def send_due_tasks(factory: sessionmaker[Session]) -> int:
    """Send the outbox entries that are due (their request could not send them); returns how many went out."""
    now = dt.datetime.now(dt.UTC)
    again = now + dt.timedelta(seconds=max(get_settings().outbox_grace_seconds, 1.0))
    claimed: list[tuple[int, str, list[object]]] = []
    with factory() as session:
        due = session.execute(
            select(OutboxTask.id, OutboxTask.name, OutboxTask.args, OutboxTask.sends)
            .where(OutboxTask.due_at <= now)
            .order_by(OutboxTask.id)
            .limit(BATCH)
        ).all()
        for entry_id, name, args, sends in due:
            # Claim: of two reconcilers, one sends; a claim whose sender dies is due again at ``again``.
            taken = session.execute(
                update(OutboxTask)
                .where(OutboxTask.id == entry_id, OutboxTask.sends == sends)
                .values(sends=sends + 1, due_at=again)
            )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append((entry_id, name, list(args)))
        session.commit()
    if not claimed:
        return 0
    bind = factory.kw["bind"]
    sent = send_outboxed(bind, claimed)
    if sent:
        logger.warning("sent %d task(s) that had waited in the outbox", sent)
    return sent


def reconcile_once(factory: sessionmaker[Session]) -> None:
    """One pass: expired leases and overdue waits first (their new tasks go out through the outbox), then due outbox
    entries."""
    requeue_expired_jobs(factory)
    requeue_expired_files(factory)
    requeue_expired_replays(factory)
    resend_overdue_tasks(factory)
    send_due_tasks(factory)


class Reconciler:
    """Runs :func:`reconcile_once` every ``interval`` seconds on a daemon thread until stopped."""

    def __init__(self, factory: sessionmaker[Session], interval: float) -> None:
        self.factory, self.interval = factory, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="dvemb-reconciler")

    def start(self) -> Reconciler:
        if self.interval > 0:
            self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(10)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                reconcile_once(self.factory)
            except Exception:  # a database hiccup: try again at the next pass, never stop reconciling
                logger.warning("reconciler pass failed", exc_info=True)
