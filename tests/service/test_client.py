"""`dvemb upload` on ordinary mistakes: one line that says what to do, nothing created or sent by mistake
(issue 13, item 17), against the real server and worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import Api, free_port, record_log

from dvemb.client import UploadError, upload_log


def test_a_wrong_token_is_named(api: Api, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log")
    with pytest.raises(UploadError, match=r"refused the token \(401\).*--token or DVEMB_TOKEN"):
        upload_log(log, server=api.url, token="dvemb_wrong", run_name="x")


def test_a_server_that_is_down_is_named(tmp_path: Path) -> None:
    log = record_log(tmp_path / "log")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UploadError, match="cannot reach .* is the dvemb server running"):
        upload_log(log, server=url, token="t", run_name="x")


def test_a_missing_directory_creates_nothing(api: Api, token: str, tmp_path: Path) -> None:
    for path in (tmp_path / "nope", tmp_path):
        with pytest.raises(UploadError, match="pass the directory the Recorder wrote"):
            upload_log(path, server=api.url, token=token, run_name="missing")
    assert api.get("/runs").json()["count"] == 0


def test_a_taken_run_name_is_refused_and_another_run_starts_afresh(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log")
    first = upload_log(log, server=api.url, token=token, run_name="exp")
    assert first["status"] == "ready" and first["url"].endswith(f"/#/runs/{first['run']}")
    with pytest.raises(UploadError, match="run 'exp' already exists .* --run NAME"):
        upload_log(log, server=api.url, token=token, run_name="exp", analyze=True)
    assert api.get(f"/runs/{first['run']}/jobs").json()["count"] == 0  # --analyze queued nothing
    # The resume file remembers the first run's uploads; another run (or server) must not reuse them.
    second = upload_log(log, server=api.url, token=token, run_name="exp-again")
    assert second["run"] != first["run"] and second["status"] == "ready" and second["rejected"] == {}


def test_the_cli_prints_one_line(api: Api, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log")
    env = {**os.environ, "DVEMB_TOKEN": "dvemb_wrong"}
    done = subprocess.run(
        [sys.executable, "-m", "dvemb.cli", "upload", str(log), "--server", api.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("dvemb upload: error:")


def test_stale_resume_urls_are_forgotten(api: Api, token: str, tmp_path: Path) -> None:
    """The resume file remembers an upload the server no longer has (its data reset, the upload replaced): the
    client starts that file afresh instead of failing on every later run (a review finding)."""
    from tusclient.storage.filestorage import FileStorage

    log = record_log(tmp_path / "log")
    run_id = api.post("/runs", json={"name": "stale"}).json()["id"]  # unfinished: the client resumes into it
    storage = FileStorage(str(log / ".dvemb-upload.json"))
    for path in sorted(log.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()
            key = f"{api.url}|{run_id}|{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            storage.set_item(key, f"{api.url}/api/v1/uploads/{'0' * 32}")
    storage.close()
    result = upload_log(log, server=api.url, token=token, run_name="stale")
    assert result["run"] == run_id and result["status"] == "ready" and result["rejected"] == {}, result
