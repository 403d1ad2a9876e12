"""The dashboard tells the truth at a glance (issue 24, items 1, 2 and 6), in a real headless Chromium and through
the API: a helpful list holds only positive scores and a harmful list only negative ones (a step whose examples all
helped says it has no harmful example), the score column stays inside its table on a run with long text ids, scores
stay on one line, an example's text keeps its newlines, and "next ▶" stops at the last page. Screenshot:
artifacts/dashboard-legible.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from playwright.sync_api import Browser, Page, expect
from safetensors.numpy import load_file
from service_harness import Api, record_log, screenshot_dir
from test_dashboard import browser  # noqa: F401  (the module's Chromium fixture)
from test_dashboard_views import sign_in

import dvemb
from dvemb.client import upload_log
from dvemb.engine import load_results
from server.settings import get_settings
from server.storage import results_dir

STEPS, BATCH = 24, 8
IMAGES = screenshot_dir()


def long_id(i: int) -> str:
    return f"corpus/shard-{i // 50:03d}/a-rather-long-document-name-that-goes-on-and-on-{i:05d}.py"


def text_of(i: int) -> str:
    return (
        f"def example_{i}(x):\n    # a comment that is long enough to need some room on the page\n    return x + {i}\n"
    )


def record_text_log(directory: Path) -> Path:
    """A real log whose examples have long ids and multi-line texts; the last step's batch is 8 copies of the query
    example (every query is that example), so each of its occurrences helps the query set (a positive score: with a
    summed loss, removing one takes its own gradient out of the last update)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    x, y = torch.randn(STEPS * BATCH, 10), torch.randint(0, 4, (STEPS * BATCH,))
    query_x, query_y = torch.randn(1, 10), torch.tensor([2])
    last = slice((STEPS - 1) * BATCH, STEPS * BATCH)
    x[last], y[last] = query_x, query_y
    rec = dvemb.Recorder(model, directory, proj_dim=None, shard_steps=8, loss_reduction="sum")
    for step in range(STEPS):
        rows = list(range(step * BATCH, (step + 1) * BATCH))
        with rec.step([long_id(i) for i in rows], optimizer):
            F.cross_entropy(model(x[rows]), y[rows], reduction="sum").backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.record_queries("val", [(query_x.repeat(3, 1), query_y.repeat(3))])
    everyone = range(STEPS * BATCH)
    rec.describe([long_id(i) for i in everyone], texts=[text_of(i) for i in everyone], labels=y.tolist())
    rec.close()
    return directory


