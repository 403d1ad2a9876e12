"""The server's side of the task contract: tasks are sent by name, if and only if the database transaction that
needs them commits (a transactional outbox: an entry written in that transaction, sent after the commit, kept
for the reconciler when the broker is down).

The worker package defines tasks with these names; the server never imports it.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

from celery import Celery
from sqlalchemy import Engine, delete, event, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from server.db.models import OutboxTask
from server.once import made_once
from server.settings import Settings, get_settings

VALIDATE_FILE = "dvemb.validate_file"
COMPUTE = "dvemb.compute"
COMPUTE_SEGMENT = "dvemb.compute_segment"  # one segment of a segmented job (worker/segments.py)
ADHOC_QUERY = "dvemb.adhoc_query"
REPLAY = "dvemb.replay"  # an exact replay of a job's run from its replay bundle (worker/replays.py)
WINDOW_TOPK = "dvemb.window_topk"  # a step range's top examples, read from the scores file (default queue)
GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "celery"
ALL_QUEUES = f"{DEFAULT_QUEUE},{GPU_QUEUE}"  # a worker's queues unless told otherwise
ROUTES = {
    COMPUTE: {"queue": GPU_QUEUE},
    COMPUTE_SEGMENT: {"queue": GPU_QUEUE},
    ADHOC_QUERY: {"queue": GPU_QUEUE},
    REPLAY: {"queue": GPU_QUEUE},
}

logger = logging.getLogger(__name__)


#: Seconds between an idle embedded worker's looks for a task in the filesystem broker's folder.
FILESYSTEM_POLLING_SECONDS = 0.1


def configure(app: Celery, settings: Settings) -> Celery:
    """Broker and reliability settings shared by the API (sender) and the workers."""
    options: dict[str, Any] = {
        "visibility_timeout": settings.task_visibility_timeout,
        # kombu sweeps for tasks of lost workers every interval * throttle seconds (100 s by default).
        "unacked_restore_interval": settings.task_restore_interval,
        "unacked_restore_throttle": 1,
    }
    if settings.broker.startswith("filesystem"):
        folder = settings.broker_folder
        for sub in ("in", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options.update(
            data_folder_in=str(folder / "in"),
            data_folder_out=str(folder / "in"),
            processed_folder=str(folder / "processed"),
            control_folder=str(folder / "control"),  # kombu's default is ./control, in whatever directory it runs
            store_processed=False,
            # How often an idle worker lists the folder for a task: kombu's 1 s made every task of the embedded
            # service (each uploaded file's validation, the analysis, its windows) wait half a second on average
            # before it started; a listing every 0.1 s costs a fraction of a millisecond.
            polling_interval=FILESYSTEM_POLLING_SECONDS,
        )
    app.conf.update(
        broker_url=settings.broker,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_routes=ROUTES,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return app


@made_once
def sender() -> Celery:
    """The API's (and the reconciler's) Celery app. A send gives up quickly when the broker is down: the task
    waits in the outbox instead of a request waiting on the broker."""
    app = configure(Celery("dvemb-api"), get_settings())
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
    return app


def enqueue_after_commit(session: Session, name: str, *args: Any) -> None:
    """Send task ``name`` once ``session`` commits, and only then (the transactional outbox): an entry is
    written in the session's transaction, so a rollback drops it with the change that needed it; after the
    commit the task is sent and the entry deleted. When the broker is down the entry stays and the
    reconciler (server/reconciler.py) sends it once the broker is back: the request still succeeds."""
    grace = dt.timedelta(seconds=get_settings().outbox_grace_seconds)
    entry = OutboxTask(name=name, args=list(args), due_at=dt.datetime.now(dt.UTC) + grace, sends=0)
    session.add(entry)
    session.info.setdefault("outbox", []).append(entry)


def send_outboxed(engine: Engine, entries: list[tuple[int, str, list[Any]]]) -> int:
    """Send committed outbox entries ``(id, name, args)`` and delete those the broker took; returns how many
    were sent. Stops at the first failure (the broker is down: the rest would wait on it too); what was not
    sent stays in the outbox for the reconciler. A task may be sent twice (the deletion failed, a reconciler
    sent it meanwhile): every task is idempotent."""
    sent: list[int] = []
    for entry_id, name, args in entries:
        try:
            sender().send_task(name, args=list(args))
        except Exception:  # kombu's and redis's connection errors have no common base: whatever the cause, keep it
            logger.warning("the broker did not take task %s%s; it stays in the outbox", name, args, exc_info=True)
            break
        sent.append(entry_id)
    if sent:
        try:
            with engine.begin() as connection:
                connection.execute(delete(OutboxTask).where(OutboxTask.id.in_(sent)))
        except SQLAlchemyError:  # the tasks went out; at worst the reconciler sends them once more
            logger.warning("could not clear %d sent outbox entries", len(sent), exc_info=True)
    return len(sent)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    for action in session.info.pop("after_commit", []):
        action()
    entries = session.info.pop("outbox", [])
    if entries:
        # The identity survives the commit (no SQL is emitted here, whatever the session's expiry setting).
        committed = [(int(inspect(e).identity[0]), e.name, e.args) for e in entries]
        bind = session.get_bind()
        send_outboxed(bind if isinstance(bind, Engine) else bind.engine, committed)


@event.listens_for(Session, "after_rollback")
def _drop_outbox(session: Session) -> None:
    session.info.pop("outbox", None)
    session.info.pop("after_commit", None)


def worker_command(
    queues: str = ALL_QUEUES, concurrency: int = 1, *, pool: str | None = None, name: str | None = None
) -> list[str]:
    """The command line of a worker process (the same Celery tasks in every mode); ``pool``: Celery's execution
    pool (default prefork), ``name``: the node name (default Celery's ``celery@host``)."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
    ]
    return command + (["-P", pool] if pool else []) + (["-n", name] if name else [])


def gpu_worker_commands(devices: list[str], queues: str = GPU_QUEUE) -> list[tuple[list[str], dict[str, str]]]:
    """One worker process per GPU: (command, environment additions) each. A process sees only its device
    (``CUDA_VISIBLE_DEVICES``) and runs its tasks in its own main process (Celery's ``solo`` pool): a prefork pool
    would fork children from a parent, and CUDA initialised before a fork is unusable in the child. The node is
    named ``gpu<device>@<host>``; by default such a worker takes the ``gpu`` queue only (the computations), so CPU
    workers (``--queues celery``) validate uploads and GPU workers compute (docs/service.md)."""
    if not devices or any(not d.strip() or "," in d for d in devices):
        raise ValueError(f"devices must be a list of GPU indices or UUIDs, got {devices!r}")
    return [
        (worker_command(queues, 1, pool="solo", name=f"gpu{d.strip()}@%h"), {"CUDA_VISIBLE_DEVICES": d.strip()})
        for d in devices
    ]
