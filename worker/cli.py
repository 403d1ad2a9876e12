"""``dvemb worker``: one worker process for the distributed mode (registered as a dvemb command)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(sub: Any) -> None:
    worker = sub.add_parser(
        "worker", help="run a Celery worker (set DVEMB_DATABASE_URL, DVEMB_BROKER_URL, DVEMB_STORAGE_DIR)"
    )
    worker.add_argument("--queues", default="celery,gpu", help="'gpu' only on GPU machines, 'celery' for validation")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    from server.tasks import worker_command

    command = worker_command(args.queues, args.concurrency)
    os.execv(command[0], command)
    return 0
