"""The dashboard in a real headless Chromium (Debian's), driven by Playwright: sign in, upload a real log,
analyse it, read the phase plot and the top tables, open an example. Screenshots go to artifacts/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from service_harness import Api, record_log

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium package")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-quic",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def test_dashboard_end_to_end(browser: Browser, api: Api, token: str, server_url: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log", steps=40, batch=8, shard_steps=10)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server_url + "/")
    expect(page.get_by_label("API token")).to_be_visible()
    assert page.locator("#runs").count() == 0  # nothing shown without a token
    page.get_by_label("API token").fill("dvemb_wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_have_text("This token is not valid.")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    _shot(page, "runs")

    page.get_by_label("New run").fill("browser-run")
    page.get_by_role("button", name="Create").click()
    expect(page.get_by_role("heading", name="browser-run")).to_be_visible()
    files = [str(p) for p in sorted(log.iterdir()) if not p.name.startswith(".")]
    page.set_input_files("#file-input", files)
    expect(page.locator("#upload-status")).to_contain_text("100%", timeout=60_000)
    _shot(page, "upload")
    page.get_by_role("button", name="Start analysis").click(timeout=60_000)
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=120_000)
    expect(page.locator("#job-status")).to_have_text("succeeded")

    expect(page.locator("#propagation")).to_contain_text("exact SGD")  # how the scores follow the optimizer
    header = page.locator("table.top[data-kind=helpful] th").last  # the optimizer, and how many approximations
    expect(header).to_have_text(re.compile(r"^score \(exact SGD\) (\d+|no) approximations?$"))
    points = page.evaluate("document.getElementById('phase-plot').data[0].x.length")
    assert points == 40  # one point per step (under the 1000-point limit)
    phases = page.evaluate(
        "document.getElementById('phase-plot').layout.shapes.filter(s => s.name.startsWith('phase:')).length"
    )
    assert phases == 3
    job_id = api.get(f"/runs/{api.get('/runs').json()['data'][0]['id']}/jobs").json()["data"][0]["id"]
    for kind in ("helpful", "harmful"):
        shown = [
            float(s)
            for s in page.locator(f"table.top[data-kind={kind}] td.score").evaluate_all(
                "cells => cells.map(c => c.dataset.score)"
            )
        ]
        expected = [
            r["score"]
            for r in api.get(f"/jobs/{job_id}/top", params={"query_set": "val", "kind": kind, "limit": 10}).json()[
                "data"
            ]
        ]
        assert shown == expected and len(shown) == 10
    ranked = [
        float(v)
        for v in page.locator("table.examples[data-kind=harmful] td.score").evaluate_all(
            "cells => cells.map(c => c.dataset.score)"
        )
    ]
    expected_ranked = [
        r["total"]
        for r in api.get(
            f"/jobs/{job_id}/examples", params={"query_set": "val", "kind": "harmful", "limit": 10}
        ).json()["data"]
    ]
    assert ranked == expected_ranked and len(ranked) == 10
    what = page.locator("table.top[data-kind=helpful] tbody tr td:nth-child(3)").all_inner_texts()
    assert all(("even" in w) or ("odd" in w) for w in what)  # what each example is (its source here)
    _shot(page, "run")

    page.locator("table.top[data-kind=harmful] a").first.click()
    expect(page.get_by_role("heading", name="Influence at each occurrence")).to_be_visible()
    assert page.locator("#history tbody tr").count() >= 1
    expect(page.get_by_text("label:")).to_be_visible()
    example_id = page.url.split("/examples/")[1].split("?")[0]
    history = api.get(f"/jobs/{job_id}/examples/{example_id}", params={"query_set": "val"}).json()["history"]
    page.get_by_label("On").select_option("2")
    expect(page.locator("#history tbody tr td:nth-child(4)").first).to_have_text(
        f"{history[0]['per_query'][2]:.3e}".replace("e-0", "e-").replace("e+0", "e+")
    )
    _shot(page, "example")
    page.close()
