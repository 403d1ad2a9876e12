"""`dvemb upload` on ordinary mistakes: one line that says what to do, nothing created or sent by mistake
(issue 13, item 17), against the real server and worker."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from service_harness import Api, Worker, free_port, record_log

from dvemb.client import UploadError, upload_log
from dvemb.formats import is_log_file_name


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


def test_the_cli_refuses_a_parallel_count_below_one_in_one_line(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dvemb.cli",
            "upload",
            str(log),
            "--server",
            api.url,
            "--token",
            token,
            "--parallel",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "at least one file at a time" in done.stderr
    assert api.get("/runs").json()["count"] == 0


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


TUS = {"Tus-Resumable": "1.0.0"}


def _tus_upload(api: Api, run_id: int, path: Path) -> None:
    data = path.read_bytes()
    meta = "filename " + base64.b64encode(path.name.encode()).decode()
    created = api.post(
        f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
    )
    assert created.status_code == 201, created.text
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    assert api.patch(created.headers["Location"], content=data, headers=headers).status_code == 204


def test_a_resumed_upload_skips_what_the_run_holds(api: Api, token: str, tmp_path: Path) -> None:
    """A review finding: resuming into an unfinished run, the client sent its valid files again and reported
    the server's 409 ('already uploaded') as rejections (exit status 1, no --analyze)."""
    log = record_log(tmp_path / "log")
    run_id = api.post("/runs", json={"name": "partial"}).json()["id"]
    first = ("manifest.json", "shards.jsonl", "shard-r0-000000.safetensors")
    for name in first:  # an earlier upload that stopped after three files
        _tus_upload(api, run_id, log / name)
    deadline = time.monotonic() + 60
    while sorted(f["status"] for f in api.get(f"/runs/{run_id}").json()["files"]) != ["ready"] * len(first):
        assert time.monotonic() < deadline, api.get(f"/runs/{run_id}").json()["files"]
        time.sleep(0.2)
    result = upload_log(log, server=api.url, token=token, run_name="partial", analyze=True)
    assert result["run"] == run_id and result["status"] == "ready" and result["rejected"] == {}, result
    assert "job" in result