def text_job(api: Api, token: str, tmp_path: Path) -> tuple[int, int]:
    """(run id, job id) of the analysed text run."""
    result = upload_log(record_text_log(tmp_path / "log"), server=api.url, token=token, run_name="text", analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    return int(result["run"]), int(job["id"])


def step_signs(run_id: int, job_id: int) -> dict[int, np.ndarray]:
    """The set-mean score of every occurrence of each step, from the job's files."""
    directory = results_dir(get_settings().storage, run_id, job_id)
    steps = load_file(str(directory / "occurrences.safetensors"))["row_step"]
    means = np.load(directory / "scores-val.npy").astype(np.float64).mean(1)
    return {int(s): means[steps == s] for s in np.unique(steps)}


def assert_signed(helpful: list[dict[str, Any]], harmful: list[dict[str, Any]]) -> None:
    assert all(r["score"] > 0 for r in helpful), [r["score"] for r in helpful]
    assert all(r["score"] < 0 for r in harmful), [r["score"] for r in harmful]
    occurrences = [{(r["example_id"], r["step"]) for r in rows} for rows in (helpful, harmful)]
    assert not occurrences[0] & occurrences[1]  # no occurrence in both lists


def test_helpful_and_harmful_rows_have_their_sign_in_the_api(api: Api, token: str, tmp_path: Path) -> None:
    run_id, job_id = text_job(api, token, tmp_path)
    signs = step_signs(run_id, job_id)
    assert (signs[STEPS - 1] > 0).all()  # the last step's examples all helped
    mixed = next(s for s, v in signs.items() if (v > 0).any() and (v < 0).any())

    def rows(path: str, **params: Any) -> dict[str, list[dict[str, Any]]]:
        got = {k: api.get(path, params={**params, "kind": k, "limit": 1000}).json() for k in ("helpful", "harmful")}
        assert all(g["count"] == len(g["data"]) for g in got.values())
        return {k: g["data"] for k, g in got.items()}

    for query in (None, 1):  # the whole run's top, on the set and on one query
        params = {"query_set": "val", **({} if query is None else {"query": query})}
        top = rows(f"/jobs/{job_id}/top", **params)
        assert_signed(top["helpful"], top["harmful"])
        assert top["helpful"] and top["harmful"]
    for step, positives, negatives in ((STEPS - 1, 8, 0), (mixed, (signs[mixed] > 0).sum(), (signs[mixed] < 0).sum())):
        window = api.post(
            f"/jobs/{job_id}/windows", json={"query_set": "val", "step_min": step, "step_max": step, "wait_seconds": 30}
        ).json()
        assert window["status"] == "succeeded", window
        shown = rows(f"/jobs/{job_id}/windows/{window['id']}/top")
        assert_signed(shown["helpful"], shown["harmful"])
        assert (len(shown["helpful"]), len(shown["harmful"])) == (positives, negatives), step
        for kind in ("helpful", "harmful"):  # the table's export: the same rows
            export = api.get(
                f"/jobs/{job_id}/export/top",
                params={"query_set": "val", "kind": kind, "window_id": window["id"], "format": "csv"},
            )
            assert export.text.count("\n") == 1 + len(shown[kind])
    # The offline reader keeps the same rule.
    offline = load_results(results_dir(get_settings().storage, run_id, job_id))
    assert_signed(offline.top("val", kind="helpful", k=1000), offline.top("val", kind="harmful", k=1000))


def open_run(page: Page, server_url: str, token: str, run_id: int, job_id: int, extra: str = "") -> None:
    page.goto(f"{server_url}/#/runs/{run_id}?job={job_id}{extra}")
    sign_in(page, token)
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)


def shown_rows(page: Page, kind: str) -> list[tuple[str, int, float]]:
    """(example id, step, score) of each row of a "Top training examples" table."""
    return [
        (r[0], int(r[1]), float(r[2]))
        for r in page.locator(f"table.top[data-kind={kind}] tbody tr").evaluate_all(
            "rows => rows.map(r => [r.querySelector('a').title, r.cells[4].textContent, "
            "r.querySelector('td.score').dataset.score])"
        )
    ]


def click_step(page: Page, step: int) -> None:
    """A click on the phase plot's point of a step (Plotly's own click event), as a user's click sends it."""
    page.evaluate(f"document.getElementById('phase-plot').emit('plotly_click', {{points: [{{x: {step}}}]}})")
    expect(page.locator("#top-chosen")).to_contain_text(f"steps {step}–{step}", timeout=30_000)


