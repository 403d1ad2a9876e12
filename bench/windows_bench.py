"""Top examples per window of training: latency of a window's top-k page served from the cache and of a step
range computed on demand, on a synthetic job of 10^6 occurrences and 1,000 queries.

Run (from the repository root, with PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379)::

    .venv/bin/python -m bench.windows_bench            # 10^6 occurrences x 1,000 queries; BENCHMARKS.md
    .venv/bin/python -m bench.windows_bench --quick    # 10^5 x 100; leaves BENCHMARKS.md alone

1. A throwaway PostgreSQL database made by the migrations holds a project, a run and a succeeded job whose
   results directory is synthetic but complete for the readers: ``scores-val.npy`` (R, Q) float32 random
   normal, written in chunks (4 GB at full size), the occurrence table (T = 10,000 steps of 100 rows; 10^5
   examples, each used once per epoch: 10 epochs), the example ids and the summary (phases at 10% and 80% of
   training, top_k 100), plus 10^5 per-example totals (the on-demand task reads the chosen examples' labels
   from them).
2. Stored windows: ``worker.windows.store_windows`` as the worker runs it when a job's results are stored
   (3 phases, 10 tenths, 10 epochs; top 100 helpful and harmful for every query and the set mean): seconds
   to rank them from the scores file (dvemb.engine.windows) and to insert the rows.
3. The API (``uvicorn server.main:app``, its own process) and one Celery worker (its own process, default
   queue, Redis database ``DVEMB_BENCH_REDIS_DB``, 12 by default: never one a test suite flushes). Cached: 200 requests of one stored window's page (random window and query, harmful, limit 10,
   the dashboard's page), against ``/health`` and the overall ``/top`` page in the same run (peers).
   On demand: ``POST /jobs/{id}/windows`` for ranges of 1%, 10% and 100% of training (the 100% range is
   not a stored window), timed until the answer is computed and the first page read; the floor in the same
   run is reading the range's rows of the scores file (page cache, numpy). Then each range asked again:
   served from the cache.
4. Page load: the run page of that job in headless Chromium (Debian's, as the dashboard tests run it), a
   full load timed to its first plot and to every section drawn (median of 3 after one warm-up), against
   the phase figure's API request alone. The synthetic job has 10,000 curve points and a phase summary but no
   overall top-k rows (those tables are empty).

The machine is shared and noisy: read the ratios. Results: a table on stdout, bench/out/windows_bench.json
and the "## Top examples per window" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save_file

from bench.harness import (
    ApiProcess,
    CeleryWorker,
    Postgres,
    machine,
    percentile,
    replace_section,
    save_json,
    synthetic_phases,
    synthetic_summary,
)

SECTION = "Top examples per window"
REDIS_DB = int(os.environ.get("DVEMB_BENCH_REDIS_DB", "12"))  # flushed by nobody else: not a test suite's
TOP_K = 100
EPOCHS = 10


def synthetic_job(url: str, storage: Path, *, rows: int, queries: int, steps: int) -> dict[str, Any]:
    """A project, run and succeeded job in the database and its results directory on disk."""
    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from dvemb import formats
    from server.db.models import CurvePoint, ExampleTotal, Job, PhaseSummaryRow, Run
    from server.db.session import make_engine
    from server.services.auth import create_token, get_or_create_project
    from server.storage import results_dir

    examples = rows // EPOCHS
    phases = synthetic_phases(steps)
    summary = synthetic_summary(
        steps=steps,
        occurrences=rows,
        examples=examples,
        queries=queries,
        arguments={"top_k": TOP_K},
        phases=phases,
        results_file=True,
    )
    engine = make_engine(url)
    with Session(engine) as session:
        token = create_token(session, project=get_or_create_project(session, name="bench"))
        project = get_or_create_project(session, name="bench")
        run = Run(project_id=project.id, name="windows-bench", status="ready", num_steps=steps)
        session.add(run)
        session.flush()
        job = Job(run_id=run.id, status="succeeded", options={"top_k": TOP_K}, progress=1.0, summary=summary)
        session.add(job)
        session.flush()
        totals = [
            {"job_id": job.id, "query_set": "val", "example_id": str(i), "total": 0.0, "occurrences": EPOCHS,
             "label": str(i % 10), "source": "train"}
            for i in range(examples)
        ]  # fmt: skip
        for i in range(0, len(totals), 20_000):
            session.execute(insert(ExampleTotal), totals[i : i + 20_000])
        lr = np.linspace(0.1, 0.001, steps)  # what the page plots (the phase figure, the selection timing)
        influence = np.random.default_rng(1).exponential(size=steps) * (1 + 10 * np.exp(-np.arange(steps) / 200))
        curve = [
            {"job_id": job.id, "query_set": "val", "step": t, "lr": float(lr[t]), "mean": float(influence[t] * lr[t]),
             "mean_per_lr": float(influence[t]), "abs_sum": float(influence[t] * lr[t] * 100), "loss": 1.0}
            for t in range(steps)
        ]  # fmt: skip
        session.execute(insert(CurvePoint), curve)
        session.add(PhaseSummaryRow(job_id=job.id, query_set="val", summary=phases))
        session.commit()
        run_id, job_id = run.id, job.id
    engine.dispose()
    out = results_dir(storage, run_id, job_id)
    out.mkdir(parents=True)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    scores = np.lib.format.open_memmap(
        out / formats.scores_file("val"), mode="w+", dtype=np.float32, shape=(rows, queries)
    )
    for r in range(0, rows, 50_000):
        scores[r : r + 50_000] = rng.standard_normal((min(50_000, rows - r), queries), dtype=np.float32)
    scores.flush()
    del scores
    row_step = np.repeat(np.arange(steps, dtype=np.int64), rows // steps)
    order = np.concatenate([rng.permutation(examples) for _ in range(EPOCHS)]).astype(np.int64)
    epoch = np.repeat(np.arange(EPOCHS, dtype=np.int64), examples)
    save_file({"row_step": row_step, "example_index": order, "epoch": epoch}, str(out / formats.OCCURRENCES))
    save_file(formats.encode_ids(list(range(examples))), str(out / formats.EXAMPLES))
    (out / formats.SUMMARY).write_text(json.dumps(summary))
    return {"run_id": run_id, "job_id": job_id, "token": token, "out": out, "write_s": time.perf_counter() - start}


def store_stored_windows(url: str, job: dict[str, Any]) -> dict[str, Any]:
    """worker.windows.store_windows, timed: ranking (dvemb.engine.windows) and inserting (in the job writer's short
    transactions, as the worker stores them; no fence: the benchmark's job row is not leased)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session, sessionmaker

    import worker.windows as windows
    from dvemb.engine import load_results
    from dvemb.formats import Summary
    from server.db.session import make_engine
    from server.db.window_models import WindowTopKRow
    from worker.row_writes import ShortTransactions

    ranked = [0.0]
    rank = windows.__dict__["window_topk"]  # wrapped to time the ranking apart from the insert

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        top = rank(*args, **kwargs)
        ranked[0] += time.perf_counter() - start
        return top

    windows.__dict__["window_topk"] = timed
    engine = make_engine(url)
    start = time.perf_counter()
    try:
        results = load_results(job["out"])
        writer = ShortTransactions(sessionmaker(bind=engine), fence=lambda _: None)
        windows.store_windows(writer, job["job_id"], results, Summary.from_json(results.summary), {})
        with Session(engine) as session:
            count = session.scalar(select(func.count()).select_from(WindowTopKRow))
    finally:
        windows.__dict__["window_topk"] = rank
    total = time.perf_counter() - start
    engine.dispose()
    return {"seconds": total, "rank_seconds": ranked[0], "insert_seconds": total - ranked[0], "rows": int(count or 0)}


def timed_get(client: httpx.Client, path: str, **params: Any) -> float:
    start = time.perf_counter()
    response = client.get(path, params=params)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed


def cached_latency(client: httpx.Client, job_id: int, queries: int, requests: int) -> dict[str, Any]:
    stored = client.get(f"/jobs/{job_id}/windows", params={"query_set": "val"}).json()["data"]
    rng = random.Random(0)
    times: dict[str, list[float]] = {"window": [], "health": [], "overall_top": []}
    for _ in range(requests):  # interleaved: the peers see the same machine
        window = rng.choice(stored)
        query = rng.randrange(queries)
        params = {"kind": "harmful", "query": query, "limit": 10}
        times["window"].append(timed_get(client, f"/jobs/{job_id}/windows/{window['id']}/top", **params))
        times["health"].append(timed_get(client, "/health"))
        times["overall_top"].append(timed_get(client, f"/jobs/{job_id}/top", query_set="val", **params))
    return {
        name: {"p50_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * percentile(v, 99), "n": len(v)}
        for name, v in times.items()
    } | {"windows": len(stored)}


def on_demand(client: httpx.Client, job: dict[str, Any], steps: int, rows: int) -> list[dict[str, Any]]:
    from dvemb import formats

    scores = np.load(job["out"] / formats.scores_file("val"), mmap_mode="r")
    per_step = rows // steps
    found = []
    for share in (0.01, 0.1, 1.0):
        first = 0 if share == 1.0 else steps // 3
        last = first + max(1, int(share * steps)) - 1
        body = {"query_set": "val", "step_min": first, "step_max": last, "wait_seconds": 60}
        start = time.perf_counter()
        window = client.post(f"/jobs/{job['job_id']}/windows", json=body, timeout=120).json()
        while window["status"] == "queued":
            time.sleep(0.05)
            window = client.get(f"/jobs/{job['job_id']}/windows/{window['id']}").json()
        assert window["status"] == "succeeded", window
        page = client.get(f"/jobs/{job['job_id']}/windows/{window['id']}/top", params={"kind": "harmful"})
        page.raise_for_status()
        computed = time.perf_counter() - start
        read_start = time.perf_counter()  # the floor: reading the range's rows (as float64, as the ranking does)
        for r in range(first * per_step, (last + 1) * per_step, 8192):
            np.asarray(scores[r : min(r + 8192, (last + 1) * per_step)], dtype=np.float64).sum()
        read = time.perf_counter() - read_start
        again = []
        for _ in range(20):
            t = time.perf_counter()
            client.post(f"/jobs/{job['job_id']}/windows", json=body).raise_for_status()
            again.append(time.perf_counter() - t)
        found.append(
            {
                "share_of_training": share,
                "steps": [first, last],
                "occurrences": window["occurrences"],
                "computed_s": computed,
                "read_floor_s": read,
                "cached_post_p50_ms": 1e3 * statistics.median(again),
            }
        )
    return found


def page_load(url: str, token: str, run_id: int, job_id: int, repeats: int = 3) -> dict[str, Any]:
    """Headless Chromium (as the dashboard tests run it): a full load of the run page, timed to its first plot
    (the phase plot drawn) and to every section drawn; the peer is the phase figure's API request alone."""
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    first, ready = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.get_by_label("API token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Runs").wait_for()
        for i in range(repeats + 1):  # the first load warms the browser's and the server's caches
            start = time.perf_counter()
            page.goto(f"{url}/?load={i}#/runs/{run_id}")
            page.wait_for_function("document.getElementById('phase-plot')?.data?.length > 0", timeout=120_000)
            plotted = time.perf_counter() - start
            page.locator("#results[data-ready=true]").wait_for(state="attached", timeout=120_000)
            if i:
                first.append(plotted)
                ready.append(time.perf_counter() - start)
        browser.close()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=60) as client:
        figure = [timed_get(client, f"/jobs/{job_id}/figures/phase", query_set="val") for _ in range(repeats)]
    return {
        "first_plot_s": statistics.median(first),
        "all_drawn_s": statistics.median(ready),
        "phase_figure_request_s": statistics.median(figure),
        "repeats": repeats,
    }


def markdown(results: dict[str, Any], command: str) -> str:
    size = results["size"]
    cached, stored = results["cached"], results["stored"]
    lines = [
        f"## {SECTION}",
        "",
        f"`{command}` ({results['date']}, {results['machine']}). Synthetic job: {size['rows']:,} occurrences x "
        f"{size['queries']:,} queries ({size['steps']:,} steps, {EPOCHS} epochs, scores file "
        f"{size['scores_gb']:.1f} GB float32), top_k {TOP_K}; PostgreSQL, the API and one Celery worker as their "
        "own processes on this machine.",
        "",
        "| what | figure | peer (same run) |",
        "|---|---|---|",
        f"| stored windows at the end of a job ({cached['windows']} windows: 3 phases, 10 tenths, {EPOCHS} epochs) | "
        f"{stored['seconds']:.0f} s: ranking {stored['rank_seconds']:.0f} s, inserting {stored['rows']:,} rows "
        f"{stored['insert_seconds']:.0f} s | writing the scores file: {size['write_s']:.0f} s |",
        f"| a stored window's page (cache), p50 / p99 | {cached['window']['p50_ms']:.1f} / "
        f"{cached['window']['p99_ms']:.1f} ms | `/health` {cached['health']['p50_ms']:.1f} / "
        f"{cached['health']['p99_ms']:.1f} ms; overall `/top` {cached['overall_top']['p50_ms']:.1f} / "
        f"{cached['overall_top']['p99_ms']:.1f} ms |",
    ]
    for r in results["on_demand"]:
        lines.append(
            f"| a range of {r['share_of_training']:.0%} of training ({r['occurrences']:,} occurrences) computed on "
            f"demand (POST to first page) | {r['computed_s']:.2f} s; asked again (cache) "
            f"{r['cached_post_p50_ms']:.1f} ms | reading its rows of the scores file: {r['read_floor_s']:.2f} s "
            f"(x{r['computed_s'] / max(r['read_floor_s'], 1e-9):.1f}) |"
        )
    page = results["page_load"]
    lines.append(
        f"| the run page loaded in headless Chromium, to its first plot / to every section drawn (median of "
        f"{page['repeats']}) | {page['first_plot_s']:.2f} s / {page['all_drawn_s']:.2f} s | the phase figure's "
        f"request alone: {page['phase_figure_request_s']:.2f} s |"
    )
    lines += [
        "",
        "The on-demand cost grows with the range's occurrences x queries (every query and the set mean are ranked "
        "in one pass and cached together, so the dashboard's next query is a cache hit); the worker's ranking and "
        "the rows' insert are the gap to the read floor. The stored windows' rows are the price of never showing "
        "an empty table for a phase, tenth or epoch: windows x (queries + 1) x 2 x top_k rows per job.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^5 occurrences x 100 queries; BENCHMARKS.md left alone")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    rows, queries, steps = (100_000, 100, 1_000) if args.quick else (1_000_000, 1_000, 10_000)
    work = Path(tempfile.mkdtemp(prefix="windows_bench_"))
    db = Postgres()
    db.create()
    api = worker = None
    try:
        from server.migrate import upgrade

        upgrade(db.url)
        storage = work / "storage"
        env = {
            "DVEMB_DATABASE_URL": db.url,
            "DVEMB_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "DVEMB_STORAGE_DIR": str(storage),
            "DVEMB_DATA_DIR": str(work / "data"),
        }
        os.environ.update(env)
        job = synthetic_job(db.url, storage, rows=rows, queries=queries, steps=steps)
        print(f"synthetic job written in {job['write_s']:.1f} s", flush=True)
        stored = store_stored_windows(db.url, job)
        print(f"stored windows: {stored}", flush=True)
        api, worker = ApiProcess(env), CeleryWorker(env, "celery")
        headers = {"Authorization": f"Bearer {job['token']}"}
        with httpx.Client(base_url=f"{api.url}/api/v1", headers=headers, timeout=120) as client:
            cached = cached_latency(client, job["job_id"], queries, args.requests)
            print(f"cached: {cached}", flush=True)
            demand = on_demand(client, job, steps, rows)
            print(f"on demand: {demand}", flush=True)
        page = page_load(api.url, job["token"], job["run_id"], job["job_id"])
        print(f"page load: {page}", flush=True)
        results = {
            "date": dt.date.today().isoformat(),
            "machine": f"{os.cpu_count()} cores, {machine()}",
            "size": {"rows": rows, "queries": queries, "steps": steps, "scores_gb": rows * queries * 4 / 1e9,
                     "write_s": job["write_s"]},
            "stored": stored,
            "cached": cached,
            "on_demand": demand,
            "page_load": page,
        }  # fmt: skip
        save_json("windows_bench.quick.json" if args.quick else "windows_bench.json", results, indent=2)
        command = ".venv/bin/python -m bench.windows_bench" + (" --quick" if args.quick else "")
        section = markdown(results, command)
        print(section)
        if not args.quick:
            replace_section(SECTION, section)
    finally:
        for process in (api, worker):
            if process is not None:
                process.stop()
        db.drop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