def test_a_server_that_drops_the_connection_is_one_line(tmp_path: Path) -> None:
    """Only connection and timeout errors were put in words; any other transport failure was a traceback."""
    log = record_log(tmp_path / "log")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def drop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # the test closed the listener: the client has given up
                    return
                conn.close()  # no answer at all

        threading.Thread(target=drop, daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(
            UploadError, match=r"failed \((RemoteProtocolError|ReadError): .*run the same command again"
        ):
            upload_log(log, server=url, token="t", run_name="x")


def test_run_search_matches_wildcards_literally(api: Api) -> None:
    """`GET /runs?search=` is a substring search: % and _ used to act as SQL wildcards."""
    for name in ("a_b", "axb", "abc"):
        assert api.post("/runs", json={"name": name}).status_code == 201
    for search, expected in (("a_b", ["a_b"]), ("_", ["a_b"]), ("%", []), ("b", ["abc", "axb", "a_b"])):
        found = [r["name"] for r in api.get("/runs", params={"search": search}).json()["data"]]
        assert found == expected, (search, found)


def test_the_client_waits_out_the_projects_quota(
    api: Api,
    token: str,
    worker: Worker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 429 path: with DVEMB_MAX_PENDING_FILES (40 in the tests) files of the project waiting for a stopped
    validator, the client waits and asks again, and completes once the validator is back. The flood's run has
    its manifest and shard index, so that its files get their verdicts (files waiting for a manifest stay counted,
    issue 21.4)."""
    from dvemb.client import upload as client_upload

    monkeypatch.setattr(client_upload, "_QUOTA_WAIT_S", 1)  # the server says 10 s; the test has no time for that
    log = record_log(tmp_path / "log")
    flood = api.post("/runs", json={"name": "flood"}).json()["id"]
    for name in ("manifest.json", "shards.jsonl"):
        data = (log / name).read_bytes()
        meta = "filename " + base64.b64encode(name.encode()).decode()
        created = api.post(
            f"/runs/{flood}/uploads", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
        )
        headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        assert api.patch(created.headers["Location"], content=data, headers=headers).status_code == 204
    worker.kill()
    restart = threading.Timer(4, worker.start)
    try:
        for i in range(40):
            meta = "filename " + base64.b64encode(f"examples-{i:06d}.jsonl".encode()).decode()
            created = api.post(f"/runs/{flood}/uploads", headers={**TUS, "Upload-Length": "0", "Upload-Metadata": meta})
            assert created.status_code == 201, created.text
        restart.start()  # the validator comes back while the client waits
        result = upload_log(log, server=api.url, token=token, run_name="patient")
    finally:
        restart.join()
        if worker.process is None or worker.process.poll() is not None:
            worker.start()
    err = capsys.readouterr().err
    assert result["status"] == "ready" and result["rejected"] == {}, (result, err)
    assert "busy validating this project's files (429)" in err


def _recording_sends(monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None) -> list[tuple[str, str, float]]:
    """Each file's send as ("start"|"end", name, time); ``fail_on`` names a file whose send fails."""
    from dvemb.client import upload as client_upload

    events: list[tuple[str, str, float]] = []
    send = client_upload._Sender.send

    def recorded(self: client_upload._Sender, path: Path) -> None:
        events.append(("start", path.name, time.monotonic()))
        if path.name == fail_on:
            raise UploadError(f"lost the connection while uploading {path.name}")
        send(self, path)
        events.append(("end", path.name, time.monotonic()))

    monkeypatch.setattr(client_upload._Sender, "send", recorded)
    return events


def test_data_files_go_up_several_at_a_time_after_the_manifests(
    api: Api, token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file's last request waits for its verdict, so data files are sent four at a time (the default); the
    manifest and the shard index still go first, each finished before any data file starts."""
    log = record_log(tmp_path / "log", steps=24, shard_steps=1)
    events = _recording_sends(monkeypatch)
    result = upload_log(log, server=api.url, token=token, run_name="parallel")
    assert result["status"] == "ready" and result["rejected"] == {}, result
    files = api.get(f"/runs/{result['run']}").json()["files"]
    assert len(files) == len([p for p in log.iterdir() if is_log_file_name(p.name)]) >= 27
    assert {f["status"] for f in files} == {"ready"}
    heads = {"manifest.json", "shards.jsonl"}
    last_head_end = max(t for kind, name, t in events if kind == "end" and name in heads)
    assert all(t > last_head_end for kind, name, t in events if kind == "start" and name not in heads)
    in_flight, most = 0, 0
    for kind, _, _ in sorted(events, key=lambda e: e[2]):
        in_flight += 1 if kind == "start" else -1
        most = max(most, in_flight)
    assert most == 4, most


def test_the_first_failed_file_stops_the_upload(
    api: Api, token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that cannot be sent stops the others (files not started are not sent) and its error is raised."""
    log = record_log(tmp_path / "log", steps=24, shard_steps=1)
    events = _recording_sends(monkeypatch, fail_on="shard-r0-000001.safetensors")
    with pytest.raises(UploadError, match="lost the connection while uploading shard-r0-000001"):
        upload_log(log, server=api.url, token=token, run_name="stopped", parallel=2)
    started = [name for kind, name, _ in events if kind == "start"]
    # The fifth data file failed (examples, projection, queries, shard 0, shard 1): the other thread finished the
    # file it was sending and stopped; nothing later in the list went on.
    assert len(started) <= 2 + 6 and "shard-r0-000004.safetensors" not in started, started


@pytest.mark.parametrize("parallel", [0, -1, 1.5, True])
def test_a_parallel_count_below_one_is_refused_before_anything_is_sent(
    api: Api, token: str, tmp_path: Path, parallel: object
) -> None:
    log = record_log(tmp_path / "log")
    with pytest.raises(UploadError, match="at least one file at a time"):
        upload_log(log, server=api.url, token=token, run_name="none", parallel=parallel)  # type: ignore[arg-type]
    assert api.get("/runs").json()["count"] == 0


def test_ctrl_c_stops_at_once_and_the_next_run_resumes(
    api: Api, token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a file's request hangs (a verdict slow to come, a stalled server) stops the upload at once: the
    sending threads are not waited for. The resume file stays readable, and the next run completes the log."""
    import _thread

    from dvemb.client import upload as client_upload

    log = record_log(tmp_path / "log", steps=24, shard_steps=1)
    send, hung, release = client_upload._Sender.send, threading.Event(), threading.Event()

    def hanging(self: client_upload._Sender, path: Path) -> None:
        if path.name == "shard-r0-000002.safetensors":
            hung.set()
            _thread.interrupt_main()  # Ctrl-C, while this thread's request hangs
            release.wait(60)
            return
        send(self, path)

    monkeypatch.setattr(client_upload._Sender, "send", hanging)
    # Ctrl-C as a terminal sends it: pytest-xdist's processes ignore SIGINT, where interrupt_main() does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            upload_log(log, server=api.url, token=token, run_name="interrupted")
        assert hung.is_set() and not release.is_set()
        assert time.monotonic() - started < 30  # not the 60 s the hung request would have held it
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)
    json.loads((log / ".dvemb-upload.json").read_text())  # readable: nothing was written into it once closed
    monkeypatch.setattr(client_upload._Sender, "send", send)
    result = upload_log(log, server=api.url, token=token, run_name="interrupted")
    assert result["status"] == "ready" and result["rejected"] == {}, result


def test_a_server_error_is_never_reported_as_a_rejected_file() -> None:
    """A 5xx answer while a file goes up is the server's trouble: the upload stops saying so (run it again, it
    resumes) instead of listing the file as rejected and leaving the run incomplete."""
    from tusclient.exceptions import TusCommunicationError

    from dvemb.client.upload import _refused

    rejected: dict[str, str] = {}
    for status in (500, 502, 503):
        with pytest.raises(
            UploadError, match=rf"failed while receiving shard-r0-000000.safetensors \({status}\).*resume"
        ):
            _refused(TusCommunicationError("boom", status, b"{}"), "shard-r0-000000.safetensors", "http://s", rejected)
    _refused(
        TusCommunicationError("bad", 400, b'{"error": "bad_request", "detail": "rejected: no"}'),
        "f",
        "http://s",
        rejected,
    )
    assert rejected == {"f": "rejected: no"}
