"""Multi-rank (DDP) logs through the service (issue 21, item 5): a ``manifest.json`` with ``world_size`` 2 used to
seal the run at once (ready, nothing missing), refuse ``manifest.rank1.json`` and ``shards.jsonl`` with 409, and
refuse a job ("no query set"). A real two-rank log (gloo, CPU) goes up in the CLI's order and in the dashboard's
(manifests first), each rank's files are validated against its own manifest, and a job computes exactly what
``dvemb compute`` computes on the merged log offline."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from service_harness import Api, free_port, record_log

from dvemb.client import upload_log
from dvemb.engine import compute, load_results

TUS = {"Tus-Resumable": "1.0.0"}

_RANK = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F, torch.distributed as dist
    import dvemb
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 8, 6, generator=generator), torch.randint(0, 3, (6, 8), generator=generator)
    rec = dvemb.Recorder(trained, sys.argv[1], shard_steps=2)
    local = slice(4 * rank, 4 * rank + 4)
    for step in range(6):
        with rec.step([8 * step + i for i in range(8)][local], optimizer):
            F.cross_entropy(trained(x[step, local]), y[step, local]).backward()
            optimizer.step()
            optimizer.zero_grad()
    queries, targets = torch.randn(5, 6, generator=generator), torch.randint(0, 3, (5,), generator=generator)
    rec.record_queries("val", [(queries, targets)])
    rec.close()
    dist.destroy_process_group()
    """
)


