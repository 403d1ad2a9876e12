"""The dashboard's windows of training and data-selection timing in a real headless Chromium: every phase's
tables are non-empty and show the API's rows (which test_windows_api.py checks against a naive reference), a step
range is computed on demand and says so, a bad range is explained, and the selection recommendation is the
API's. Screenshots go to artifacts/ (docs/images/ with DVEMB_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Page, expect
from service_harness import Api, screenshot_dir
from test_dashboard import browser  # noqa: F401  (the module's Chromium fixture)
from test_windows_api import finished_job

IMAGES = screenshot_dir()


def shown_scores(page: Page, kind: str) -> list[float]:
    cells = page.locator(f"table.top[data-kind={kind}] td.score")
    return [float(s) for s in cells.evaluate_all("cells => cells.map(c => c.dataset.score)")]


def sign_in(page: Page, server_url: str, token: str, run_id: int) -> None:
    page.goto(server_url + "/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    page.goto(f"{server_url}/#/runs/{run_id}")
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)


def test_phase_windows_and_selection_in_the_browser(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    run_id, job_id = finished_job(api, token, tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    sign_in(page, server_url, token, run_id)
    expect(page.locator("#top-chosen")).to_have_text("Rows: overall top 12 of the whole run")

    windows = api.get(f"/jobs/{job_id}/windows", params={"query_set": "val"}).json()["data"]
    phases = [w for w in windows if w["kind"] == "phase"]
    assert len(phases) >= 2
    for window in phases:
        page.locator("#window").select_option(str(window["id"]))
        expect(page.locator("#top-chosen")).to_have_text(
            f"Rows: {window['chosen']} · {window['occurrences']} occurrence(s) in the window"
        )
        for kind in ("helpful", "harmful"):
            expected = api.get(f"/jobs/{job_id}/windows/{window['id']}/top", params={"kind": kind, "limit": 10})
            scores = [r["score"] for r in expected.json()["data"]]
            expect(page.locator(f"table.top[data-kind={kind}] tbody tr")).to_have_count(len(scores))
            assert shown_scores(page, kind) == scores and scores  # never an empty table
            steps = page.locator(f"table.top[data-kind={kind}] tbody tr td:nth-child(5)").all_inner_texts()
            assert all(window["step_min"] <= int(s) <= window["step_max"] for s in steps)
        if window["name"] == "early":
            page.locator("#top-chosen").scroll_into_view_if_needed()
            page.locator("#top-chosen").locator("xpath=..").screenshot(path=str(IMAGES / "dashboard-windows.png"))

    # A step range no window holds: ranked on demand by the worker, then shown with how it was chosen.
    page.locator("#step-min").fill("3")
    page.locator("#step-max").fill("7")
    page.locator("#step-max").dispatch_event("change")
    expect(page.locator("#top-chosen")).to_contain_text("top 12 of steps 3–7, exact, computed on demand")
    expect(page.locator("#window")).to_have_value("steps")
    for kind in ("helpful", "harmful"):
        steps = page.locator(f"table.top[data-kind={kind}] tbody tr td:nth-child(5)").all_inner_texts()
        assert len(steps) == 10 and all(3 <= int(s) <= 7 for s in steps)
    page.locator("#step-min").fill("9")
    page.locator("#step-min").dispatch_event("change")
    expect(page.locator("#top-chosen[role=alert]")).to_contain_text("give 0 <= step_min <= step_max")

    # When to select data: the API's recommendation, redrawn when the share changes.
    for share in ("0.9", "0.5"):
        page.locator("#sel-share").select_option(share)
        expected = api.get(f"/jobs/{job_id}/selection", params={"query_set": "val", "share": share}).json()
        expect(page.locator("#selection-text")).to_have_text(expected["recommendation"])
        early_late = page.locator("#selection-rows tbody tr").nth(1).locator("td")
        expect(early_late.nth(3)).to_have_text(f"{100 * expected['early_late']['share_of_influence']:.1f}%")
    page.locator("#sel-share").select_option("0.9")
    expected = api.get(f"/jobs/{job_id}/selection", params={"query_set": "val"}).json()
    expect(page.locator("#selection-text")).to_have_text(expected["recommendation"])
    page.locator("#selection").screenshot(path=str(IMAGES / "dashboard-selection.png"))
    page.close()