def test_a_clicked_step_splits_its_examples_by_sign(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    run_id, job_id = text_job(api, token, tmp_path)
    signs = step_signs(run_id, job_id)
    mixed = next(s for s, v in signs.items() if (v > 0).any() and (v < 0).any())
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    open_run(page, server_url, token, run_id, job_id)

    click_step(page, mixed)
    helpful, harmful = shown_rows(page, "helpful"), shown_rows(page, "harmful")
    assert len(helpful) == (signs[mixed] > 0).sum() and len(harmful) == (signs[mixed] < 0).sum()
    assert all(s > 0 for *_, s in helpful) and all(s < 0 for *_, s in harmful)
    assert not {e for e, *_ in helpful} & {e for e, *_ in harmful}  # no example in both tables
    assert all(step == mixed for _, step, _ in helpful + harmful)

    click_step(page, STEPS - 1)  # every example of the last step helped
    expect(page.locator("#top-helpful tbody tr")).to_have_count(BATCH)
    assert all(s > 0 for *_, s in shown_rows(page, "helpful"))
    expect(page.locator("#top-harmful table")).to_have_count(0)
    expect(page.locator("#top-harmful p.none")).to_have_text("No harmful example here: no score is negative.")
    for kind in ("helpful", "harmful"):  # the examples by total influence: their sign too, no example in both
        totals = page.locator(f"table.examples[data-kind={kind}] td.score").evaluate_all(
            "cells => cells.map(c => Number(c.dataset.score))"
        )
        assert totals and all((t > 0) if kind == "helpful" else (t < 0) for t in totals), (kind, totals)
    page.close()


def inside(page: Page, cell: str, box: str) -> list[str]:
    """The cells (by CSS selector) whose box is not inside the box of their closest ``box`` ancestor."""
    found: list[str] = page.locator(cell).evaluate_all(
        """(cells, box) => cells.filter((c) => {
            const r = c.getBoundingClientRect(), b = c.closest(box).getBoundingClientRect();
            return r.left < b.left - 0.5 || r.right > b.right + 0.5;
          }).map((c) => c.textContent)""",
        box,
    )
    return found


def test_long_text_ids_leave_the_scores_on_screen_and_texts_keep_their_lines(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    run_id, job_id = text_job(api, token, tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    open_run(page, server_url, token, run_id, job_id)
    expect(page.locator("table.top[data-kind=harmful] tbody tr")).to_have_count(10)
    for table in ("table.top", "table.examples"):
        cells = f"{table} td"
        assert page.locator(cells).count() > 0
        assert inside(page, cells, ".table-wrap") == []  # step, epoch, phase and score inside the table's box
        assert inside(page, cells, ".cols > div") == []  # and the box inside its column of the page
        sideways = page.locator(f"{table}").evaluate_all(
            "ts => ts.map(t => t.parentElement.scrollWidth - t.parentElement.clientWidth)"
        )
        assert max(sideways) <= 0, sideways  # no table scrolls sideways
    lines = page.locator("td.score span").evaluate_all("spans => spans.map(s => s.getClientRects().length)")
    assert lines and set(lines) == {1}  # every score on one line ("4.630e-4", never "4.630e-" / "4")
    first = page.locator("table.top[data-kind=helpful] tbody tr").first
    link = first.locator("a")
    example_id = link.get_attribute("title")
    assert example_id is not None and example_id.startswith("corpus/shard-")
    assert link.inner_text() == example_id  # the whole id, cut by the cell's ellipsis ...
    assert first.locator("td.clip").first.evaluate("td => td.scrollWidth > td.clientWidth")  # ... which is cut
    text = first.locator("td.clip code").get_attribute("title")
    assert text is not None and "\n" in text  # the whole text on hover
    page.screenshot(path=str(IMAGES / "dashboard-legible.png"), full_page=True)

    link.click()  # the example's page: its text in full, newlines and indentation kept
    expect(page.get_by_role("heading", name="What it is")).to_be_visible()
    index = int(example_id.rsplit("-", 1)[1].split(".")[0])
    expect(page.locator("pre.example-text")).to_have_text(text_of(index))
    assert page.locator("pre.example-text").inner_text() == text_of(index)
    page.close()


def test_next_stops_at_the_last_page(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    run_id, job_id = text_job(api, token, tmp_path)
    counts = [
        api.get(f"/jobs/{job_id}/top", params={"query_set": "val", "kind": k, "limit": 1}).json()["count"]
        for k in ("helpful", "harmful")
    ]
    pages = -(-max(counts) // 10)
    assert pages >= 2
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    open_run(page, server_url, token, run_id, job_id)
    expect(page.get_by_role("button", name="◀ previous")).to_be_disabled()
    expect(page.locator("#top-page")).to_have_text(f"page 1 of {pages}")
    for number in range(2, pages + 1):
        page.get_by_role("button", name="next ▶").click()
        expect(page.locator("#top-page")).to_have_text(f"page {number} of {pages}")
    expect(page.get_by_role("button", name="next ▶")).to_be_disabled()
    page.get_by_role("button", name="next ▶").click(force=True)  # a click on it does nothing
    expect(page.locator("#top-page")).to_have_text(f"page {pages} of {pages}")
    longest = "helpful" if counts[0] >= counts[1] else "harmful"
    rows = page.locator(f"table.top[data-kind={longest}] tbody tr")
    expect(rows).to_have_count(max(counts) - 10 * (pages - 1))  # the last page holds the last rows, never none
    expect(page.locator(f"#top-{longest} p.muted")).to_have_text(
        f"rows {10 * (pages - 1) + 1}–{max(counts)} of {max(counts)}"
    )
    page.close()

    linked = browser.new_page(viewport={"width": 1280, "height": 900})  # a link to a page past the end: the last one
    open_run(linked, server_url, token, run_id, job_id, "&page=40")
    expect(linked.locator("#top-page")).to_have_text(f"page {pages} of {pages}")
    expect(linked.locator(f"table.top[data-kind={longest}] tbody tr")).to_have_count(max(counts) - 10 * (pages - 1))
    linked.close()


def test_the_box_plot_says_what_it_draws_and_a_run_is_deleted_from_its_page(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    run_id, job_id = text_job(api, token, tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    open_run(page, server_url, token, run_id, job_id)
    figure = api.get(f"/jobs/{job_id}/figures/distribution", params={"query_set": "val"}).json()
    assert (figure["drawn"], figure["occurrences"]) == (STEPS * BATCH, STEPS * BATCH)
    note = f"All {STEPS * BATCH} occurrences (the query-set mean of each)."  # not "a sample of 20,000"
    if figure["beyond"]:
        note += f" The axis spans the boxes' whiskers: {figure['beyond']} occurrence(s) lie beyond it."
    expect(page.locator("#distribution-note")).to_have_text(note)
    sample = api.get(f"/jobs/{job_id}/figures/distribution", params={"query_set": "val", "sample": 50}).json()
    assert (sample["drawn"], sample["occurrences"]) == (50, STEPS * BATCH)

    asked: list[str] = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    page.get_by_role("button", name="Delete run").click()
    expect(page.get_by_role("heading", name="text")).to_be_visible()  # dismissed: nothing deleted
    assert asked and "cannot be undone" in asked[0] and api.get(f"/runs/{run_id}").status_code == 200
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete run").click()
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    assert api.get(f"/runs/{run_id}").status_code == 404
    page.close()


def test_compared_curves_can_each_be_scaled_to_their_largest_value(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    jobs = []
    for seed, optimizer in ((0, "sgd"), (1, "adam")):  # curves of different sizes (issue 24.6: AdamW 10-50x SGD)
        log = record_log(tmp_path / optimizer, steps=12, batch=8, seed=seed, optimizer_name=optimizer)
        result = upload_log(log, server=api.url, token=token, run_name=optimizer, analyze=True)
        jobs.append(api.wait_job(result["job"]["id"])["id"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server_url}/#/compare?jobs={jobs[0]},{jobs[1]}&qs=val&view=raw&scale=max")
    sign_in(page, token)
    expect(page.locator("#comparison[data-ready=true]")).to_be_attached(timeout=30_000)
    expect(page.locator("#cmp-scale")).to_have_value("max")
    curves = "document.getElementById('compare-curves').data.map(t => [t.name, Math.max(...t.y.map(Math.abs))])"
    scaled = page.evaluate(curves)
    assert len(scaled) == 2 and all(largest == 1.0 and "÷" in name for name, largest in scaled), scaled
    page.locator("#cmp-scale").select_option("")  # as computed: the curves' own sizes again
    page.wait_for_function("document.getElementById('compare-curves').data.every(t => !t.name.includes('÷'))")
    sizes = sorted(largest for _, largest in page.evaluate(curves))
    own = sorted(  # each run's own curve (the raw view draws its per-step mean), as the API serves it
        max(abs(v) for v in api.get(f"/jobs/{job}/curve", params={"query_set": "val"}).json()["mean"] if v is not None)
        for job in jobs
    )
    assert sizes == pytest.approx(own, rel=1e-9) and sizes != [1.0, 1.0], (sizes, own)
    page.close()
