"""The project's quota of files waiting for the validator counts files waiting for their manifest (issue 21,
item 4): 2,100 one-byte files uploaded to a run with a manifest but no shard index all got 204 (they were not
counted), and the shard index then handed them all to the validator at once while another project's upload waited
52 s. DVEMB_MAX_PENDING_FILES is 40 in the tests."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from service_harness import Api, make_token, record_log

from dvemb.client import upload_log

TUS = {"Tus-Resumable": "1.0.0"}


def _create(api: Api, run_id: int, name: str, length: int) -> Any:
    meta = "filename " + base64.b64encode(name.encode()).decode()
    return api.post(f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": meta})


def _upload(api: Api, run_id: int, name: str, data: bytes) -> Any:
    created = _create(api, run_id, name, len(data))
    if created.status_code != 201:
        return created
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    return api.patch(created.headers["Location"], content=data, headers=headers)


def test_files_waiting_for_their_shard_index_count_toward_the_quota(api: Api, tmp_path: Path) -> None:
    log = record_log(tmp_path / "flood", steps=4, shard_steps=2)
    run_id = int(api.post("/runs", json={"name": "flood"}).json()["id"])
    assert _upload(api, run_id, "manifest.json", (log / "manifest.json").read_bytes()).status_code == 204
    codes = [_upload(api, run_id, f"examples-{i:06d}.jsonl", b"x").status_code for i in range(42)]
    # every one of the first 40 waits for the shard index (judged: received, with a note); then the quota
    assert codes[:40] == [204] * 40 and codes[40:] == [429, 429], codes
    refused = _create(api, run_id, "examples-000099.jsonl", 1)
    detail = refused.json()["detail"]
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "10"
    assert "DVEMB_MAX_PENDING_FILES" in detail and "40 of them for their run's manifest or shard index" in detail
    assert "shards*.jsonl" in detail and "before its other files" in detail, detail
    assert "DELETE /uploads/{id}" in detail
    waiting = [f for f in api.get(f"/runs/{run_id}").json()["files"] if f["status"] == "received"]
    assert len(waiting) == 40 and all("waiting for the manifest" in f["error"] for f in waiting)
    # a file waiting for a manifest that may never come can be deleted: its place in the quota is free again
    location = _create(api, run_id, "examples-000100.jsonl", 1)
    assert location.status_code == 429
    assert api.delete(f"/uploads/{waiting[-1]['upload_id']}", headers=TUS).status_code == 204
    assert _upload(api, run_id, waiting[-1]["name"], b"x").status_code == 204

    # the index releases the 40 at once; another project's log goes
    # through meanwhile, and so does the flood's verdict (rejected)
    assert _upload(api, run_id, "shards.jsonl", (log / "shards.jsonl").read_bytes()).status_code == 204
    other = record_log(tmp_path / "other", steps=4, shard_steps=1)
    started = time.monotonic()
    result = upload_log(other, server=api.url, token=make_token("someone-else"), run_name="other")
    assert result["status"] == "ready" and result["rejected"] == {}, result
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 60
    while any(f["status"] in ("received", "validating") for f in api.get(f"/runs/{run_id}").json()["files"]):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    files = api.get(f"/runs/{run_id}").json()["files"]
    assert sum(f["status"] == "rejected" for f in files) == 40  # examples-000000.jsonl is listed, the rest not


def test_a_log_of_more_files_than_the_quota_goes_up_with_dvemb_upload(api: Api, token: str, tmp_path: Path) -> None:
    """dvemb upload sends manifests and shard indexes first: each shard is then validated as it arrives, so a log
    of more files than DVEMB_MAX_PENDING_FILES never waits on the quota (sent last, they would all wait)."""
    log = record_log(tmp_path / "many", steps=48, batch=2, shard_steps=1)
    assert len(list(log.glob("shard-*.safetensors"))) == 48
    started = time.monotonic()
    result = upload_log(log, server=api.url, token=token, run_name="many")
    assert result["status"] == "ready" and result["missing_files"] == [] and result["rejected"] == {}, result
    assert time.monotonic() - started < 60  # never waited out a 429 (10 s each)