def record_two_ranks(directory: Path) -> Path:
    """A real two-rank DDP log (gloo on CPU): 6 steps of 8 examples, 4 per rank, one query set."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env["OMP_NUM_THREADS"] = "1"
    ranks = [
        subprocess.Popen([sys.executable, "-c", _RANK, str(directory)], env={**env, "RANK": str(rank)})
        for rank in range(2)
    ]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    assert (directory / "manifest.rank1.json").exists() and (directory / "shards.rank1.jsonl").exists()
    return directory


@pytest.fixture(scope="module")
def ddp_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_two_ranks(tmp_path_factory.mktemp("ddp") / "log")


def _upload(api: Api, run_id: int, path: Path, name: str | None = None) -> Any:
    data = path.read_bytes()
    meta = "filename " + base64.b64encode((name or path.name).encode()).decode()
    created = api.post(
        f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
    )
    assert created.status_code == 201, created.text
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    return api.patch(created.headers["Location"], content=data, headers=headers)


def _settled(api: Api, run_id: int, timeout: float = 60) -> dict[str, Any]:
    """The run once no file waits for the validator (files waiting for a manifest say so in their error)."""
    deadline = time.monotonic() + timeout
    while True:
        run: dict[str, Any] = api.get(f"/runs/{run_id}").json()
        if all(f["status"] not in ("received", "validating") or f["error"] for f in run["files"]):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)


def _assert_scores_equal_offline(api: Api, job_id: int, log: Path, out: Path) -> None:
    compute(log, out)
    expected = load_results(out)
    assert len(expected.example_ids) == 48  # both ranks' examples, merged
    for query in (None, 0, 4):
        for kind in ("helpful", "harmful"):
            params = {"query_set": "val", "kind": kind, "limit": 20, **({} if query is None else {"query": query})}
            got = api.get(f"/jobs/{job_id}/top", params=params).json()["data"]
            want = expected.top("val", kind=kind, query=query, k=20)
            assert [(r["step"], r["example_id"], r["score"]) for r in got] == [
                (w["step"], str(w["example_id"]), w["score"]) for w in want
            ]
    curve = api.get(f"/jobs/{job_id}/curve", params={"query_set": "val", "points": 1000}).json()
    assert curve["mean"] == expected.curve("val")["mean"].tolist() and len(curve["step"]) == 6
    ranked = api.get(f"/jobs/{job_id}/examples", params={"query_set": "val", "limit": 1000}).json()
    assert ranked["count"] == 48
    totals = expected.totals("val").mean(axis=1)
    for row in ranked["data"]:
        assert row["total"] == pytest.approx(float(totals[expected.example_ids.index(int(row["example_id"]))]))


def test_a_two_rank_log_uploaded_by_the_cli_computes_what_dvemb_compute_does(
    api: Api, token: str, ddp_log: Path, tmp_path: Path
) -> None:
    result = upload_log(ddp_log, server=api.url, token=token, run_name="ddp", analyze=True)
    assert result["status"] == "ready" and result["missing_files"] == [] and result["rejected"] == {}, result
    run = api.get(f"/runs/{result['run']}").json()
    assert run["num_steps"] == 6 and {f["name"] for f in run["files"]} >= {"manifest.rank1.json", "shards.rank1.jsonl"}
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    _assert_scores_equal_offline(api, job["id"], ddp_log, tmp_path / "offline")


def test_the_dashboards_order_manifests_first_waits_for_every_rank(api: Api, ddp_log: Path, tmp_path: Path) -> None:
    """The dashboard sends manifests first: rank 0's alone must not seal the run; what is still missing is named
    (rank 1's manifest, then each rank's shard index and shards), and each rank's files are judged against its own
    manifest."""
    run_id = int(api.post("/runs", json={"name": "ddp-browser"}).json()["id"])
    assert _upload(api, run_id, ddp_log / "manifest.json").status_code == 204
    run = _settled(api, run_id)
    assert run["status"] == "uploading" and "manifest.rank1.json" in run["missing_files"], run
    refused = api.post(f"/runs/{run_id}/jobs", json={})
    assert refused.status_code == 409 and "manifest.rank1.json" in refused.json()["detail"]
    # another run's rank 1 (three ranks; other layers) is refused, naming why, and the real one then taken
    rank1 = json.loads((ddp_log / "manifest.rank1.json").read_text())
    for change, words in (({"world_size": 3}, "of world size 3"), ({"layers": rank1["layers"][:1]}, "other layers")):
        (tmp_path / "manifest.rank1.json").write_text(json.dumps({**rank1, **change}))
        refused = _upload(api, run_id, tmp_path / "manifest.rank1.json")
        assert refused.status_code == 400 and words in refused.json()["detail"], refused.text
    assert _upload(api, run_id, ddp_log / "manifest.rank1.json").status_code == 204
    run = _settled(api, run_id)
    assert run["status"] == "uploading"
    assert {"shards.jsonl", "shards.rank1.jsonl", "shard-r1-000000.safetensors"} <= set(run["missing_files"]), run
    for index in ("shards.rank1.jsonl", "shards.jsonl"):
        assert _upload(api, run_id, ddp_log / index).status_code == 204
    # rank 1's shard under rank 0's name is judged against rank 0's index: refused, and the right bytes then taken
    wrong = _upload(api, run_id, ddp_log / "shard-r1-000000.safetensors", "shard-r0-000000.safetensors")
    assert wrong.status_code == 400 and "shard-r0-000000.safetensors" in wrong.json()["detail"], wrong.text
    rest = [p for p in ddp_log.iterdir() if p.suffix == ".safetensors"]
    for path in sorted(rest, key=lambda p: ("-r1-" not in p.name, p.name)):  # rank 1's shards first
        assert _upload(api, run_id, path).status_code == 204, path.name
    run = _settled(api, run_id)
    assert run["status"] == "ready" and run["missing_files"] == [], run
    job = api.post(f"/runs/{run_id}/jobs", json={}).json()
    finished = api.wait_job(job["id"])
    assert finished["status"] == "succeeded", finished
    _assert_scores_equal_offline(api, job["id"], ddp_log, tmp_path / "offline")


def test_a_single_process_log_still_ends_ready(api: Api, token: str, tmp_path: Path) -> None:
    """World size 1 is unchanged: manifest first, then its data, ready with nothing missing."""
    log = record_log(tmp_path / "single", steps=4, shard_steps=2)
    run_id = int(api.post("/runs", json={"name": "single"}).json()["id"])
    for name in ("manifest.json", *sorted(p.name for p in log.iterdir() if p.name != "manifest.json")):
        if not name.startswith("."):
            assert _upload(api, run_id, log / name).status_code == 204, name
    # Every file of one rank: the run becomes ready once each is judged. A file that arrived while the manifest was
    # still being validated waits for it with a note ("settled" for _settled) and is judged right after, so wait for
    # the verdicts themselves (a loaded machine took longer than that first look).
    deadline = time.monotonic() + 60
    run = _settled(api, run_id)
    while run["status"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)
        run = api.get(f"/runs/{run_id}").json()
    assert run["status"] == "ready" and run["missing_files"] == [], run
    assert json.loads((log / "manifest.json").read_text())["world_size"] == 1
