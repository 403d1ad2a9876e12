"""Progress that tells the truth (issue 24.5), through the API and in a real headless Chromium: a job that has
computed and is storing its results says "storing results" (not "running 100% · step 0"), an estimate of the time
left is given only while a job computes (never once it is cancelled, failed or storing), a retried job starts
without its last attempt's step, the first upload estimate waits for enough bytes to be measured, and the upload
sends data files several at a time once the manifests are in."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from playwright.sync_api import Browser, expect
from service_harness import Api, record_log, settings_env
from sqlalchemy import update
from test_dashboard import browser  # noqa: F401  (the module's Chromium fixture)
from test_dashboard_views import sign_in

from dvemb.client import upload_log
from server.db.models import Job
from server.db.session import session_factory


def set_job(job_id: int, lease_seconds: float = 3600, **values: Any) -> None:
    """Writes a job's row as a worker would (its lease held for an hour unless said: nothing takes it over)."""
    lease = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lease_seconds)
    with session_factory()() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=lease, **values))
        session.commit()


def long_lease(seconds: float) -> AbstractContextManager[None]:
    """The API (in this process) reads DVEMB_JOB_LEASE_SECONDS as ``seconds`` within the block."""
    return settings_env(DVEMB_JOB_LEASE_SECONDS=str(seconds))


