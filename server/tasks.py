"""The server's side of the task contract: tasks are sent by name, only after the database commit.

The worker package defines tasks with these names; the server never imports it.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session

from server.settings import Settings, get_settings

VALIDATE_FILE = "dvemb.validate_file"
COMPUTE = "dvemb.compute"
ADHOC_QUERY = "dvemb.adhoc_query"
WINDOW_TOPK = "dvemb.window_topk"  # a step range's top examples, read from the scores file (default queue)
GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "celery"
ROUTES = {COMPUTE: {"queue": GPU_QUEUE}, ADHOC_QUERY: {"queue": GPU_QUEUE}}


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
        for sub in ("in", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options.update(
            data_folder_in=str(folder / "in"),
            data_folder_out=str(folder / "in"),
            processed_folder=str(folder / "processed"),
            store_processed=False,
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


@lru_cache
def sender() -> Celery:
    return configure(Celery("dvemb-api"), get_settings())


def enqueue_after_commit(session: Session, name: str, *args: Any) -> None:
    """Send task ``name`` once ``session`` commits; dropped if it rolls back."""
    session.info.setdefault("outbox", []).append((name, args))


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    for action in session.info.pop("after_commit", []):
        action()
    for name, args in session.info.pop("outbox", []):
        sender().send_task(name, args=list(args))


@event.listens_for(Session, "after_rollback")
def _drop_outbox(session: Session) -> None:
    session.info.pop("outbox", None)
    session.info.pop("after_commit", None)


def worker_command(queues: str = "celery,gpu", concurrency: int = 1) -> list[str]:
    """The command line of a worker process (the same Celery tasks in every mode)."""
    return [
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
