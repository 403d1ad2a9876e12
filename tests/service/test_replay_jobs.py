"""Exact replays on the service's workers (issue 22, item 3): a run's replay bundle uploaded with its log (also once
the run is complete), validated before anything can use it, replayed by a worker on request, its agreement with the
job's scores stored and its files next to the results; a replay whose worker is killed resumes, on the next worker,
from the checkpoints the first one left in storage, with the same scores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from service_harness import Api, Worker, wait_until

import dvemb
from dvemb.client import upload_log
from dvemb.replay import ReplayArguments, replay, schedule_from_log
from dvemb.replay.bundle import BUNDLE_NAME, write_bundle


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)


def _record(work: Path, steps: int) -> tuple[Path, Any]:
    """An AdamW run of ``steps`` steps of 4 recorded into ``work/log``, its bundle written aside in ``work``; the
    user's own replay of it (a function of the removal)."""
    g = torch.Generator().manual_seed(0)
    n = 48
    x, y = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    val = (torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
    model, optimizer = _model()
    write_bundle(
        work / BUNDLE_NAME,
        model=model,
        optimizer=optimizer,
        ids=list(range(n)),
        examples={"inputs": x, "labels": y},
        query_sets={"val": {"inputs": val[0], "labels": val[1]}},
    )
    rec = dvemb.Recorder(model, work / "log", dtype="float64")
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(steps * 4 // n + 1)])
    for t in range(steps):
        ids = order[4 * t : 4 * t + 4]
        with rec.step(ids, optimizer):
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [val])
    rec.close()

    def own(removal: str) -> np.ndarray:
        model, optimizer = _model()
        return replay(
            model,
            optimizer,
            schedule_from_log(work / "log"),
            lambda forward, b: F.cross_entropy(forward(b[0]), b[1], reduction="none"),
            lambda ids: (x[ids], y[ids]),
            [val],
            ReplayArguments(removal=removal),
        ).scores

    return work / "log", own


def _wait_replay(api: Api, job: int, replay: int, timeout: float = 180) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def settled() -> bool:
        found.update(api.get(f"/jobs/{job}/replays/{replay}").json())
        return found["status"] in ("succeeded", "failed")

    wait_until(settled, timeout, f"replay {replay} to finish")
    return found


def _results(service_env: dict[str, str], run: int, job: int) -> Path:
    return Path(service_env["DVEMB_STORAGE_DIR"]) / "runs" / str(run) / "results" / str(job)


def test_a_bundle_uploaded_after_the_log_is_replayed_by_a_worker_and_its_agreement_stored(
    api: Api, token: str, tmp_path: Path, service_env: dict[str, str]
) -> None:
    log, own = _record(tmp_path, steps=24)
    result = upload_log(log, server=api.url, token=token, run_name="bundled", analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    jid, run = job["id"], result["run"]

    # Without a bundle: refused with the way to give one; an unknown set 404, a probe out of bounds 422.
    refused = api.post(f"/jobs/{jid}/replays", json={"query_set": "val"})
    assert refused.status_code == 409 and BUNDLE_NAME in refused.json()["detail"], refused.text
    assert api.post(f"/jobs/{jid}/replays", json={"query_set": "nope"}).status_code == 404
    assert api.post(f"/jobs/{jid}/replays", json={"query_set": "val", "probe": 99}).status_code == 422

    # The bundle comes once the run is complete: accepted, validated, and the run stays complete.
    shutil.copy(tmp_path / BUNDLE_NAME, log / BUNDLE_NAME)
    added = upload_log(log, server=api.url, token=token, run_name="bundled")  # judged when it returns
    assert added["run"] == run and added["rejected"] == {}, added
    files = {f["name"]: f for f in api.get(f"/runs/{run}").json()["files"]}
    assert files[BUNDLE_NAME]["status"] == "ready", files[BUNDLE_NAME]
    assert api.get(f"/runs/{run}").json()["status"] == "ready"

    started = api.post(f"/jobs/{jid}/replays", json={"query_set": "val", "probe": 2})
    assert started.status_code == 202, started.text
    done = _wait_replay(api, jid, started.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["summary"]["removal"] == "batch"
    assert len(done["summary"]["probe"]["scales"]) == 3 and "records" not in done["summary"]["probe"]

    # The worker's replay is the user's own, to round-off; its files and the agreement are next to the results.
    folder = _results(service_env, run, jid)
    scores = np.load(folder / "replay-val.npy")
    expected = own("batch")
    assert scores.shape == expected.shape and np.abs(scores - expected).max() <= 1e-12 * np.abs(expected).max()
    trust = json.loads((folder / "trust-val.json").read_text())
    stored = api.get(f"/jobs/{jid}/summary").json()["replay_agreements"]["val"]
    assert stored["all"] == trust["all"] and stored["all"]["occurrences"] == 24 * 4
    assert stored["first_order_verdict"] in ("predictable", "partly predictable", "not predictable")  # probed
    assert not [p for p in (folder / "replay-work").rglob("*") if p.is_file()]  # its work files go once it is in
    listed = api.get(f"/jobs/{jid}/replays").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == started.json()["id"]


def test_a_bundle_that_misses_the_logs_examples_fails_the_replay_in_words(api: Api, token: str, tmp_path: Path) -> None:
    log, _ = _record(tmp_path, steps=8)
    model, optimizer = _model()
    write_bundle(  # only the first 10 examples: the log's others are not in it
        log / BUNDLE_NAME,
        model=model,
        optimizer=optimizer,
        ids=list(range(10)),
        examples={"inputs": torch.zeros(10, 6, dtype=torch.float64), "labels": torch.zeros(10, dtype=torch.int64)},
        query_sets={
            "val": {"inputs": torch.zeros(2, 6, dtype=torch.float64), "labels": torch.zeros(2, dtype=torch.int64)}
        },
    )
    result = upload_log(log, server=api.url, token=token, run_name="short-bundle", analyze=True)
    job = api.wait_job(result["job"]["id"])
    # Through the command line, followed until it ends: it fails, in words, with the command's status.
    command = [sys.executable, "-m", "dvemb.cli", "request-replay", "--job", str(job["id"]), "--query-set", "val",
               "--wait", "--server", api.url]  # fmt: skip
    env = {**os.environ, "DVEMB_TOKEN": token}
    answer = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=300)
    assert answer.returncode == 1, answer.stderr
    done = json.loads(answer.stdout)
    assert done["status"] == "failed" and "is not in the replay bundle" in done["error"], done
    assert api.get(f"/jobs/{job['id']}/summary").json()["replay_agreements"] == {}


def test_a_replay_whose_worker_is_killed_resumes_from_its_checkpoints_in_storage(
    api: Api, token: str, tmp_path: Path, worker: Worker, service_env: dict[str, str]
) -> None:
    log, own = _record(tmp_path, steps=400)
    shutil.copy(tmp_path / BUNDLE_NAME, log / BUNDLE_NAME)
    # A worker of its own with an 8 s lease instead of the suite's 3 s: saving a checkpoint every step, the replay
    # keeps its process so busy that on a loaded machine its heartbeat (every third of the lease) once missed 3 s
    # twice, and the live replay was taken for dead until it hit the attempt cap.
    # Its attempt cap is 10, not 3: a clean clone's CI run (at e71f5ba, beside the heaviest tests) still saw the
    # replay taken over twice after the kill and failed "started 3 times"; this test is about resuming from the
    # checkpoints, and a takeover resumes from them too. A renewal that comes late is now logged with the fix.
    patient = Worker({**service_env, "DVEMB_JOB_LEASE_SECONDS": "8", "DVEMB_TASK_MAX_ATTEMPTS": "10"})
    worker.kill()
    try:
        patient.start()
        result = upload_log(log, server=api.url, token=token, run_name="killed", analyze=True)
        job = api.wait_job(result["job"]["id"])
        jid = job["id"]
        started = api.post(f"/jobs/{jid}/replays", json={"query_set": "val", "checkpoint_every": 1})
        assert started.status_code == 202, started.text
        rid = started.json()["id"]
        # Killed in the middle of its forward pass (every state kept: checkpoints in storage as it goes).
        wait_until(lambda: api.get(f"/jobs/{jid}/replays/{rid}").json()["progress"] > 0.1, 120, "the replay to start")
        patient.kill()
        progress = api.get(f"/jobs/{jid}/replays/{rid}").json()["progress"]
        assert 0.1 < progress < 1.0, progress
        time.sleep(0.5)
        patient.start()
        done = _wait_replay(api, jid, rid)
    finally:
        patient.stop()
        worker.start()
    assert done["status"] == "succeeded", (done.get("error"), done.get("attempts"))
    assert done["summary"]["forward_steps"] < 400  # the forward pass went on from the last checkpoint
    scores = np.load(_results(service_env, result["run"], jid) / "replay-val.npy")
    expected = own("batch")
    assert np.abs(scores - expected).max() <= 1e-12 * np.abs(expected).max()
