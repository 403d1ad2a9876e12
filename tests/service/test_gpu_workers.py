"""GPU workers (issue 25.3), on a machine without a GPU: ``dvemb worker --devices 0,1`` starts one Celery worker
process per device, each seeing only its own device (``CUDA_VISIBLE_DEVICES``), in Celery's solo pool (no fork
after CUDA starts), named ``gpu<device>@<host>`` and answering on the broker; a signal to the launcher stops them
all. A bad device list is refused with the fix. (They listen on a queue of their own here, so that they take
none of the suite's tasks.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery


def _children(parent: int) -> dict[int, str]:
    """Processes whose parent is ``parent``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


def test_one_solo_worker_per_device_answers_and_stops_with_the_launcher(service_env: dict[str, str]) -> None:
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **service_env}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "dvemb.cli", "worker", "--devices", "0,1", "--queues", queue],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    app = Celery(broker=service_env["DVEMB_BROKER_URL"])
    host = socket.gethostname()
    names = {f"gpu0@{host}", f"gpu1@{host}"}
    try:
        answered: set[str] = set()
        deadline = time.monotonic() + 120
        while answered != names and time.monotonic() < deadline:
            for reply in app.control.ping(destination=sorted(names), timeout=1.0):
                answered.update(reply)
        assert answered == names
        children = _children(launcher.pid)
        assert len(children) == 2
        seen = {}
        for pid, command in children.items():
            assert " -P solo " in f"{command} " and f" -Q {queue} " in command
            seen[_environ(pid)["CUDA_VISIBLE_DEVICES"]] = command
        assert sorted(seen) == ["0", "1"]
        assert "gpu0@" in seen["0"] and "gpu1@" in seen["1"]
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
        assert not _children(launcher.pid)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        app.close()


@pytest.mark.parametrize("devices", ["", "0,,1"])
def test_a_bad_device_list_is_refused(devices: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dvemb.cli", "worker", "--devices", devices],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "devices" in done.stderr


def test_one_device_keeps_the_queues_it_is_given(service_env: dict[str, str]) -> None:
    """docker-compose's single worker runs ``--devices 0 --queues celery,gpu``: it must take validation too."""
    queues = f"celery-test-{uuid.uuid4().hex[:6]},gpu-test-{uuid.uuid4().hex[:6]}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "dvemb.cli", "worker", "--devices", "0", "--queues", queues],
        env={**os.environ, **service_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    app = Celery(broker=service_env["DVEMB_BROKER_URL"])
    name = f"gpu0@{socket.gethostname()}"
    try:
        deadline = time.monotonic() + 120
        while not any(name in reply for reply in app.control.ping(destination=[name], timeout=1.0)):
            assert time.monotonic() < deadline, "the worker never answered"
        command = Path(f"/proc/{worker.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert f" -Q {queues} " in command and " -P solo " in command  # the launcher became the worker (one device)
        assert _environ(worker.pid)["CUDA_VISIBLE_DEVICES"] == "0"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        app.close()
