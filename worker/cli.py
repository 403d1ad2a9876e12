"""``dvemb worker``: one worker process for the distributed mode (registered as a dvemb command)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from typing import Any

_DEFAULT_QUEUES = "celery,gpu"


def register(sub: Any) -> None:
    worker = sub.add_parser(
        "worker", help="run a Celery worker (set DVEMB_DATABASE_URL, DVEMB_BROKER_URL, DVEMB_STORAGE_DIR)"
    )
    worker.add_argument("--queues", default=_DEFAULT_QUEUES, help="'gpu' only on GPU machines, 'celery' for validation")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument(
        "--devices",
        help="GPU workers: comma-separated device indices (e.g. 0,1): one worker process per device, each seeing only "
        "its own (CUDA_VISIBLE_DEVICES), with Celery's solo pool (no fork after CUDA starts), on the 'gpu' queue "
        "unless --queues says otherwise",
    )
    worker.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    from server.tasks import GPU_QUEUE, gpu_worker_commands, worker_command

    if args.devices is None:
        command = worker_command(args.queues, args.concurrency)
        os.execv(command[0], command)
        return 0
    queues = GPU_QUEUE if args.queues == _DEFAULT_QUEUES else args.queues
    try:
        launches = gpu_worker_commands(args.devices.split(","), queues)
    except ValueError as exc:
        raise SystemExit(f"dvemb worker --devices: {exc}") from None
    if len(launches) == 1:
        command, env = launches[0]
        os.execve(command[0], command, {**os.environ, **env})
    return _run_all(launches)


def _run_all(launches: list[tuple[list[str], dict[str, str]]]) -> int:
    """Run one process per device until all have exited; a signal to this process goes to every one of them."""
    processes = [subprocess.Popen(command, env={**os.environ, **env}) for command, env in launches]

    def forward(signum: int, _: Any) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    return max(process.wait() for process in processes)
