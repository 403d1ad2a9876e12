"""A log written by the recorder, uploaded, computed by the worker and queried, equals `dvemb compute` offline."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from service_harness import Api, Worker, record_log

from dvemb import open_log
from dvemb.client import upload_log
from dvemb.engine import compute, load_results
from server.settings import get_settings


def test_upload_compute_query_equals_offline(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "exp1")
    result = upload_log(log, server=api.url, token=token, run_name="exp1", analyze=True)
    assert result["status"] == "ready", result
    assert result["missing_files"] == [] and result["rejected"] == {}
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0

    offline = tmp_path / "offline"
    compute(log, offline)
    expected = load_results(offline)
    run = next(r for r in api.get("/runs", params={"search": "exp1"}).json()["data"] if r["name"] == "exp1")
    assert run["num_examples"] == len(expected.example_ids) > 0  # the runs list's "examples" column
    for query in (None, 0, 5):
        for kind in ("helpful", "harmful"):
            params = {"query_set": "val", "kind": kind, "limit": 10, **({} if query is None else {"query": query})}
            got = api.get(f"/jobs/{job['id']}/top", params=params).json()["data"]
            want = expected.top("val", kind=kind, query=query, k=10)
            assert [(r["step"], r["example_id"]) for r in got] == [(w["step"], str(w["example_id"])) for w in want]
            assert [r["score"] for r in got] == [w["score"] for w in want]

    curve = api.get(f"/jobs/{job['id']}/curve", params={"query_set": "val", "points": 5}).json()
    assert len(curve["step"]) == 5 and curve["step"][0] == 0
    full = api.get(f"/jobs/{job['id']}/curve", params={"query_set": "val", "points": 1000}).json()
    assert full["mean"] == expected.curve("val")["mean"].tolist()
    phases = api.get(f"/jobs/{job['id']}/phases", params={"query_set": "val"}).json()
    assert phases == expected.phases("val")
    example = api.get(f"/jobs/{job['id']}/examples/3", params={"query_set": "val"}).json()
    assert [h["step"] for h in example["history"]] == [0]
    early = api.get(f"/jobs/{job['id']}/top", params={"query_set": "val", "phase": "late", "limit": 100}).json()
    assert all(r["phase"] == "late" for r in early["data"])
    # label and source filters, and the exact per-example ranking over all examples
    odd = api.get(f"/jobs/{job['id']}/top", params={"query_set": "val", "source": "odd", "limit": 100}).json()
    assert odd["count"] > 0 and all(r["source"] == "odd" and int(r["example_id"]) % 2 == 1 for r in odd["data"])
    ranked = api.get(
        f"/jobs/{job['id']}/examples", params={"query_set": "val", "kind": "harmful", "label": "2", "limit": 1000}
    ).json()
    totals = expected.totals("val").mean(axis=1)
    labelled = {str(i) for i, e in enumerate(expected.example_ids) if _label_of(log, e) == "2"}
    assert {r["example_id"] for r in ranked["data"]} == labelled and ranked["count"] == len(labelled)
    want = sorted(labelled, key=lambda e: totals[expected.example_ids.index(int(e))])
    assert [r["example_id"] for r in ranked["data"]] == want
    # the uploaded files are in the run's log directory, nothing is left in staging
    stored = get_settings().storage / "runs" / str(result["run"])
    assert sorted(p.name for p in (stored / "log").iterdir()) == sorted(
        p.name for p in log.iterdir() if not p.name.startswith(".")
    )
    assert not list((stored / "staging").glob("*.part"))
    # deleting the run removes its rows and its files
    assert api.delete(f"/runs/{result['run']}").status_code == 204
    assert api.get(f"/runs/{result['run']}").status_code == 404
    assert not stored.exists()


def test_adhoc_query_matches_offline_top_k(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "adhoc")
    result = upload_log(log, server=api.url, token=token, run_name="adhoc", analyze=True)
    job = api.wait_job(result["job"]["id"])
    queries = open_log(log).load_query_set("val")
    gradients = [{name: grads[q].tolist() for name, grads in queries.grads.items()} for q in (0, 4)]
    answer = api.post(f"/jobs/{job['id']}/queries", json={"gradients": gradients, "top_k": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "succeeded"
    compute(log, tmp_path / "offline-adhoc")
    expected = load_results(tmp_path / "offline-adhoc")
    for position, q in enumerate((0, 4)):
        for kind in ("helpful", "harmful"):
            got = body["result"]["queries"][position][kind]
            want = expected.top("val", kind=kind, query=q, k=5)
            assert [r["row"] for r in got] == [w["row"] for w in want]
            assert [r["score"] for r in got] == pytest.approx([w["score"] for w in want], rel=1e-4)
    assert api.get(f"/queries/{body['id']}").json()["result"] == body["result"]
    bad = api.post(f"/jobs/{job['id']}/queries", json={"gradients": [{"0": [1.0, 2.0]}]})
    assert bad.status_code == 400 and "has 2 values" in bad.json()["detail"]


def _label_of(log: Path, example_id: int) -> str:
    return next(str(r["label"]) for r in open_log(log).iter_examples() if r["id"] == example_id)


def test_adam_run_says_which_propagation_its_scores_follow(api: Api, token: str, tmp_path: Path) -> None:
    """An Adam log is scored with the Adam propagation (equal to offline), and the API says so next to
    the scores; asking for the SGD proxy gives the proxy's scores, labelled as such."""
    log = record_log(tmp_path / "adam", optimizer_name="adam")
    result = upload_log(log, server=api.url, token=token, run_name="adam", analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded" and job["propagation"] == "Adam", job
    top = api.get(f"/jobs/{job['id']}/top", params={"query_set": "val", "limit": 10}).json()
    assert top["propagation"] == "Adam"
    offline = tmp_path / "offline"
    compute(log, offline)
    # float32 accumulation: the worker's thread count changes the products' rounding (and the step means the
    # default batch removal subtracts), so the scores agree to float32 precision, not bit for bit
    expected = [w["score"] for w in load_results(offline).top("val", k=10)]
    assert [r["score"] for r in top["data"]] == pytest.approx(expected, rel=1e-5, abs=1e-9)

    proxy = api.post(f"/runs/{result['run']}/jobs", json={"propagation": "sgd-proxy"}).json()
    proxy = api.wait_job(proxy["id"])
    assert proxy["status"] == "succeeded" and proxy["propagation"] == "SGD proxy", proxy
    summary = api.get(f"/jobs/{proxy['id']}/summary").json()
    assert summary["propagation"] == "proxy" and "sgd-proxy" in summary["note"]
    proxy_top = api.get(f"/jobs/{proxy['id']}/top", params={"query_set": "val", "limit": 10}).json()
    assert proxy_top["propagation"] == "SGD proxy"
    assert [r["score"] for r in proxy_top["data"]] != [r["score"] for r in top["data"]]


def test_clients_waiting_for_answers_do_not_starve_the_api(
    api: Api, token: str, worker: Worker, tmp_path: Path
) -> None:
    """45 ad-hoc queries that wait for a worker that is down must not hold the API's threads: /health and a
    top-k read still answer at once (issue 13, item 1: a thread per waiting request froze the API)."""
    log = record_log(tmp_path / "wait")
    result = upload_log(log, server=api.url, token=token, run_name="wait", analyze=True)
    job = api.wait_job(result["job"]["id"])
    queries = open_log(log).load_query_set("val")
    gradient = {name: grads[0].tolist() for name, grads in queries.grads.items()}
    worker.kill()
    try:
        with httpx.Client(base_url=f"{api.url}/api/v1", headers={"Authorization": f"Bearer {token}"}) as client:

            def wait_for_answer() -> int:
                body = {"gradients": [gradient], "wait_seconds": 4}
                return client.post(f"/jobs/{job['id']}/queries", json=body, timeout=30).status_code

            with ThreadPoolExecutor(45) as pool:
                waiting = [pool.submit(wait_for_answer) for _ in range(45)]
                time.sleep(1.0)  # all 45 are now waiting
                assert not any(w.done() for w in waiting)
                started = time.monotonic()
                assert client.get("/health").status_code == 200
                assert client.get(f"/jobs/{job['id']}/top", params={"query_set": "val"}).status_code == 200
                assert time.monotonic() - started < 1.0
                assert [w.result() for w in waiting] == [202] * 45  # no answer in time: 202 and a Location
    finally:
        worker.start()


def test_an_ad_hoc_answer_is_bounded(api: Api, token: str, tmp_path: Path) -> None:
    """Issue 13, item 10: one ad-hoc query returned 43.6 MB; queries x top_k is capped with a clear 400."""
    log = record_log(tmp_path / "bounded")
    job = api.wait_job(upload_log(log, server=api.url, token=token, run_name="bounded", analyze=True)["job"]["id"])
    queries = open_log(log).load_query_set("val")
    gradient = {name: grads[0].tolist() for name, grads in queries.grads.items()}
    response = api.post(f"/jobs/{job['id']}/queries", json={"gradients": [gradient] * 20, "top_k": 1000})
    assert response.status_code == 400 and "ask for fewer queries or a smaller top_k" in response.json()["detail"]
