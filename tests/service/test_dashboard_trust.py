"""No silent approximation (issue 20.5): a run recorded with a random projection and the empirical curvature says so
in every job, top-examples and comparison answer of the API, and on the run's page ("How far to trust these scores",
and a marker with the list next to every score column's header); an Adam run lists the second moment its projected
layers drop, and its SGD-proxy job the proxy. Screenshot: artifacts/dashboard-trust.png."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, expect
from service_harness import Api, record_log
from test_dashboard import browser  # noqa: F401  (the module's Chromium fixture)
from test_dashboard_views import shot, sign_in

from dvemb.client import upload_log

EXPECTED = ["curvature-empirical", "random-projection"]  # one block over both layers, every parameter tracked


def _analysed(api: Api, token: str, tmp_path: Path) -> tuple[int, int]:
    """(run id, job id) of a new run recorded with the empirical curvature and the random projection, analysed."""
    log = record_log(tmp_path / "log", steps=12, batch=8, curvature="empirical", projection="random")
    result = upload_log(log, server=api.url, token=token, run_name="approximated", analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    return int(result["run"]), int(job["id"])


def _kinds(answer: dict[str, Any]) -> list[str]:
    return [a["kind"] for a in answer["approximations"]]


def test_job_top_window_and_compare_answers_carry_the_approximations(api: Api, token: str, tmp_path: Path) -> None:
    run_id, job_id = _analysed(api, token, tmp_path)
    job = api.get(f"/jobs/{job_id}").json()
    assert _kinds(job) == EXPECTED
    assert all(a["label"] and a["detail"] for a in job["approximations"])
    summary = api.get(f"/jobs/{job_id}/summary").json()
    assert summary["approximations"] == job["approximations"] and summary["tracked_share"] == 1.0
    assert [_kinds(j) for j in api.get(f"/runs/{run_id}/jobs").json()["data"]] == [EXPECTED]
    for kind in ("helpful", "harmful"):
        top = api.get(f"/jobs/{job_id}/top", params={"query_set": "val", "kind": kind}).json()
        assert top["approximations"] == job["approximations"] and top["propagation"] == "exact SGD"
    window = api.get(f"/jobs/{job_id}/windows", params={"query_set": "val"}).json()["data"][0]
    assert _kinds(api.get(f"/jobs/{job_id}/windows/{window['id']}/top").json()) == EXPECTED
    assert [_kinds(j) for j in api.get("/compare/jobs").json()["data"]] == [EXPECTED]

    # The list follows the computation's own settings too: one curvature block per layer is one more.
    layered = api.wait_job(api.post(f"/runs/{run_id}/jobs", json={"blocks": "layer"}).json()["id"])
    assert _kinds(layered) == [*EXPECTED, "per-layer-blocks"]
    layered_top = api.get(f"/jobs/{layered['id']}/top", params={"query_set": "val"}).json()
    assert layered_top["approximations"] == layered["approximations"]
    compared = api.get("/compare", params={"jobs": f"{job_id},{layered['id']}", "query_set": "val"}).json()
    assert [_kinds(r) for r in compared["runs"]] == [EXPECTED, [*EXPECTED, "per-layer-blocks"]]

    schemas = api.get("/openapi.json").json()["components"]["schemas"]  # the response models declare them
    for name in ("JobPublic", "TopPublic", "WindowTopPublic"):
        assert "approximations" in schemas[name]["properties"], name
    assert set(schemas["ApproximationPublic"]["required"]) == {"kind", "label", "detail"}


def test_run_page_says_how_far_to_trust_the_scores(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    run_id, job_id = _analysed(api, token, tmp_path)
    listed = api.get(f"/jobs/{job_id}").json()["approximations"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server_url}/#/runs/{run_id}?job={job_id}")
    sign_in(page, token)
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)

    box = page.locator("#trust")
    expect(box.get_by_role("heading", name="How far to trust these scores")).to_be_visible()
    for item in listed:  # each approximation with its label and, below it, what it means and how to avoid it
        entry = box.locator(f"li[data-kind={item['kind']}]")
        expect(entry).to_be_visible()
        expect(entry.locator("b")).to_have_text(item["label"])
        expect(entry).to_contain_text(item["detail"])
    expect(box.locator("li")).to_have_count(2)
    expect(box.locator("li[data-kind=curvature-empirical]")).to_contain_text("empirical curvature")
    expect(box.locator("li[data-kind=random-projection]")).to_contain_text("rec.calibrate(")

    tooltip = "\n".join(f"{a['label']}: {a['detail']}" for a in listed)
    headers = [
        "table.top[data-kind=helpful] th",
        "table.top[data-kind=harmful] th",
        "table.examples[data-kind=helpful] th",
        "table.examples[data-kind=harmful] th",
    ]
    for header in headers:  # every score column: how scores follow the optimizer, and how many approximations
        last = page.locator(header).last
        expect(last).to_have_text(re.compile(r"^(score|total) \(exact SGD\) 2 approximations$"))
        expect(last.locator(".approx-marker")).to_have_attribute("title", tooltip)
    expect(page.locator("#jobs .approx-marker")).to_have_text("2 approximations")  # the analyses' table
    shot(page, "trust")

    page.locator("table.top[data-kind=helpful] a").first.click()
    expect(page.get_by_role("heading", name="Influence at each occurrence")).to_be_visible()
    expect(page.locator("#history th").last).to_contain_text("influence (exact SGD) 2 approximations")
    expect(page.locator("#history th").last.locator(".approx-marker")).to_have_attribute("title", tooltip)
    page.close()


def test_adam_and_the_sgd_proxy_are_listed_from_the_job_settings(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "adam", optimizer_name="adam", curvature="empirical", projection="random")
    result = upload_log(log, server=api.url, token=token, run_name="adam", analyze=True)
    exact = api.wait_job(result["job"]["id"])
    # The default carries Adam's second moment over these small layers' own coordinates: nothing dropped.
    assert exact["propagation"] == "Adam" and _kinds(exact) == EXPECTED
    asked = {"second_moment_lifted": False}  # turned off through the API: then it is dropped, and listed
    without = api.wait_job(api.post(f"/runs/{result['run']}/jobs", json=asked).json()["id"])
    assert _kinds(without) == [*EXPECTED, "second-moment-dropped"]
    assert "second_moment_lifted=False" in without["approximations"][-1]["detail"]
    proxy = api.wait_job(api.post(f"/runs/{result['run']}/jobs", json={"propagation": "sgd-proxy"}).json()["id"])
    assert _kinds(proxy) == ["sgd-proxy", *EXPECTED]  # the proxy has no second moment to drop
    assert "sgd-proxy' was asked for" in proxy["approximations"][0]["detail"]  # the summary's note says why
    top = api.get(f"/jobs/{proxy['id']}/top", params={"query_set": "val"}).json()
    assert top["propagation"] == "SGD proxy" and top["approximations"] == proxy["approximations"]