def test_a_job_says_what_it_is_doing_and_gives_an_eta_only_while_computing(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    log = record_log(tmp_path / "log", steps=12, batch=8)
    result = upload_log(log, server=api.url, token=token, run_name="progress", analyze=True)
    job_id = int(api.wait_job(result["job"]["id"])["id"])

    states = [  # (the row as the worker leaves it, the API's stage and ETA, what the page says)
        ({"status": "running", "progress": 0.0, "current_step": None, "eta_seconds": None}, "reading the log", None),
        ({"status": "running", "progress": 0.5, "current_step": 5, "eta_seconds": 7.2}, "computing", 7.2),
        (  # a claim clears the stored share of an earlier attempt: none written yet
            {"status": "running", "progress": 1.0, "current_step": 0, "eta_seconds": 3.0, "stored_fraction": None},
            "storing results",
            None,
        ),
        ({"status": "cancelled", "progress": 0.5, "current_step": 5, "eta_seconds": 7.2}, "cancelled", None),
        ({"status": "failed", "progress": 0.5, "current_step": 5, "eta_seconds": 7.2}, "failed", None),
    ]
    for row, stage, eta in states:
        set_job(job_id, **row)
        got = api.get(f"/jobs/{job_id}").json()
        assert (got["stage"], got["eta_seconds"]) == (stage, eta), row
        listed = api.get(f"/runs/{result['run']}/jobs").json()["data"][0]
        assert (listed["stage"], listed["eta_seconds"]) == (stage, eta)
    # A worker that stopped renewing its lease (killed on another machine): said so, and no estimate, well before
    # the lease expires and the reconciler queues the job again (a 600 s lease here, so that nothing expires).
    silent = {"status": "running", "progress": 0.5, "current_step": 5, "eta_seconds": 7.2}
    with long_lease(600):
        set_job(job_id, lease_seconds=600, **silent)  # just renewed
        assert api.get(f"/jobs/{job_id}").json()["stage"] == "computing"
        set_job(job_id, lease_seconds=100, **silent)  # under half of the lease left: no renewal for 500 s
        got = api.get(f"/jobs/{job_id}").json()
        assert (got["stage"], got["eta_seconds"]) == ("worker not responding", None)
    set_job(job_id, **states[-1][0])  # failed, as the page first finds it
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    said = page.locator("#job-progress")
    page.goto(f"{server_url}/#/runs/{result['run']}?job={job_id}")
    sign_in(page, token)
    expect(said).to_have_text("failed at 50%")  # no ETA once it stopped
    texts = {
        "reading the log": "reading the log",
        "computing": "computing · 50% · step 5 · ETA 7 s",
        "storing results": "computed · storing results (the tables appear when they are stored)",
        "cancelled": "cancelled at 50%",
    }
    with long_lease(600):
        set_job(job_id, lease_seconds=100, **silent)
        page.reload()
        expect(said).to_have_attribute("data-stage", "worker not responding", timeout=10_000)
        expect(said).to_have_text("worker not responding: the analysis is queued again if it stays silent")
    for row, stage, _ in states[:4]:
        set_job(job_id, **row)
        if stage == "reading the log":  # the page polls only while a job is live: drawn again for this one
            page.reload()
        expect(said).to_have_attribute("data-stage", stage, timeout=10_000)  # the next poll, a second later
        expect(said).to_have_text(texts[stage])
    # Storing the rows has its own progress: the share written, on the API and on the page (text and bar).
    storing = {"status": "running", "progress": 1.0, "current_step": 0, "eta_seconds": 3.0, "stored_fraction": 0.4}
    set_job(job_id, **storing)
    got = api.get(f"/jobs/{job_id}").json()
    assert (got["stage"], got["stored_fraction"], got["eta_seconds"]) == ("storing results", 0.4, None)
    page.reload()
    expect(said).to_have_text("computed · storing results · 40% stored (the tables appear when they are stored)")
    expect(page.get_by_role("progressbar", name="analysis progress")).to_have_attribute("aria-valuenow", "40")
    page.close()

    # A retried job starts from nothing: no step or estimate of the attempt before it.
    set_job(job_id, status="failed")
    retried = api.post(f"/jobs/{job_id}/retry").json()
    assert (retried["stage"], retried["current_step"], retried["eta_seconds"]) == ("queued", None, None)
    assert retried["stored_fraction"] is None
    done = api.wait_job(job_id)
    assert (done["status"], done["stored_fraction"]) == ("succeeded", 1.0)  # the real worker stored every row


def test_the_upload_eta_waits_for_a_measured_speed(browser: Browser, server_url: str) -> None:  # noqa: F811
    page = browser.new_page()
    page.goto(server_url + "/")
    texts = page.evaluate(
        """async () => {
        const { uploadText } = await import("/js/views/upload.js");
        const MB = 1e6;
        return [
          uploadText(26 * MB, 2000, 1.2),     // the manifest went up: 2 kB in 1.2 s says nothing of the speed
          uploadText(26 * MB, 3 * MB, 1.5),   // still under 4 MiB
          uploadText(26 * MB, 8.4 * MB, 0.6), // enough bytes, but under a second
          uploadText(26 * MB, 8.4 * MB, 2),   // measured: 4.2 MB/s, 17.6 MB left
          uploadText(40000, 12000, 1.5),      // a small upload: a quarter of it is enough
        ];
      }"""
    )
    assert texts[:3] == ["0% · 2.0 kB of 26.0 MB", "12% · 3.0 MB of 26.0 MB", "32% · 8.4 MB of 26.0 MB"]
    assert texts[3] == "32% · 4.2 MB/s · ETA 4 s"
    assert texts[4] == "30% · 8.0 kB/s · ETA 4 s"
    page.close()


def test_in_parallel_keeps_the_order_and_the_limit(browser: Browser, server_url: str) -> None:  # noqa: F811
    page = browser.new_page()
    page.goto(server_url + "/")
    result = page.evaluate(
        """async () => {
        const { inParallel, PARALLEL_UPLOADS } = await import("/js/views/upload.js");
        const started = [];
        let active = 0, most = 0;
        await inParallel([...Array(10).keys()], PARALLEL_UPLOADS, async (i) => {
          started.push(i);
          active += 1;
          most = Math.max(most, active);
          await new Promise((r) => setTimeout(r, 20 + ((i * 7) % 5) * 10));  // uneven lengths
          active -= 1;
        });
        const begun = [];
        let ended = 0;
        let raised = null;
        try {
          await inParallel([...Array(10).keys()], 2, async (i) => {
            begun.push(i);
            await new Promise((r) => setTimeout(r, i === 2 ? 10 : 60));
            ended += 1;
            if (i === 2) throw new Error("refused");
          });
        } catch (err) {
          raised = `${err.message} after ${ended} ended`;
        }
        return [started, most, PARALLEL_UPLOADS, begun, raised];
      }"""
    )
    started, most, limit, begun, raised = result
    assert started == list(range(10)) and limit == 4 and most == 4
    # Two lanes: 0 and 1 end at 60 ms, then 2 (failing at 70 ms) and 3 start; nothing starts after the failure, and
    # its error comes once 3, in flight, has ended.
    assert begun == [0, 1, 2, 3] and raised == "refused after 4 ended"
    page.close()


def test_the_dashboard_sends_manifests_first_then_data_files_several_at_a_time(
    browser: Browser,  # noqa: F811
    api: Api,
    token: str,
    server_url: str,
    tmp_path: Path,
) -> None:
    """Through the run page's file input: every manifest and shard index has gone up before the first data file
    starts, then data files overlap (at most four PATCHes in flight; one at a time before), and the log is whole."""
    log = record_log(tmp_path / "log", steps=24, batch=8, shard_steps=2)  # 12 shards, each judged as it arrives
    files = sorted(p for p in log.iterdir() if not p.name.startswith("."))
    run = api.post("/runs", json={"name": "parallel-browser"}).json()["id"]
    page = browser.new_page()
    names: dict[str, str] = {}  # upload URL -> file name
    events: list[tuple[str, str]] = []  # ("start" | "end", file name) of each PATCH, in the order they happened

    def created(response: Any) -> None:
        request = response.request
        if request.method == "POST" and "/uploads" in request.url and response.status == 201:
            name = base64.b64decode(request.headers["upload-metadata"].split()[1]).decode()
            names[urljoin(request.url, response.headers["location"])] = name

    def patched(kind: str) -> Callable[[Any], None]:
        return lambda request: events.append((kind, names[request.url])) if request.method == "PATCH" else None

    page.on("response", created)
    page.on("request", patched("start"))
    page.on("requestfinished", patched("end"))
    page.on("requestfailed", patched("end"))
    page.goto(server_url + "/")
    sign_in(page, token)
    page.goto(f"{server_url}/#/runs/{run}")
    page.set_input_files("#file-input", [str(p) for p in files])
    expect(page.get_by_role("button", name="Start analysis")).to_be_visible(timeout=120_000)
    first = {p.name for p in files if p.name.startswith(("manifest", "shards."))}
    assert first and {n for _, n in events} == {p.name for p in files}
    first_data = next(i for i, (_, n) in enumerate(events) if n not in first)
    assert {n for kind, n in events[:first_data] if kind == "end"} == first  # all of them done before any data
    in_flight, most = 0, 0
    for kind, _ in events[first_data:]:
        in_flight += 1 if kind == "start" else -1
        most = max(most, in_flight)
    assert 2 <= most <= 4, events
    assert api.get(f"/runs/{run}").json()["status"] == "ready"
    page.close()
