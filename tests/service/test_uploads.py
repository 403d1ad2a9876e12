"""Resumable uploads, and every kind of bad upload refused with a message and nothing made visible."""

from __future__ import annotations

import base64
import json
import pickle
import socket
import struct
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from safetensors.torch import load_file, save_file
from service_harness import Api, Worker, record_log

from dvemb.writer import sha256_file
from server.settings import get_settings

TUS = {"Tus-Resumable": "1.0.0"}


def _create(api: Api, run_id: int, name: str, length: int) -> str:
    meta = "filename " + base64.b64encode(name.encode()).decode()
    response = api.post(
        f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": meta}
    )
    assert response.status_code == 201, response.text
    return response.headers["Location"]


def _patch(api: Api, location: str, data: bytes, offset: int) -> object:
    return api.patch(
        location,
        content=data,
        headers={**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"},
    )


def _upload(api: Api, run_id: int, path: Path, name: str | None = None) -> object:
    data = path.read_bytes()
    return _patch(api, _create(api, run_id, name or path.name, len(data)), data, 0)


def _open_patch(api: Api, location: str, data: bytes, sent: int) -> socket.socket:
    """A PATCH whose body stops after ``sent`` bytes (the caller closes it: a dropped or slow connection)."""
    url = urlparse(location)
    conn = socket.create_connection((url.hostname, url.port))
    head = (
        f"PATCH {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: {api.headers['Authorization']}\r\n"
        f"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    conn.sendall(head.encode() + data[:sent])
    return conn


def _answer(conn: socket.socket) -> str:
    """The whole HTTP answer on a raw connection (head and its Content-Length of body)."""
    conn.settimeout(30)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += conn.recv(65536)
    head, body = raw.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def _upload_manifest(api: Api, run_id: int, log: Path) -> None:
    """Upload a log's manifest and its shard index: with both validated, its shards are judged as they arrive."""
    assert _upload(api, run_id, log / "manifest.json").status_code == 204
    assert _upload(api, run_id, log / "shards.jsonl").status_code == 204


def _vouch_for(log: Path, name: str, bad: Path, out: Path, **manifest_changes: object) -> Path:
    """A copy of ``log``'s manifest and shard index (in ``out``) that records ``bad``'s bytes for shard ``name``:
    a log that really recorded them."""
    index = log / "shards.jsonl"
    entries = [json.loads(line) for line in index.read_text().splitlines()]
    next(e for e in entries if e["file"] == name).update(bytes=bad.stat().st_size, sha256=sha256_file(bad))
    out.mkdir(exist_ok=True)
    (out / index.name).write_text("".join(json.dumps(e) + "\n" for e in entries))
    manifest = json.loads((log / "manifest.json").read_text())
    manifest["shard_index"].update(bytes=(out / index.name).stat().st_size, sha256=sha256_file(out / index.name))
    manifest.update(manifest_changes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _new_run(api: Api, name: str = "r") -> int:
    return int(api.post("/runs", json={"name": name}).json()["id"])


def _log_dir(run_id: int) -> Path:
    return get_settings().storage / "runs" / str(run_id) / "log"


def test_interrupted_upload_resumes_byte_identical(api: Api, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log", steps=8, shard_steps=8, dim=64)
    run_id = _new_run(api)
    _upload_manifest(api, run_id, log)
    shard = log / "shard-r0-000000.safetensors"
    data = shard.read_bytes()
    location = _create(api, run_id, shard.name, len(data))
    # The connection drops halfway through the body.
    half = len(data) // 2
    with _open_patch(api, location, data, half):
        time.sleep(0.5)
    for _ in range(50):
        offset = int(api.head(location, headers=TUS).headers["Upload-Offset"])
        if offset == half:
            break
        time.sleep(0.1)
    assert offset == half
    assert not (_log_dir(run_id) / shard.name).exists()  # incomplete: not visible
    assert _patch(api, location, data[offset:], offset).status_code == 204
    stored = _log_dir(run_id) / shard.name
    assert stored.read_bytes() == data
    wrong = _patch(api, location, b"x", 3)
    assert wrong.status_code == 409


def _damage(kind: str, log: Path) -> tuple[str, Path]:
    """(file name to upload, path of damaged bytes) for one kind of bad upload."""
    shard = log / "shard-r0-000000.safetensors"
    bad = log.parent / "bad"
    if kind == "truncated":
        bad.write_bytes(shard.read_bytes()[:-50])
    elif kind == "checksum":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 1
        bad.write_bytes(bytes(data))
    elif kind == "nan":
        tensors = load_file(str(shard))
        tensors["grad.0"][0, 0] = float("nan")
        save_file(tensors, str(bad), metadata={"format": "dvemb-gradient-log"})
    elif kind == "lying-header":
        data = shard.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header["grad.0"]["shape"][0] *= 2
        raw = json.dumps(header).encode()
        bad.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    elif kind == "pickle":
        bad.write_bytes(pickle.dumps({"grad.0": [1.0, 2.0]}))
    return shard.name, bad


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated"),
        ("checksum", "sha256"),
        ("nan", "NaN"),
        ("lying-header", "claims shape"),
        ("pickle", "not a safetensors file"),
    ],
)
def test_bad_shard_is_refused_and_invisible(api: Api, tmp_path: Path, kind: str, message: str) -> None:
    log = record_log(tmp_path / "log")
    run_id = _new_run(api)
    name, bad = _damage(kind, log)
    # A log that really recorded NaN: its shard index vouches for the file's bytes.
    _upload_manifest(api, run_id, _vouch_for(log, name, bad, tmp_path / "sealed") if kind == "nan" else log)
    response = _upload(api, run_id, bad, name)
    assert response.status_code == 400, response.text
    body = response.json()
    assert message in body["detail"] and name in body["detail"]
    assert not (_log_dir(run_id) / name).exists()
    assert not list((get_settings().storage / "runs" / str(run_id) / "staging").glob("*.part"))
    run = api.get(f"/runs/{run_id}").json()
    assert run["status"] != "ready" and name in run["missing_files"]
    assert {f["name"]: f["status"] for f in run["files"]}[name] == "rejected"
    if kind != "nan":
        assert _upload(api, run_id, log / name).status_code == 204  # the real file can still be uploaded


def test_a_shard_index_that_disagrees_with_its_manifest_is_refused(api: Api, tmp_path: Path) -> None:
    """Format version 3: a closed log's manifest seals its shard index (size, sha256, shard count); an index
    that lost records is refused, never taken for a shorter complete log, and the true one is still accepted."""
    log = record_log(tmp_path / "log")
    run_id = _new_run(api)
    assert _upload(api, run_id, log / "manifest.json").status_code == 204
    index = log / "shards.jsonl"
    short = tmp_path / "shards.jsonl"
    short.write_text("".join(index.read_text().splitlines(keepends=True)[:-1]))
    response = _upload(api, run_id, short)
    assert response.status_code == 400, response.text
    assert "truncated or changed after recording" in response.json()["detail"]
    run = api.get(f"/runs/{run_id}").json()
    assert run["status"] != "ready" and "shards.jsonl" in run["missing_files"]
    assert _upload(api, run_id, index).status_code == 204


def test_wrong_format_version(api: Api, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log")
    manifest = json.loads((log / "manifest.json").read_text())
    manifest["version"] = 99
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(manifest))
    response = _upload(api, _new_run(api), bad)
    assert response.status_code == 400
    assert "version 99 is not supported" in response.json()["detail"]


@pytest.mark.parametrize(
    "name", ["../manifest.json", "a/b.safetensors", "shard-r0-000000.safetensors/../../x", "evil.sh"]
)
def test_path_traversal_and_unknown_names(api: Api, name: str) -> None:
    run_id = _new_run(api)
    meta = "filename " + base64.b64encode(name.encode()).decode()
    response = api.post(f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": meta})
    assert response.status_code == 400
    assert "not a gradient-log file name" in response.json()["detail"]


def test_over_the_size_limit(api: Api) -> None:
    run_id = _new_run(api)
    meta = "filename " + base64.b64encode(b"shard-r0-000000.safetensors").decode()
    response = api.post(
        f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(9 << 20), "Upload-Metadata": meta}
    )
    assert response.status_code == 413
    assert "DVEMB_MAX_FILE_BYTES" in response.json()["detail"]
    location = _create(api, run_id, "shard-r0-000000.safetensors", 10)
    too_long = _patch(api, location, b"x" * 11, 0)
    assert too_long.status_code == 413
    meta = "filename " + base64.b64encode(b"manifest.json").decode()
    big_manifest = api.post(
        f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(17 << 20), "Upload-Metadata": meta}
    )
    assert big_manifest.status_code == 413 and "a manifest holds at most" in big_manifest.json()["detail"]


def test_malformed_example_metadata_is_rejected(api: Api, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log")
    bad = tmp_path / "examples-000000.jsonl"
    bad.write_text('{"id": 1, "label": 2}\n5\n')
    sealed = json.loads((log / "manifest.json").read_text())
    sealed["example_files"][0].update(bytes=bad.stat().st_size, sha256=sha256_file(bad))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(sealed))
    run_id = _new_run(api)
    assert _upload(api, run_id, manifest).status_code == 204
    assert _upload(api, run_id, log / "shards.jsonl").status_code == 204
    response = _upload(api, run_id, bad)
    assert response.status_code == 400
    assert "line 2 is not an example record" in response.json()["detail"]


def test_concurrent_patches_do_not_interleave(api: Api, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log", steps=8, shard_steps=8, dim=64)
    run_id = _new_run(api)
    _upload_manifest(api, run_id, log)
    shard = log / "shard-r0-000000.safetensors"
    data = shard.read_bytes()
    location = _create(api, run_id, shard.name, len(data))
    with _open_patch(api, location, data, 1000):  # a first PATCH still streaming its body
        time.sleep(0.5)
        second = _patch(api, location, data, 0)
        assert second.status_code == 409, second.text
        assert "another request is appending" in second.json()["detail"]
    for _ in range(50):
        offset = int(api.head(location, headers=TUS).headers["Upload-Offset"])
        if offset == 1000:
            break
        time.sleep(0.1)
    assert _patch(api, location, data[offset:], offset).status_code == 204
    assert (_log_dir(run_id) / shard.name).read_bytes() == data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["layers"][0].update(out_dim=-4), "out_dim must be an integer"),
        (lambda m: m["layers"][0].update(name="../../etc"), "not a valid name"),
        (lambda m: m.update(world_size=0), "world_size"),
    ],
)
def test_a_malformed_manifest_is_refused_without_server_paths(
    api: Api, tmp_path: Path, change: object, message: str
) -> None:
    """Issue 13, item 15: negative sizes and path-like names are refused; no message shows the server's disk."""
    log = record_log(tmp_path / "log")
    manifest = json.loads((log / "manifest.json").read_text())
    change(manifest)  # type: ignore[operator]
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(manifest))
    response = _upload(api, _new_run(api), bad)
    assert response.status_code == 400 and message in response.json()["detail"], response.text
    assert str(get_settings().storage) not in response.text


