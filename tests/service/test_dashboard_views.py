"""The dashboard's run page, deep links, exports, plot and comparison in a real headless Chromium, each defect of
issue 15 with a check that failed on the old dashboard: upload errors that vanished, the learning-rate axis below
zero, shares named for the wrong measure, the title over a phase label, an older answer drawn over a newer one,
tables wider than the page, only the latest analysis shown, no cancel, no way back from an example and queries
named by index, Swagger UI from a CDN, no favicon, an invalid name pattern; then a stale comparison drawn over a newer
one, a download whose expired token did not lead to sign-in, a page left while it loaded drawn over the page followed,
an older plot request's summary written while its plot was drawn, a run's top rows loading when another run's page
was shown drawn on that page, and an older search's answer drawn over a newer one's. Screenshots go to artifacts/
(docs/images/ with DVEMB_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from playwright.sync_api import Browser, BrowserContext, Download, Page, expect
from service_harness import Api, Worker, record_log, screenshot_dir
from test_dashboard import browser  # noqa: F401  (the module's Chromium fixture)

from dvemb.client import upload_log

IMAGES = screenshot_dir()


def analysed(api: Api, token: str, tmp_path: Path, name: str, *, seed: int = 0, steps: int = 40) -> tuple[int, int]:
    """(run id, job id) of a new run of a real log, analysed."""
    log = record_log(tmp_path / name, steps=steps, batch=8, shard_steps=10, seed=seed)
    result = upload_log(log, server=api.url, token=token, run_name=name, analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    return int(result["run"]), int(job["id"])


def sign_in(page: Page, token: str, *, remember: bool = False) -> None:
    expect(page.get_by_label("API token")).to_be_visible()
    page.get_by_label("API token").fill(token)
    if remember:
        page.get_by_label("Stay signed in on this browser").check()
    page.get_by_role("button", name="Sign in").click()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(IMAGES / f"dashboard-{name}.png"), full_page=True)


def downloaded(page: Page, export: str, fmt: str, within: str = "body") -> list[dict[str, Any]]:
    """The rows of the file that an export button saves (CSV as strings, Parquet typed)."""
    with page.expect_download() as info:
        page.locator(f"{within} [data-export='{export}'] [data-format='{fmt}']").click()
    download: Download = info.value
    body = Path(download.path()).read_bytes()
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(body.decode())))
    return list(pq.read_table(io.BytesIO(body)).to_pylist())


def hold_back(page: Page, pattern: str, ms: int = 2000) -> None:
    """Delays the page's requests whose URL matches the JavaScript regex pattern by ms, so that their answers arrive
    after those of requests made later (an older answer racing a newer one)."""
    page.evaluate(
        """([pattern, ms]) => {
        const real = window.fetch;
        const slow = new RegExp(pattern);
        window.fetch = (url, options) => slow.test(String(url))
          ? new Promise((r) => setTimeout(r, ms)).then(() => real(url, options)) : real(url, options);
      }""",
        [pattern, ms],
    )


def every_row(api: Api, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        page = api.get(path, params={**params, "limit": 10, "offset": len(rows)}).json()
        rows += page["data"]
        if len(rows) >= page["count"]:
            return rows


def test_run_page_lists_every_analysis_with_cancel_and_keeps_upload_errors(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    worker: Worker,
    tmp_path: Path,
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(server_url + "/")
    shot(page, "signin")
    sign_in(page, token, remember=True)
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    assert page.evaluate("localStorage.getItem('dvemb-token')") == token  # stays signed in on this browser
    page.get_by_label("New run").fill("views-run")
    page.get_by_role("button", name="Create").click()
    expect(page.get_by_role("heading", name="views-run")).to_be_visible()
    assert not [e for e in console_errors if "pattern" in e.lower()], console_errors  # a valid v-flag pattern

    bad = tmp_path / "notes.txt"
    bad.write_text("not a log")
    page.set_input_files("#file-input", str(bad))
    expect(page.locator("#upload-files .error")).to_be_visible()
    page.wait_for_timeout(1500)  # the page used to be drawn again after 0.5 s, and the reason was gone
    expect(page.locator("#upload-files .error")).to_be_visible()
    expect(page.locator("#upload-status")).to_contain_text("refused")

    names = [f"q-{c}" for c in "abcdef"]  # queries named by id, not by their index
    log = record_log(tmp_path / "log", steps=40, batch=8, shard_steps=10, query_ids=names)
    page.set_input_files("#file-input", [str(p) for p in sorted(log.iterdir()) if not p.name.startswith(".")])
    expect(page.get_by_role("button", name="Start analysis")).to_be_visible(timeout=60_000)
    assert page.evaluate("document.getElementById('upload-panel').open") is False  # folded once complete
    page.get_by_label("Propagation").select_option("sgd-proxy")
    page.get_by_label("Top rows kept").fill("12")
    page.get_by_role("button", name="Start analysis").click()
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=120_000)
    run_id = int(re.search(r"#/runs/(\d+)", page.url).group(1))  # type: ignore[union-attr]
    first = int(re.search(r"job=(\d+)", page.url).group(1))  # type: ignore[union-attr]
    expect(page.locator("#jobs")).to_contain_text("top_k=12, propagation=sgd-proxy")

    card = page.locator("#summary-card")
    expect(card).to_contain_text("40 steps · 320 examples · 320 occurrences")
    label = api.get(f"/jobs/{first}/summary").json()["propagation_label"]
    expect(card).to_contain_text(f"optimizer SGD, modelled as {label}")
    best = api.get(f"/jobs/{first}/examples", params={"query_set": "val", "kind": "helpful", "limit": 1}).json()
    expect(page.locator("#top-finding")).to_contain_text(f"most helpful: example {best['data'][0]['example_id']}")
    shot(page, "run")

    page.goto(f"{server_url}/#/runs")
    expect(page.locator("#runs tbody tr td:nth-child(5)").first).to_have_text("320")  # the examples column

    worker.kill()  # the next analysis stays queued: its cancel button is there to press
    try:
        page.goto(f"{server_url}/#/runs/{run_id}")
        page.get_by_role("button", name="Start analysis").click()
        second = page.locator("#jobs tbody tr").first
        expect(second.locator(".job-status")).to_have_text("queued")
        second.get_by_role("button", name="Cancel").click()
        expect(second.locator(".job-status")).to_have_text("cancelled")
    finally:
        worker.start()
    assert api.get(f"/runs/{run_id}/jobs").json()["data"][0]["status"] == "cancelled"
    expect(page.locator("#jobs tbody tr")).to_have_count(2)  # every analysis of the run, not only the latest
    page.get_by_role("link", name="show").click()
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)
    assert f"job={first}" in page.url
    expect(page.locator("#job-status")).to_have_text("succeeded")

    page.locator("table.top[data-kind=helpful] a").first.click()
    expect(page.get_by_role("heading", name="Influence at each occurrence")).to_be_visible()
    options = page.locator("#on-query option").all_inner_texts()
    assert options == ["the whole query set", *[f"query {name}" for name in names]]
    page.get_by_label("On").select_option("1")
    history = api.get(
        f"/jobs/{first}/examples/{page.url.split('/examples/')[1].split('?')[0]}", params={"query_set": "val"}
    )
    rows = downloaded(page, "history", "parquet")
    assert [r["influence"] for r in rows] == [h["per_query"][1] for h in history.json()["history"]]
    page.reload()  # the query picked is in the URL
    expect(page.get_by_label("On")).to_have_value("1")
    shot(page, "example")
    page.get_by_role("link", name=f"views-run, analysis {first}").click()
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)
    assert f"#/runs/{run_id}?job={first}" in page.url

    again = context.new_page()  # a new tab of this browser: still signed in
    again.goto(f"{server_url}/#/runs")
    expect(again.get_by_role("heading", name="Runs")).to_be_visible()
    shot(again, "runs")
    unexpected = [e for e in console_errors if "status of 400" not in e]  # the refused notes.txt is expected
    assert not unexpected, unexpected
    context.close()


def phase_plot(page: Page, expression: str) -> Any:
    return page.evaluate(f"(() => {{ const plot = document.getElementById('phase-plot'); return {expression}; }})()")


def test_deep_link_survives_sign_in_and_exports_equal_the_api(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    run_id, job_id = analysed(api, token, tmp_path, "deep")
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    link = f"{server_url}/#/runs/{run_id}?job={job_id}&qs=val&query=2&view=raw&smooth=5&page=1"
    page.goto(link)
    sign_in(page, token)
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)
    assert page.url == link  # back at the link that asked for sign-in
    for control, value in (("#query", "2"), ("#view-kind", "raw"), ("#smooth", "5")):
        expect(page.locator(control)).to_have_value(value)
    top = {"query_set": "val", "kind": "harmful", "query": 2}
    second_page = api.get(f"/jobs/{job_id}/top", params={**top, "limit": 10, "offset": 10}).json()["data"]
    shown = page.locator("table.top[data-kind=harmful] td.score").evaluate_all("c => c.map(x => x.dataset.score)")
    assert [float(s) for s in shown] == [r["score"] for r in second_page]  # page 2 of query 2, as linked

    # exports: exactly the rows of the API, every page, with the page's filters
    rows = downloaded(page, "top-harmful", "csv")
    assert rows == [
        {k: "" if v is None else str(v) for k, v in r.items()} for r in every_row(api, f"/jobs/{job_id}/top", top)
    ]
    curve = downloaded(page, "curve", "parquet")
    figure = phase_plot(page, "plot.data.find(t => t.name.startsWith('smoothed')).y")
    assert [r["step"] for r in curve] == list(range(40)) and [r["smoothed"] for r in curve] == pytest.approx(figure)

    chosen = api.get(f"/jobs/{job_id}/selection", params={"query_set": "val", "share": 0.8, "windows": 2}).json()
    page.locator("#sel-share").select_option("0.8")
    expect(page.locator("#selection-text")).to_have_text(chosen["recommendation"])
    sel = downloaded(page, "selection", "csv")
    assert [(int(r["first_step"]), float(r["share_of_influence"])) for r in sel] == [
        (w["first"], chosen[key]["share_of_influence"])
        for key in ("fewest_steps", "early_late", "early_only")
        for w in chosen[key]["windows"]
    ]
    page.locator("#smooth").select_option("21")
    page.get_by_role("button", name="next ▶").click()
    expect(page).to_have_url(re.compile(r"smooth=21.*page=2|page=2.*smooth=21"))

    # the plot: rates from zero, shares named for their measure, title apart from the labels, one hover per step
    assert phase_plot(page, "plot._fullLayout.yaxis2.range[0]") >= 0
    assert all(t.endswith("of |influence|") for t in phase_plot(page, "plot.layout.annotations.map(a => a.text)"))
    page.locator("#view-kind").select_option("per_lr")
    expect(page.locator("#phase-summary")).to_contain_text("|influence / lr|")
    page.wait_for_function(
        "document.getElementById('phase-plot').layout.annotations.every(a => a.text.endsWith('|influence / lr|'))"
    )
    overlaps = page.evaluate(
        """(() => {
        const box = (e) => e.getBoundingClientRect();
        const title = box(document.querySelector('#phase-plot .gtitle'));
        return [...document.querySelectorAll('#phase-plot .annotation')].map(box).filter(
          (a) => a.top < title.bottom).length;  // every phase label lies wholly below the title
      })()"""
    )
    assert overlaps == 0
    page.locator("#phase-plot").scroll_into_view_if_needed()
    x, y = phase_plot(
        page,
        "[plot._fullLayout.xaxis._offset + plot._fullLayout.xaxis.l2p(7) + plot.getBoundingClientRect().left,"
        " plot._fullLayout.yaxis._offset + plot._fullLayout.yaxis._length / 2 + plot.getBoundingClientRect().top]",
    )
    page.mouse.move(x, y)
    hover = page.locator("#phase-plot .hoverlayer")
    names = phase_plot(page, "plot.data.map(t => t.name)")
    assert {"per step", "learning rate"} <= set(names)  # (a training loss trace too, when the log has losses)
    for name in names:
        expect(hover).to_contain_text(name)
    page.mouse.click(x, y)  # a step's examples: the tables list that step's occurrences
    expect(page.locator("#step-min")).to_have_value("7")
    expect(page.locator("#top-chosen")).to_contain_text("steps 7–7", timeout=30_000)
    steps = page.locator("table.top[data-kind=helpful] tbody tr td:nth-child(5)").all_inner_texts()
    assert steps and set(steps) == {"7"}

    # an older answer never replaces a newer one: the answer for query 0 is held back 2 s
    hold_back(page, "figures[/]phase.*[?&]query=0(&|$)")
    page.locator("#query").select_option("0")
    page.locator("#query").select_option("1")
    page.wait_for_timeout(3000)
    assert phase_plot(page, "plot.layout.title.text") == "val, query 1"

    # nor while the older plot is being drawn: the raw view's phase plot takes until released to draw, and the
    # per-lr view asked for meanwhile keeps its summary
    page.evaluate(
        """() => {
        const react = Plotly.react;
        Plotly.react = (id, ...rest) => {
          const drawn = react(id, ...rest);
          if (id !== 'phase-plot' || window.releasePlot) return drawn;
          return drawn.then((v) => new Promise((resolve) => (window.releasePlot = () => resolve(v))));
        };
      }"""
    )
    page.locator("#view-kind").select_option("raw")
    page.wait_for_function("typeof window.releasePlot === 'function'")  # (a function itself would be called)
    page.evaluate("document.getElementById('phase-summary').textContent = ''")
    page.locator("#view-kind").select_option("per_lr")
    expect(page.locator("#phase-summary")).to_contain_text("|influence / lr|")
    page.evaluate("window.releasePlot()")
    page.wait_for_timeout(500)  # the raw view's drawing has gone on meanwhile
    expect(page.locator("#phase-summary")).not_to_contain_text("of |influence|")
    expect(page.locator("#phase-summary")).to_contain_text("|influence / lr|")

    page.set_viewport_size({"width": 480, "height": 900})  # wide tables scroll in their box, not the page
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    # a download with an expired token leads to sign-in like any other call, and sign-in comes back here
    page.evaluate("sessionStorage.setItem('dvemb-token', 'expired')")
    page.locator("[data-export='curve'] [data-format='csv']").click()
    sign_in(page, token)
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)
    assert page.url.startswith(f"{server_url}/#/runs/{run_id}?job={job_id}")
    context.close()


def test_compare_page_with_two_runs(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    run_a, a = analysed(api, token, tmp_path, "seed-0", seed=0, steps=20)
    run_b, b = analysed(api, token, tmp_path, "seed-1", seed=1, steps=30)
    context: BrowserContext = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server_url + "/#/compare")
    sign_in(page, token)
    page.get_by_label(f"compare analysis {a}").check()
    page.get_by_label(f"compare analysis {b}").check()
    page.get_by_label("Top examples matched").fill("15")
    page.get_by_role("button", name="Compare").click()
    expect(page.locator("#comparison[data-ready=true]")).to_be_attached(timeout=60_000)
    assert f"jobs={a}%2C{b}" in page.url or f"jobs={a},{b}" in page.url

    found = api.get("/compare", params={"jobs": f"{a},{b}", "query_set": "val", "top": 15}).json()
    (pair,) = found["pairs"]
    lengths = page.evaluate("document.getElementById('compare-curves').data.map(t => t.x.length)")
    assert lengths == [20, 30]
    bars = page.evaluate("document.getElementById('compare-shares').data.map(t => t.y)")
    assert bars == [[r["phases"]["share_abs_per_lr"][p] for p in ("early", "basin", "late")] for r in found["runs"]]
    rho = page.locator("#compare-pairs td[data-rho]").evaluate_all("c => c.map(x => Number(x.dataset.rho))")
    assert rho == [pair["spearman_all"], pair["spearman_top"]]
    diff = page.locator("table.compare-diff td[data-difference]").evaluate_all(
        "c => c.map(x => Number(x.dataset.difference))"
    )
    assert diff == [d["difference"] for d in pair["differences"]]
    rows = downloaded(page, "differences", "csv", within="#comparison")
    assert [(r["example_id"], float(r["difference"])) for r in rows] == [
        (d["example_id"], d["difference"]) for d in pair["differences"]
    ]
    shot(page, "compare")

    page.reload()  # the comparison is in the URL
    expect(page.locator("#comparison[data-ready=true]")).to_be_attached(timeout=60_000)
    expect(page.get_by_label("Top examples matched")).to_have_value("15")

    # an older answer never replaces a newer one: the comparison of the top 3 is held back 2 s
    hold_back(page, "/compare[?].*[?&]top=3(&|$)")
    shown_top = r"document.getElementById('comparison').textContent.match(/each run's\s+(\d+) most/)?.[1]"
    for top in ("3", "4"):
        page.get_by_label("Top examples matched").fill(top)
        page.get_by_role("button", name="Compare").click()
    page.wait_for_function(f"{shown_top} === '4'")
    page.wait_for_timeout(3000)  # the held-back answer for the top 3 has arrived meanwhile
    assert page.evaluate(shown_top) == "4"

    # a run page's part still loading when another run's page is shown is not drawn there: run A's next top rows
    # arrive 2 s late, once run B's page is drawn but before its own top rows (its windows arrive 4 s late)
    page.goto(f"{server_url}/#/runs/{run_a}?job={a}")
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)
    hold_back(page, f"/jobs/{a}/top")
    hold_back(page, f"/jobs/{b}/windows", 4000)
    page.get_by_role("button", name="next ▶").click()
    page.evaluate(f"location.hash = '#/runs/{run_b}?job={b}'")
    expect(page.get_by_role("heading", name="seed-1")).to_be_visible()
    page.evaluate(
        f"""() => {{
        const seen = () => document.querySelector('a[href^="#/jobs/{a}/"]') && (window.seenA = true);
        seen();
        new MutationObserver(seen).observe(document.body, {{ childList: true, subtree: true }});
      }}"""
    )
    expect(page.locator("#results[data-ready=true]")).to_be_attached(timeout=60_000)
    assert page.evaluate("window.seenA") is None  # run A's rows never showed on run B's page
    expect(page.locator(f"table.top[data-kind=helpful] a[href^='#/jobs/{b}/']").first).to_be_attached()
    context.close()


def test_a_page_left_while_it_loads_is_not_drawn(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
) -> None:
    run_id = api.post("/runs", json={"name": "slow-run"}).json()["id"]
    api.post("/runs", json={"name": "other-run"})
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{server_url}/#/runs")
    sign_in(page, token)
    expect(page.locator("#runs")).to_contain_text("slow-run", timeout=30_000)

    # two searches in a row: the first's answer arrives 2 s late, and the list stays the second's
    hold_back(page, "search=slow")
    for search in ("slow", "other"):
        page.get_by_label("Search").fill(search)
        page.get_by_label("Search").dispatch_event("change")
    expect(page.get_by_label("Search")).to_have_value("other")
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    page.wait_for_timeout(2500)  # the held-back answer for the first search has arrived meanwhile
    expect(page.locator("#runs tbody tr")).to_have_text(re.compile("other-run"))
    expect(page.get_by_label("Search")).to_have_value("other")

    hold_back(page, f"/runs/{run_id}$")  # the run page's answer arrives 2 s late
    page.evaluate(f"location.hash = '#/runs/{run_id}'")
    page.wait_for_timeout(200)
    page.evaluate("location.hash = '#/compare'")  # left before the run page was drawn
    expect(page.get_by_role("heading", name="Compare analyses")).to_be_visible()
    page.wait_for_timeout(3000)  # the held-back answer for the run page has arrived meanwhile
    expect(page.get_by_role("heading", name="Compare analyses")).to_be_visible()
    expect(page.get_by_role("heading", name="slow-run")).to_have_count(0)
    context.close()


def test_api_docs_render_offline(browser: Browser, server_url: str) -> None:  # noqa: F811
    page = browser.new_page()
    outside: list[str] = []

    def only_this_server(route: Any) -> None:
        if route.request.url.startswith(server_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_this_server)
    page.goto(f"{server_url}/api/v1/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("dvemb", timeout=30_000)
    expect(page.locator(".opblock-tag").first).to_be_visible()
    assert not outside, outside
    assert page.request.get(f"{server_url}/favicon.ico").status == 200
    shot(page, "api-docs")
    page.close()
