"""Issue 25.1: the whole service path against an S3-compatible bucket equals the path against a local directory.

A service of the test's own keeps every file in a bucket of a real S3-compatible server process (moto's standalone
server, over HTTP): its own PostgreSQL database, its own Redis, an API process and a worker process that share no
directory (each has its own data and scratch directory). A log uploaded to it and to the suite's local-directory
service, analysed with the same options, answers every read (top rows, curves, phases, one example's history, the
per-query curve and the box plot read from the results files, exports, an ad-hoc query scored against the stored
embeddings, a window ranked on demand from the scores file) exactly alike; a resumed upload keeps its tus offsets; a
rejected file and a deleted run leave no object behind.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import psycopg
import pytest
from obstore.store import from_url
from service_harness import PG_ADMIN, Api, S3Server, Worker, api_process, free_port, record_log, wait_until

from dvemb import open_log
from dvemb.client import upload_log

TUS = {"Tus-Resumable": "1.0.0"}


class _BucketService:
    def __init__(
        self, url: str, token: str, bucket_url: str, dirs: dict[str, Path], workers: list[Worker], database: str
    ) -> None:
        self.url, self.token, self.bucket_url, self.dirs = url, token, bucket_url, dirs
        self.workers, self.database = workers, database

    def keys(self, prefix: str = "") -> list[str]:
        store = from_url(self.bucket_url.rsplit("/", 1)[0])  # the bucket's root: keys start with the prefix
        return sorted(str(item["path"]) for batch in obstore.list(store, prefix=prefix or None) for item in batch)


@pytest.fixture(scope="module")
def bucket_service(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_BucketService]:
    """The service on a bucket, shared by this module's tests (each makes its own runs)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in s3_server.env.items():
            monkeypatch.setenv(key, value)  # this process reads the bucket to check it
        yield from _serve_from_a_bucket(s3_server, tmp_path_factory.mktemp("machines"))


