"""Top examples per window of training through the API, against a naive numpy reference read from the job's
scores file: the stored windows (phases, tenths, epochs) and a step range computed on demand by the worker
(then cached); bad ranges; when to run data selection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from service_harness import Api

import dvemb
from dvemb.client import upload_log
from dvemb.formats import decode_ids
from server.selection import selection_timing
from server.settings import get_settings
from server.storage import results_dir


def record_epochs_log(directory: Path, *, steps: int = 30, batch: int = 8, examples: int = 120) -> Path:
    """A real log of an MLP trained on ``examples`` examples for steps * batch / examples epochs."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(examples, 10), torch.randint(0, 4, (examples,))
    rec = dvemb.Recorder(model, directory, proj_dim=64, shard_steps=5)
    for step in range(steps):
        ids = [(step * batch + i) % examples for i in range(batch)]
        with rec.step(ids, optimizer):
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [(torch.randn(5, 10), torch.randint(0, 4, (5,)))])
    rec.describe(list(range(examples)), labels=y.tolist())
    rec.close()
    return directory


def finished_job(api: Api, token: str, tmp_path: Path, top_k: int = 12) -> tuple[int, int]:
    log = record_epochs_log(tmp_path / "log")
    run = upload_log(log, server=api.url, token=token, run_name="windows")
    files = api.get(f"/runs/{run['run']}").json()["files"]
    assert run["status"] == "ready", [(f["name"], f["status"], f["error"]) for f in files]
    job = api.wait_job(api.post(f"/runs/{run['run']}/jobs", json={"top_k": top_k}).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return int(run["run"]), int(job["id"])


def naive(
    directory: Path, step_min: int, step_max: int, epoch: int | None, query: int | None, kind: str
) -> list[tuple[str, int, float]]:
    """(example id, step, score) of the window's occurrences of the kind's sign (helpful: positive, harmful:
    negative) sorted whole (score, then row)."""
    occurrences = load_file(str(directory / "occurrences.safetensors"))
    ids = [str(i) for i in decode_ids(load_file(str(directory / "examples.safetensors")))]
    scores = np.load(directory / "scores-val.npy").astype(np.float64)
    column = scores.mean(1) if query is None else scores[:, query]
    steps, epochs = occurrences["row_step"], occurrences["epoch"]
    inside = (steps >= step_min) & (steps <= step_max) & ((epochs == epoch) if epoch is not None else True)
    inside &= column > 0 if kind == "helpful" else column < 0
    rows = np.flatnonzero(inside)
    order = rows[np.lexsort((rows, (-1 if kind == "helpful" else 1) * column[rows]))]
    return [(ids[int(occurrences["example_index"][r])], int(steps[r]), float(column[r])) for r in order]


def shown(
    api: Api, job_id: int, window_id: int, query: int | None, kind: str
) -> tuple[list[tuple[str, int, float]], dict[str, Any]]:
    params: dict[str, Any] = {"kind": kind, "limit": 1000, **({} if query is None else {"query": query})}
    body = api.get(f"/jobs/{job_id}/windows/{window_id}/top", params=params).json()
    return [(r["example_id"], r["step"], r["score"]) for r in body["data"]], body


def assert_same(got: list[tuple[str, int, float]], expected: list[tuple[str, int, float]]) -> None:
    assert [(e, s) for e, s, _ in got] == [(e, s) for e, s, _ in expected]
    np.testing.assert_allclose([v for *_, v in got], [v for *_, v in expected], rtol=1e-12, atol=0)


def test_stored_and_on_demand_windows_equal_the_naive_reference(api: Api, token: str, tmp_path: Path) -> None:
    run_id, job_id = finished_job(api, token, tmp_path)
    directory = results_dir(get_settings().storage, run_id, job_id)
    stored = api.get(f"/jobs/{job_id}/windows", params={"query_set": "val"}).json()["data"]
    kinds = [w["kind"] for w in stored]
    assert kinds == ["phase"] * kinds.count("phase") + ["tenth"] * 10 + ["epoch"] * 2  # 240 rows of 120 examples
    assert kinds.count("phase") >= 2
    for window in stored:
        assert window["status"] == "succeeded" and window["occurrences"] > 0
        for query, kind in ((None, "helpful"), (None, "harmful"), (3, "harmful")):
            got, body = shown(api, job_id, window["id"], query, kind)
            expected = naive(directory, window["step_min"], window["step_max"], window["epoch"], query, kind)
            assert got, f"{window['name']}: empty table"
            assert_same(got, expected[:12])
            assert body["chosen"] == window["chosen"] and "exact" in body["chosen"]
    early = stored[0]
    assert early["chosen"] == f"top 12 of steps 0–{early['step_max']} (early phase), exact"
    assert stored[-1]["chosen"] == "top 12 of epoch 1 (every step), exact"

    # Any other range: computed by the worker from the scores file, then answered from the cache.
    asked = api.post(f"/jobs/{job_id}/windows", json={"query_set": "val", "step_min": 3, "step_max": 7, "epoch": 0})
    assert asked.status_code == 200, asked.text
    window = asked.json()
    assert window["status"] == "succeeded" and window["occurrences"] == 5 * 8
    assert window["chosen"] == "top 12 of steps 3–7, epoch 0, exact, computed on demand from the scores file"
    for query, kind in ((None, "helpful"), (4, "helpful"), (None, "harmful")):
        assert_same(shown(api, job_id, window["id"], query, kind)[0], naive(directory, 3, 7, 0, query, kind)[:12])
    again = api.post(f"/jobs/{job_id}/windows", json={"query_set": "val", "step_min": 3, "step_max": 7, "epoch": 0})
    assert again.json()["id"] == window["id"]  # cached
    same_as_phase = api.post(
        f"/jobs/{job_id}/windows", json={"query_set": "val", "step_min": 0, "step_max": early["step_max"]}
    ).json()
    assert same_as_phase["id"] == early["id"]  # the stored phase window answers it
    listed = api.get(f"/jobs/{job_id}/windows", params={"query_set": "val"}).json()["data"]
    assert listed[-1]["id"] == window["id"]

    # The overall top says how it was chosen when filtered.
    top = api.get(f"/jobs/{job_id}/top", params={"query_set": "val", "phase": "early"}).json()
    assert top["chosen"].startswith("overall top 12 of the whole run, filtered to phase early")


def test_bad_windows_are_refused_in_words(api: Api, token: str, tmp_path: Path) -> None:
    _, job_id = finished_job(api, token, tmp_path, top_k=5)
    past = api.post(f"/jobs/{job_id}/windows", json={"query_set": "val", "step_min": 0, "step_max": 30})
    assert past.status_code == 400 and "past the run's last step 29" in past.json()["detail"]
    backwards = api.post(f"/jobs/{job_id}/windows", json={"query_set": "val", "step_min": 9, "step_max": 2})
    assert backwards.status_code == 400 and "step_min <= step_max" in backwards.json()["detail"]
    unknown = api.post(f"/jobs/{job_id}/windows", json={"query_set": "nope", "step_min": 0, "step_max": 2})
    assert unknown.status_code == 404 and unknown.json()["error"]
    assert api.get(f"/jobs/{job_id}/windows/999999/top").status_code == 404
    window = api.get(f"/jobs/{job_id}/windows", params={"query_set": "val"}).json()["data"][0]
    assert api.get(f"/jobs/{job_id}/windows/{window['id']}/top", params={"query": 5}).status_code == 400


def test_selection_timing_from_the_api_equals_the_function_on_the_curve_file(
    api: Api, token: str, tmp_path: Path
) -> None:
    run_id, job_id = finished_job(api, token, tmp_path, top_k=5)
    curve = load_file(str(results_dir(get_settings().storage, run_id, job_id) / "curve-val.safetensors"))
    phases = api.get(f"/jobs/{job_id}/phases", params={"query_set": "val"}).json()
    for measure in ("per_lr", "raw"):
        got = api.get(
            f"/jobs/{job_id}/selection", params={"query_set": "val", "share": 0.8, "windows": 2, "measure": measure}
        ).json()
        weights = (
            curve["abs_sum"] / np.where(curve["lr"] > 0, curve["lr"], np.inf)
            if measure == "per_lr"
            else curve["abs_sum"]
        )
        steps = curve["step"].astype(np.int64)
        expected = selection_timing(steps, steps, np.abs(weights), phases, share=0.8, max_windows=2, measure=measure)
        assert got["fewest_steps"]["windows"] == [
            {k: (v if k in ("first", "last") else got_w[k]) for k, v in w.items()}
            for w, got_w in zip(expected["fewest_steps"]["windows"], got["fewest_steps"]["windows"], strict=True)
        ]
        assert got["fewest_steps"]["share_of_influence"] >= 0.8 - 1e-9
        assert got["early_late"] == expected["early_late"] and got["resolution_steps"] == 1
        assert got["recommendation"] == expected["recommendation"]
    bad = api.get(f"/jobs/{job_id}/selection", params={"query_set": "val", "share": 1.5})
    assert bad.status_code == 422
