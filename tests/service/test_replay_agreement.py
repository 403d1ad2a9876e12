"""How far to trust a run's scores, on the service (issues 22 and 24.4): a run replayed exactly on the user's side
(`dvemb replay`, `dvemb trust`), its agreement uploaded with `dvemb upload-agreement` to the service's analysis of
the same log, checked to be about that analysis's scores, and shown on the run's page. Screenshot:
artifacts/dashboard-replay-agreement.png."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from playwright.sync_api import Browser, expect
from service_harness import Api
from test_dashboard import browser  # noqa: F401  (the module's Chromium fixture)
from test_dashboard_views import shot, sign_in

import dvemb
from dvemb.client import upload_log
from dvemb.engine import compute
from dvemb.replay import ReplayArguments, load_initial, replay, save_initial, save_replay, schedule_from_log, trust

ROOT = Path(__file__).resolve().parents[2]


def _make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)


def _replayed_run(work: Path) -> tuple[Path, dict[str, Any]]:
    """A small AdamW run recorded, computed, replayed exactly and compared: (log, trust record file)."""
    torch.manual_seed(0)
    x, y = torch.randn(48, 6, dtype=torch.float64), torch.randint(0, 3, (48,))
    val = (torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,)))
    model, optimizer = _make()
    save_initial(model, optimizer, work / "initial")
    rec = dvemb.Recorder(model, work / "log", dtype="float64")
    for _ in range(2):
        order = torch.randperm(48)
        for start in range(0, 48, 8):
            ids = order[start : start + 8]
            with rec.step(ids, optimizer):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
                optimizer.step()
                optimizer.zero_grad()
    rec.record_queries("val", [val])
    rec.close()
    compute(work / "log", work / "results")
    model, optimizer = _make()
    load_initial(model, optimizer, work / "initial")

    def loss_fn(forward: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(forward(batch[0]), batch[1], reduction="none")

    exact = replay(
        model,
        optimizer,
        schedule_from_log(work / "log"),
        loss_fn,
        lambda ids: (x[ids], y[ids]),
        [val],
        ReplayArguments(probe=0),
        query_set="val",
    )
    save_replay(exact, work / "results")
    record = trust(work / "results", "val")
    return work / "log", record


def test_a_replay_agreement_is_checked_stored_and_shown(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    log, record = _replayed_run(tmp_path)
    result = upload_log(log, server=api.url, token=token, run_name="replayed", analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    page_url = f"{server_url}/#/runs/{result['run']}?job={job['id']}"

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(page_url)
    sign_in(page, token)
    expect(page.locator("#replay-none")).to_contain_text("No exact replay of this run uploaded")

    # Refused: a record about other scores (409, naming what differs), an impossible value (422), another set (404).
    other = json.loads(json.dumps(record))
    other["all"]["occurrences"] += 1
    answer = api.put(f"/jobs/{job['id']}/replay-agreement/val", json=other)
    assert answer.status_code == 409 and "occurrences" in answer.json()["detail"], answer.text
    broken = json.loads(json.dumps(record))
    broken["all"]["spearman"] = 2.0
    assert api.put(f"/jobs/{job['id']}/replay-agreement/val", json=broken).status_code == 422
    elsewhere = {**record, "query_set": "test"}
    assert api.put(f"/jobs/{job['id']}/replay-agreement/test", json=elsewhere).status_code == 404
    assert api.get(f"/jobs/{job['id']}/replay-agreement").json()["data"] == {}

    # Accepted through the command line, from the file `dvemb trust` wrote.
    env = {**os.environ, "DVEMB_TOKEN": token}
    done = subprocess.run(
        [sys.executable, "-m", "dvemb.cli", "upload-agreement", str(tmp_path / "results" / "trust-val.json"),
         "--job", str(job["id"]), "--server", api.url],
        capture_output=True, text=True, env=env, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stored = api.get(f"/jobs/{job['id']}/summary").json()["replay_agreements"]["val"]
    assert stored["all"] == record["all"] and stored["removal"] == record["removal"]

    page.reload()
    shown = page.locator("#replay-agreement li[data-query-set=val]")
    spearman = record["all"]["spearman"]
    expect(shown).to_contain_text(f"Exact replay on val: Spearman {spearman:.2f}")
    expect(shown).to_contain_text(f"over {record['all']['occurrences']} occurrences")
    expect(shown).to_contain_text("First order: not probed")
    shot(page, "replay-agreement")
    page.close()
