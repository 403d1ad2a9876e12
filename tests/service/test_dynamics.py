"""Value dynamics through the service: a log with checkpoint query sets gives, through a real worker, the
engine's dynamics in the API and a plot in the dashboard (headless Chromium)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from playwright.sync_api import Browser, expect
from service_harness import Api
from test_dashboard import browser  # noqa: F401  (the module's Chromium fixture)
from test_dashboard_views import downloaded
from test_dashboard_windows import sign_in

import dvemb
from dvemb.client import upload_log
from dvemb.engine import compute
from server.figures import dynamics_figure

STEPS, BATCH, CHECKPOINTS = 30, 8, (10, 20)


def _record(directory: Path) -> Path:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(STEPS * BATCH, 10), torch.randint(0, 4, (STEPS * BATCH,))
    queries = [(torch.randn(6, 10), torch.randint(0, 4, (6,)))]
    rec = dvemb.Recorder(model, directory, proj_dim=16, shard_steps=7)
    for step in range(STEPS):
        if step in CHECKPOINTS:
            rec.record_queries("val", queries, checkpoint=True)
        ids = list(range(step * BATCH, (step + 1) * BATCH))
        with rec.step(ids, optimizer):
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", queries)
    rec.close()
    return directory


def test_dynamics_figure_is_one_line_per_trained_tenth() -> None:
    entry = {
        "checkpoints": [5, 10],
        "buckets": [[0, 4], [5, 9]],
        "mean": [[0.5, None], [0.25, -1.0]],
        "count": [[4, 0], [4, 4]],
    }
    figure = dynamics_figure(entry, title="t")
    assert [t["name"] for t in figure["data"]] == ["trained at steps 0–4", "trained at steps 5–9"]
    assert figure["data"][0]["x"] == [5, 10] and figure["data"][0]["y"] == [0.5, 0.25]
    assert figure["data"][1]["y"] == [None, -1.0]  # not trained yet at checkpoint 5
    assert dynamics_figure({**entry, "mean": [[None, None], [None, None]]})["data"] == []


def test_dynamics_in_api_and_dashboard(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    log = _record(tmp_path / "log")
    result = upload_log(log, server=api.url, token=token, run_name="dynamics")
    assert result["status"] == "ready", result
    run_id = int(result["run"])
    job = api.wait_job(api.post(f"/runs/{run_id}/jobs", json={}).json()["id"])
    assert job["status"] == "succeeded", job
    series = api.get(f"/jobs/{job['id']}/dynamics").json()["series"]
    assert list(series) == ["val"]
    assert series["val"]["checkpoints"] == [10, 20, STEPS]

    offline = compute(log, tmp_path / "offline")
    expected = np.array(offline["dynamics"]["val"]["mean"], dtype=float)
    got = np.array(series["val"]["mean"], dtype=float)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9, equal_nan=True)
    assert np.isnan(got[0, 5:]).all() and np.isfinite(got[2]).all()  # not trained yet / all trained

    missing = api.get(f"/jobs/{job['id']}/figures/dynamics", params={"series": "nope"})
    assert missing.status_code == 400 and "val" in missing.json()["detail"]

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in(page, server_url, token, run_id)
    expect(page.get_by_role("heading", name="Value dynamics")).to_be_visible()
    assert not errors, errors
    lines = page.evaluate("document.getElementById('dynamics-plot').data.map(t => t.x.length)")
    assert lines and all(n == 3 for n in lines)

    # Both figures below the tables are exportable, exactly as drawn (issue 15 item 5: every curve).
    exported = api.get(f"/jobs/{job['id']}/export/dynamics", params={"series": "val", "format": "parquet"})
    assert exported.status_code == 200, exported.text
    rows = pq.read_table(io.BytesIO(exported.content)).to_pylist()
    assert len(rows) == 3 * 10 and [r["checkpoint"] for r in rows[::10]] == [10, 20, STEPS]
    means = np.array([[r["mean"] for r in rows[c * 10 : (c + 1) * 10]] for c in range(3)], dtype=float)
    np.testing.assert_array_equal(means, got)
    assert [[r["first_step"], r["last_step"]] for r in rows[:10]] == series["val"]["buckets"]
    assert [[r["count"] for r in rows[c * 10 : (c + 1) * 10]] for c in range(3)] == series["val"]["count"]
    on_page = downloaded(page, "dynamics", "csv")
    assert [(int(r["checkpoint"]), int(r["first_step"]), r["count"]) for r in on_page] == [
        (r["checkpoint"], r["first_step"], str(r["count"])) for r in rows
    ]
    missing = api.get(f"/jobs/{job['id']}/export/dynamics", params={"series": "nope"})
    assert missing.status_code == 400 and "val" in missing.json()["detail"]

    drawn = page.evaluate("document.getElementById('distribution').data.map(t => [t.name, t.y])")
    points = downloaded(page, "distribution", "csv")
    by_phase = {name: [float(p["score"]) for p in points if p["phase"] == name] for name, _ in drawn}
    for name, values in drawn:
        np.testing.assert_allclose(by_phase[name], values, rtol=1e-12)
    assert sum(len(v) for _, v in drawn) == len(points) == STEPS * BATCH  # fewer than the sample: every occurrence
    assert [int(p["row"]) for p in points] == list(range(STEPS * BATCH))
    page.close()


def test_dynamics_needs_a_finished_job(api: Api) -> None:
    response = api.get("/jobs/999999/dynamics")
    assert response.status_code == 404 and set(response.json()) >= {"error", "detail"}
