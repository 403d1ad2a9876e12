"""The embedded default: `dvemb serve` with no configuration (SQLite, filesystem broker, local worker)
runs the same tasks end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from service_harness import Api, free_port, record_log

from dvemb.client import upload_log


def test_dvemb_serve_embedded(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVEMB_")}
    env["DVEMB_DATA_DIR"] = str(tmp_path / "data")
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "dvemb.cli", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert serve.stdout is not None
        lines = [serve.stdout.readline() for _ in range(2)]
        token = lines[1].strip().rsplit(" ", 1)[-1]
        assert token.startswith("dvemb_"), lines
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{url}/api/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        result = upload_log(record_log(tmp_path / "log"), server=url, token=token, run_name="embedded", analyze=True)
        assert result["status"] == "ready", result
        api = Api(url, token)
        try:
            job = api.wait_job(result["job"]["id"], timeout=120)
            assert job["status"] == "succeeded", job
            top = api.get(f"/jobs/{job['id']}/top", params={"query_set": "val", "kind": "harmful", "limit": 3}).json()
            assert len(top["data"]) == 3
        finally:
            api.client.close()
        assert (tmp_path / "data" / "dvemb.db").exists()  # SQLite, made by the migrations
        # SIGTERM to `dvemb serve` alone (as `kill` or a supervisor sends it) stops its worker too (issue 13.14).
        children = _children(serve.pid)
        assert children, "dvemb serve started no worker process"
        os.kill(serve.pid, signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)], "the worker outlived dvemb serve"
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=60)
        if serve.stdout is not None:
            serve.stdout.close()


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, or a process reaped meanwhile, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