def _serve_from_a_bucket(s3_server: S3Server, tmp_path: Path, workers: int = 1) -> Iterator[_BucketService]:
    """The service on a bucket: its own database, Redis, API process and ``workers`` worker processes, each with a
    data and scratch directory of its own (``dirs['api']``, ``dirs['worker']``, ``dirs['worker-1']``...)."""
    from test_broker_outage import RedisServer

    bucket_url = f"s3://{s3_server.bucket(f'dvemb-{uuid.uuid4().hex[:10]}')}/service"
    database = f"dvemb_s3_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    redis_server = RedisServer(free_port())
    redis_server.start()
    base = {k: v for k, v in os.environ.items() if not k.startswith("DVEMB_")}
    base.update(
        s3_server.env,
        DVEMB_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        DVEMB_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/0",
        DVEMB_STORAGE_URL=bucket_url,
        DVEMB_VALIDATION_WAIT_SECONDS="30",
        DVEMB_JOB_LEASE_SECONDS="3",
        OMP_NUM_THREADS="1",
    )
    names = ["worker", *(f"worker-{i}" for i in range(1, workers))]
    dirs = {"api": tmp_path / "api-machine", **{name: tmp_path / f"{name}-machine" for name in names}}
    api_env = {**base, "DVEMB_DATA_DIR": str(dirs["api"])}
    made = subprocess.run(
        [sys.executable, "-m", "dvemb.cli", "token", "--project", "bucket"],
        env=api_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    token = made.stdout.strip().splitlines()[-1]
    machines = [Worker({**base, "DVEMB_DATA_DIR": str(dirs[name])}) for name in names]
    try:
        with api_process(api_env) as url:
            try:
                for machine in machines:
                    machine.start()
                yield _BucketService(url, token, bucket_url, dirs, machines, database)
            finally:
                for machine in machines:
                    machine.stop()
    finally:
        redis_server.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _reads(api: Api, job_id: int, log: Path) -> dict[str, Any]:
    """Every read of a finished job that a user makes, ids of runs and jobs left out."""
    out: dict[str, Any] = {}
    for kind in ("helpful", "harmful"):
        for query in (None, 2):
            params = {"query_set": "val", "kind": kind, "limit": 50, **({} if query is None else {"query": query})}
            out[f"top-{kind}-{query}"] = api.get(f"/jobs/{job_id}/top", params=params).json()["data"]
        out[f"examples-{kind}"] = api.get(f"/jobs/{job_id}/examples", params={"query_set": "val", "kind": kind}).json()
    out["curve"] = api.get(f"/jobs/{job_id}/curve", params={"query_set": "val", "points": 1000}).json()
    out["phases"] = api.get(f"/jobs/{job_id}/phases", params={"query_set": "val"}).json()
    out["example"] = api.get(f"/jobs/{job_id}/examples/5", params={"query_set": "val"}).json()  # results files + log
    out["query-curve"] = api.get(f"/jobs/{job_id}/figures/phase", params={"query_set": "val", "query": 1}).json()
    out["box"] = api.get(f"/jobs/{job_id}/figures/distribution", params={"query_set": "val"}).json()
    out["metadata"] = api.get(f"/jobs/{job_id}/metadata", params={"ids": "1,2,70"}).json()
    out["export"] = api.get(f"/jobs/{job_id}/export/curve", params={"query_set": "val", "query": 0}).text
    out["export-box"] = api.get(f"/jobs/{job_id}/export/distribution", params={"query_set": "val"}).text
    queries = open_log(log).load_query_set("val")
    gradients = [{name: grads[q].tolist() for name, grads in queries.grads.items()} for q in (0, 3)]
    adhoc = api.post(f"/jobs/{job_id}/queries", json={"gradients": gradients, "top_k": 5})
    assert adhoc.status_code == 200 and adhoc.json()["status"] == "succeeded", adhoc.text
    out["adhoc"] = adhoc.json()["result"]
    window = api.post(f"/jobs/{job_id}/windows", json={"query_set": "val", "step_min": 2, "step_max": 6})
    assert window.status_code == 200 and window.json()["status"] == "succeeded", window.text
    top = api.get(f"/jobs/{job_id}/windows/{window.json()['id']}/top", params={"kind": "helpful", "limit": 100})
    out["window"] = top.json()["data"]
    for rows in (out["window"], out["adhoc"]["queries"]):
        assert rows
    summary = api.get(f"/jobs/{job_id}/summary").json()
    out["summary"] = {k: v for k, v in summary.items() if k not in ("seconds", "arguments", "log", "segment_processes")}
    return out


def test_the_service_on_a_bucket_answers_as_on_a_directory(
    bucket_service: _BucketService, api: Api, token: str, tmp_path: Path
) -> None:
    log = record_log(tmp_path / "log", text_of=lambda i: f"example number {i}")
    local = upload_log(log, server=api.url, token=token, run_name="on-disk", analyze=True)
    remote = upload_log(log, server=bucket_service.url, token=bucket_service.token, run_name="in-bucket", analyze=True)
    assert remote["status"] == "ready" and remote["rejected"] == {}, remote
    bucket = Api(bucket_service.url, bucket_service.token)
    try:
        local_job, remote_job = api.wait_job(local["job"]["id"]), bucket.wait_job(remote["job"]["id"])
        assert remote_job["status"] == "succeeded", remote_job
        assert remote_job["approximations"] == local_job["approximations"]
        run = remote["run"]
        # The validated log and the results are objects in the bucket; no upload part is left in staging.
        stored = bucket_service.keys(f"service/runs/{run}")
        assert sorted(k.rsplit("/", 1)[1] for k in stored if "/log/" in k) == sorted(
            p.name for p in log.iterdir() if not p.name.startswith(".")
        )
        assert not [k for k in stored if ".part/" in k]
        assert f"service/runs/{run}/results/{remote_job['id']}/summary.json" in stored
        assert _reads(bucket, remote_job["id"], log) == _reads(api, local_job["id"], log)
        # Neither machine kept a storage directory: the API's data directory has none, the worker's only scratch.
        assert not (bucket_service.dirs["api"] / "storage").exists()
        assert not (bucket_service.dirs["worker"] / "storage").exists()
        # A deleted run leaves no object behind (its ad-hoc query's vectors and windows included).
        assert bucket.delete(f"/runs/{run}").status_code == 204
        wait_until(lambda: not bucket_service.keys(f"service/runs/{run}"), 10, "the run's objects were not deleted")
    finally:
        bucket.client.close()


def _tus(api: Api, run_id: int, name: str, data: bytes) -> str:
    meta = "filename " + base64.b64encode(name.encode()).decode()
    created = api.post(
        f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
    )
    assert created.status_code == 201, created.text
    return str(created.headers["Location"])


def _patch(api: Api, location: str, offset: int, data: bytes) -> Any:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
    return api.patch(location, content=data, headers=headers)


def test_resumed_and_rejected_uploads_in_a_bucket(bucket_service: _BucketService, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log", steps=4, shard_steps=2)
    bucket = Api(bucket_service.url, bucket_service.token)
    try:
        run_id = bucket.post("/runs", json={"name": "resumed"}).json()["id"]
        for name in ("manifest.json", "shards.jsonl"):
            data = (log / name).read_bytes()
            assert _patch(bucket, _tus(bucket, run_id, name, data), 0, data).status_code == 204
        shard = (log / "shard-r0-000000.safetensors").read_bytes()
        location = _tus(bucket, run_id, "shard-r0-000000.safetensors", shard)
        assert _patch(bucket, location, 0, shard[:1000]).status_code == 204
        assert bucket.head(location).headers["Upload-Offset"] == "1000"  # what the bucket holds
        stale = _patch(bucket, location, 500, shard[500:])
        assert stale.status_code == 409 and stale.headers["Upload-Offset"] == "1000"
        assert _patch(bucket, location, 1000, shard[1000:]).status_code == 204
        files = {f["name"]: f for f in bucket.get(f"/runs/{run_id}").json()["files"]}
        assert files["shard-r0-000000.safetensors"]["status"] == "ready", files
        key = f"service/runs/{run_id}/log/shard-r0-000000.safetensors"
        assert obstore.get(from_url(bucket_service.bucket_url.rsplit("/", 1)[0]), key).bytes().to_bytes() == shard
        # A corrupted shard is rejected in words, and none of its bytes stay in the bucket.
        corrupt = bytearray((log / "shard-r0-000001.safetensors").read_bytes())
        corrupt[-1] ^= 0xFF
        location = _tus(bucket, run_id, "shard-r0-000001.safetensors", bytes(corrupt))
        rejected = _patch(bucket, location, 0, bytes(corrupt))
        assert rejected.status_code == 400 and "sha256" in rejected.text and "http" not in rejected.text, rejected.text
        assert not [k for k in bucket_service.keys(f"service/runs/{run_id}") if "000001" in k or ".part/" in k]
    finally:
        bucket.client.close()
