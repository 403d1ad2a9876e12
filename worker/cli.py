"""``dvemb worker``: one worker process for the distributed mode (registered as a dvemb command)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from typing import Any

from server.bad_settings import refusing_bad_settings


def register(sub: Any) -> None:
    worker = sub.add_parser(
        "worker", help="run a Celery worker (set DVEMB_DATABASE_URL, DVEMB_BROKER_URL, DVEMB_STORAGE_DIR)"
    )
    worker.add_argument(
        "--queues",
        default=None,
        help="'gpu' only on GPU machines, 'celery' for validation (default: both; with --devices: gpu)",
    )
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument(
        "--devices",
        help="GPU workers: comma-separated device indices (e.g. 0,1): one worker process per device, each seeing only "
        "its own (CUDA_VISIBLE_DEVICES), with Celery's solo pool (no fork after CUDA starts), on the 'gpu' queue "
        "unless --queues says otherwise",
    )
    worker.set_defaults(func=refusing_bad_settings(_worker))


def _worker(args: argparse.Namespace) -> int:
    from server.settings import get_settings
    from server.tasks import ALL_QUEUES, GPU_QUEUE, gpu_worker_commands, worker_command

    get_settings()  # a bad setting is refused here, in one line, before any worker process starts

    if args.devices is None:
        command = worker_command(args.queues or ALL_QUEUES, args.concurrency)
        os.execv(command[0], command)
        return 0
    queues = args.queues or GPU_QUEUE
    try:
        launches = gpu_worker_commands(args.devices.split(","), queues)
    except ValueError as exc:
        raise SystemExit(f"dvemb worker --devices: {exc}") from None
    if len(launches) == 1:
        command, env = launches[0]
        os.execve(command[0], command, {**os.environ, **env})
    return _run_all(launches)


def _run_all(launches: list[tuple[list[str], dict[str, str]]]) -> int:
    """Run one process per device; a signal to this process goes to every one of them (once: they run in sessions of
    their own, so a terminal's Ctrl-C does not reach them twice, which Celery would take for a cold shutdown). When
    one exits, the others are stopped too, so that a supervisor sees the launcher go and restarts it."""
    processes = [
        subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True) for command, env in launches
    ]

    asked: list[int] = []  # the signals this process was sent

    def forward(signum: int, _: Any) -> None:
        asked.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    while all(process.poll() is None for process in processes):
        time.sleep(0.5)
    if not asked:  # one exited on its own: stop the others once (a second signal is a cold shutdown to Celery)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
    codes = [process.wait() for process in processes]
    return 0 if asked and not any(codes) else 1  # a worker that exited unasked is a failure to its supervisor