def test_a_shard_with_unusable_ids_is_refused(api: Api, tmp_path: Path) -> None:
    """Issue 13, item 12: ids longer than 255 characters or with NUL used to fail the job on Postgres."""
    log = record_log(tmp_path / "log")
    shard = log / "shard-r0-000000.safetensors"
    tensors = load_file(str(shard))
    count = len(tensors["example_id"])
    ids = ["x" * 300] + [f"id\x00{i}" for i in range(1, count)]
    del tensors["example_id"]
    data = b"".join(i.encode() for i in ids)
    offsets = [0]
    for i in ids:
        offsets.append(offsets[-1] + len(i.encode()))
    tensors["example_id_utf8"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    tensors["example_id_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    bad = tmp_path / "bad"
    save_file(tensors, str(bad), metadata={"format": "dvemb-gradient-log"})
    run_id = _new_run(api)
    _upload_manifest(api, run_id, _vouch_for(log, shard.name, bad, tmp_path / "sealed", id_type="str"))
    response = _upload(api, run_id, bad, shard.name)
    assert response.status_code == 400 and "longer than 255 characters" in response.json()["detail"], response.text


@pytest.mark.parametrize(
    "path",
    [
        "/runs/2147483648",
        "/runs/9223372036854775808",
        "/jobs/2147483648",
        "/jobs/2147483648/top?query_set=val",
        "/runs?offset=9223372036854775807",
        "/queries/99999999999",
    ],
)
def test_integers_beyond_the_database_range_are_422(api: Api, path: str) -> None:
    """Issue 13, item 12: ids and filters over 2^31 gave a 500 on Postgres (over 2^63 on SQLite too)."""
    response = api.get(path)
    assert response.status_code == 422, response.text
    assert set(response.json()) == {"error", "detail"}


def test_a_complete_run_takes_no_more_files(api: Api, token: str, tmp_path: Path) -> None:
    """Issue 13, item 4: one more upload on a ready run (then rejected or deleted) left it 'uploading' for ever."""
    from dvemb.client import upload_log

    log = record_log(tmp_path / "log")
    run_id = upload_log(log, server=api.url, token=token, run_name="complete")["run"]
    assert api.get(f"/runs/{run_id}").json()["status"] == "ready"
    meta = "filename " + base64.b64encode(b"examples-000009.jsonl").decode()
    response = api.post(f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": meta})
    assert response.status_code == 409 and "upload to a new run" in response.json()["detail"]
    assert api.get(f"/runs/{run_id}").json()["status"] == "ready"


def test_a_stalled_connection_releases_its_upload(api: Api, tmp_path: Path) -> None:
    """Issue 13, item 8: a client that stops sending mid-body held the upload's lock (409 for a minute) while
    HEAD said offset 0. With DVEMB_UPLOAD_IDLE_SECONDS (2 s in the tests) the request ends, keeping its bytes."""
    log = record_log(tmp_path / "log", steps=8, shard_steps=8, dim=64)
    run_id = _new_run(api)
    _upload_manifest(api, run_id, log)
    shard = log / "shard-r0-000000.safetensors"
    data = shard.read_bytes()
    location = _create(api, run_id, shard.name, len(data))
    sent = len(data) // 3
    with _open_patch(api, location, data, sent):  # the connection stays open and silent
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            offset = int(api.head(location, headers=TUS).headers["Upload-Offset"])
            if offset == sent:
                break
            time.sleep(0.2)
        assert offset == sent
        assert _patch(api, location, data[sent:], sent).status_code == 204  # no 409: the lock is free
    assert (_log_dir(run_id) / shard.name).read_bytes() == data


def test_a_project_flooding_the_validator_gets_429_and_others_do_not(
    api: Api, worker: Worker, service_env: dict[str, str]
) -> None:
    """Issue 13, item 3: 10,000 one-byte uploads were all queued and another project's run waited behind them.
    A project may have DVEMB_MAX_PENDING_FILES (40 in the tests) files waiting for the validator."""
    from service_harness import make_token

    worker.kill()  # nothing is validated meanwhile: every finished upload waits
    try:
        run_id = _new_run(api, "flood")
        codes = [
            api.post(
                f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": "0", "Upload-Metadata": _meta(i)}
            ).status_code
            for i in range(45)
        ]
        assert codes[:40] == [201] * 40 and set(codes[40:]) == {429}
        refused = api.post(
            f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": "0", "Upload-Metadata": _meta(99)}
        )
        assert "DVEMB_MAX_PENDING_FILES" in refused.json()["detail"] and refused.headers["Retry-After"] == "10"
        other = Api(api.url, make_token("someone-else"))
        try:
            other_run = _new_run(other, "other")
            meta = _meta(1)
            assert (
                other.post(
                    f"/runs/{other_run}/uploads", headers={**TUS, "Upload-Length": "0", "Upload-Metadata": meta}
                ).status_code
                == 201
            )
        finally:
            other.client.close()
    finally:
        worker.start()


def _meta(index: int) -> str:
    return "filename " + base64.b64encode(f"examples-{index:06d}.jsonl".encode()).decode()


def test_the_run_row_keeps_the_manifest_not_every_shard(api: Api, token: str, tmp_path: Path) -> None:
    """A version-3 manifest names its sealed shard index; the run's row used to inline every shard entry read
    from it (about 180 bytes per shard, tens of MB per run at 10^5 shards, parsed on every request)."""
    from sqlalchemy import select

    from dvemb.client import upload_log
    from server.db.models import Run
    from server.db.session import session_factory

    log = record_log(tmp_path / "log", steps=6, shard_steps=2)
    run_id = _new_run(api, "compact")
    _upload_manifest(api, run_id, log)
    shards = [json.loads(line)["file"] for line in (log / "shards.jsonl").read_text().splitlines()]
    assert len(shards) == 3
    deadline = time.monotonic() + 30
    while not set(shards) <= set(api.get(f"/runs/{run_id}").json()["missing_files"]):
        assert time.monotonic() < deadline, api.get(f"/runs/{run_id}").json()
        time.sleep(0.2)
    with session_factory()() as session:
        run = session.scalar(select(Run).where(Run.id == run_id))
        assert run is not None and run.num_steps == 6
        stored = run.manifest["ranks"][0]
    assert "shards" not in stored and stored == json.loads((log / "manifest.json").read_text())
    result = upload_log(log, server=api.url, token=token, run_name="compact")
    assert result["run"] == run_id and result["status"] == "ready", result
    assert api.get(f"/runs/{run_id}").json()["missing_files"] == []


def test_a_patch_that_outlives_its_tokens_revocation_keeps_nothing(api: Api, server_url: str, tmp_path: Path) -> None:
    """Issue 21: a PATCH in flight finished after its token was revoked (its bytes kept, the file handed to the
    validator). Now the offset moves only while the token is valid, checked where it is recorded: the PATCH
    answers 401, HEAD still says 0, and a valid token resumes the upload from there."""
    log = record_log(tmp_path / "log", steps=8, shard_steps=8, dim=64)
    run_id = _new_run(api)
    _upload_manifest(api, run_id, log)
    shard = log / "shard-r0-000000.safetensors"
    data = shard.read_bytes()
    created = api.post("/tokens", json={"name": "short-lived"}).json()
    [token_id] = [t["id"] for t in api.get("/project").json()["tokens"] if t["name"] == "short-lived"]
    second = Api(server_url, created["token"])
    try:
        location = _create(second, run_id, shard.name, len(data))
        conn = _open_patch(second, location, data, len(data) // 2)  # half of the body sent, the request open
        try:
            time.sleep(0.5)
            assert api.delete(f"/tokens/{token_id}").status_code == 204
            conn.sendall(data[len(data) // 2 :])  # the rest arrives after the revocation
            answer = _answer(conn)
        finally:
            conn.close()
        assert answer.startswith("HTTP/1.1 401"), answer[:200]
        assert "revoked while this upload was being sent" in answer
        assert int(api.head(location, headers=TUS).headers["Upload-Offset"]) == 0
        assert _patch(api, location, data, 0).status_code == 204  # resumed with a valid token
    finally:
        second.client.close()
    assert (_log_dir(run_id) / shard.name).read_bytes() == data
