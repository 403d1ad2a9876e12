"""Worker job memory: peak memory of a compute job as the Celery task runs it, against the run's length, next to
``dvemb compute`` on the same log in the same run.

Run (from the repository root, with PostgreSQL on 127.0.0.1:5432)::

    .venv/bin/python -m bench.worker_memory                       # 1k and 10k steps, reused examples
    .venv/bin/python -m bench.worker_memory --steps 1000 10000 100000 --unique

For each size, bench/engine_memory.py's synthetic log (same writer, same seed) is written straight into the log
directory of a run under a temporary storage root (``server.storage.log_dir``), in a throwaway PostgreSQL
database made by the migrations that holds the run and a queued job with no options (the engine's defaults, as
``dvemb compute``'s: top-k 100, float32 embeddings written; one segment, ``DVEMB_COMPUTE_WORKERS=1``). Then, each
in its own process sampled by ``bench.engine_memory.measure`` (``/proc`` every 20 ms, anonymous and file-backed
resident memory of the process and its children):

1. ``dvemb compute`` on that log (the peer);
2. the worker job: ``worker.computation.run_compute(job_id)``, the function the ``dvemb.compute`` Celery task
   calls (claim, lease heartbeat, the engine with progress written to the job's row, then the job's rows:
   top-k, per-example totals, curves, phases and the stored windows, in short fenced transactions by COPY, and
   the job set to succeeded). Its process wraps ``worker.computation.store_results`` only to write the time it
   starts into a file, which splits the samples into the engine's part and the rows' part;
3. a process that only imports ``worker.computation`` (the floor of every worker process), and one that only
   imports ``dvemb.cli`` and ``dvemb.engine`` (the floor of ``dvemb compute``).

The job must end 'succeeded' with the same scores as ``dvemb compute`` (checked), and the rows it stored are
counted. Results: a table on stdout, bench/out/worker_memory.json and the "## Worker job memory" section of
BENCHMARKS.md (after "Engine memory").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.engine_memory import ROOT, _compute_command, _file_sizes, _python_with, _write_command, measure

OUT = ROOT / "bench" / "out"
SECTION = "Worker job memory"


def _job_command(job_id: int, marker: Path) -> list[str]:
    """The worker job in a process of its own; the time its rows start being stored goes to ``marker``."""
    code = (
        "import time, worker.computation as c; store = c.store_results\n"
        "def marked(*a, **k):\n"
        f"    open({str(marker)!r}, 'w').write(repr(time.time())); return store(*a, **k)\n"
        f"c.store_results = marked; c.run_compute({job_id})"
    )
    return _python_with(ROOT, code)


def _split(samples: list[tuple[float, int, int]], marker: Path) -> dict[str, float]:
    """Peaks (MB) before and after the rows started being stored."""
    at = float(marker.read_text()) if marker.exists() else float("inf")
    out = {}
    for name, part in (("engine", [s for s in samples if s[0] < at]), ("rows", [s for s in samples if s[0] >= at])):
        out[f"{name}_peak_anon_mb"] = max((s[1] for s in part), default=0) / 1024
        out[f"{name}_peak_file_mb"] = max((s[2] for s in part), default=0) / 1024
    out["rows_s"] = (samples[-1][0] - at) if samples and at != float("inf") else 0.0
    return out


class Database:
    """A throwaway PostgreSQL database made by the migrations, with one project."""

    def __init__(self) -> None:
        from sqlalchemy.orm import Session

        from bench.harness import Postgres
        from server.db.models import Project
        from server.db.session import make_engine
        from server.migrate import upgrade

        self.postgres = Postgres()
        self.postgres.create()
        self.url = self.postgres.url
        upgrade(self.url)
        self.engine = make_engine(self.url)
        with Session(self.engine) as session:
            project = Project(name="worker-memory")
            session.add(project)
            session.commit()
            self.project_id = project.id

    def new_job(self) -> tuple[int, int]:
        """A run and a queued job of it with no options: (run id, job id)."""
        from sqlalchemy.orm import Session

        from server.db.models import Job, Run

        with Session(self.engine) as session:
            run = Run(project_id=self.project_id, name=f"run-{time.time_ns()}", status="ready")
            session.add(run)
            session.flush()
            job = Job(run_id=run.id, status="queued", options={})
            session.add(job)
            session.commit()
            return run.id, job.id

    def job(self, job_id: int) -> tuple[str, str | None, dict[str, int]]:
        """The job's status, error and its stored rows per table."""
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from server.db.models import CurvePoint, ExampleTotal, Job, TopKRow
        from server.db.window_models import TopKWindow, WindowTopKRow

        with Session(self.engine) as session:
            job = session.get(Job, job_id)
            assert job is not None
            rows = {
                model.__tablename__: session.scalar(select(func.count()).where(model.job_id == job_id)) or 0
                for model in (TopKRow, ExampleTotal, CurvePoint, TopKWindow)
            }
            window_rows = select(func.count()).select_from(WindowTopKRow).join(TopKWindow)
            rows[WindowTopKRow.__tablename__] = session.scalar(window_rows.where(TopKWindow.job_id == job_id)) or 0
            return job.status, job.error, rows

    def drop(self) -> None:
        self.engine.dispose()
        self.postgres.drop()


def one_size(db: Database, work: Path, steps: int, unique: bool) -> list[dict[str, Any]]:
    """``dvemb compute`` and the worker job on one log: a row each."""
    from server.storage import log_dir, results_dir

    storage = work / "storage"
    run_id, job_id = db.new_job()
    log = log_dir(storage, run_id)
    log.parent.mkdir(parents=True)
    started = time.perf_counter()
    subprocess.run(_write_command(ROOT, log, steps, unique), cwd=ROOT, check=True)
    write_s = time.perf_counter() - started
    kind = "unique" if unique else "reused"
    cli_out = work / "out-cli"
    shutil.rmtree(cli_out, ignore_errors=True)
    cli = measure(_compute_command(ROOT, log, cli_out, []))
    env = {
        **os.environ,
        "DVEMB_DATABASE_URL": db.url,
        "DVEMB_STORAGE_DIR": str(storage),
        "DVEMB_COMPUTE_WORKERS": "1",
    }
    marker = work / "rows-started"
    samples: list[tuple[float, int, int]] = []
    marker.unlink(missing_ok=True)
    job = measure(_job_command(job_id, marker), env=env, samples=samples)
    job.update(_split(samples, marker))
    status, error, rows = db.job(job_id)
    if status != "succeeded":
        raise RuntimeError(f"the job ended {status}: {error}")
    out = results_dir(storage, run_id, job_id)
    mine, ref = np.load(out / "scores-val.npy"), np.load(cli_out / "scores-val.npy")
    summary = json.loads((cli_out / "summary.json").read_text())
    common = {
        "examples": kind,
        "steps": steps,
        "occurrences": summary["occurrences"],
        "distinct_examples": summary["examples"],
        "log_write_s": write_s,
        "out_bytes": sum(_file_sizes(cli_out).values()),
    }
    cli_row = {**common, "process": "dvemb compute", **cli}
    job_row = {
        **common,
        "process": "worker job",
        "rows": rows,
        "max_rel_diff_vs_cli": float(np.abs(mine - ref).max() / np.abs(ref).max()),
        **job,
    }
    shutil.rmtree(storage / "runs" / str(run_id), ignore_errors=True)
    shutil.rmtree(cli_out, ignore_errors=True)
    for row in (cli_row, job_row):
        print(json.dumps(row), flush=True)
    return [cli_row, job_row]


def run(steps_list: list[int], kinds: list[bool], work: Path, save: Any) -> dict[str, Any]:
    """Every size; ``save(results)`` after each (a stopped run leaves the sizes it measured)."""
    db = Database()
    try:
        floor = measure(_python_with(ROOT, "import worker.computation"))
        cli_floor = measure(_python_with(ROOT, "import dvemb.cli, dvemb.engine"))
        print(json.dumps({"process": "imports only", "worker": floor, "cli": cli_floor}), flush=True)
        results: dict[str, Any] = {"rows": [], "floor": floor, "cli_floor": cli_floor}
        for unique in kinds:
            for steps in steps_list:
                results["rows"] += one_size(db, work, steps, unique)
                save(results)
    finally:
        db.drop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--unique", action="store_true", help="also every example new (after the reused data set)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--no-markdown", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument(
        "--markdown-only", action="store_true", help="write BENCHMARKS.md from bench/out/worker_memory.json"
    )
    options = parser.parse_args()
    saved = OUT / "worker_memory.json"
    if options.markdown_only:
        write_markdown(json.loads(saved.read_text()))
        return
    load_before = os.getloadavg()[0]
    started = time.time()

    def save(results: dict[str, Any]) -> None:
        results.update(
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            seconds=time.time() - started,
            load=(load_before, os.getloadavg()[0]),
            machine=platform.machine(),
            command=" ".join(["python -m bench.worker_memory", *sys.argv[1:]]),
        )
        OUT.mkdir(exist_ok=True)
        saved.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory(dir=options.work) as tmp:
        results = run(options.steps, [False, True] if options.unique else [False], Path(tmp), save)
    if not options.no_markdown:
        write_markdown(results)


def write_markdown(results: dict[str, Any]) -> None:
    from bench.markdown import replace_section

    floor = results["floor"]
    lines = [
        f"## {SECTION}",
        "",
        f"Command: `.venv/bin/{results['command']}` ({results['date']}, {results['seconds']:.0f} s, 2 shared CPU "
        f"cores, load average {results['load'][0]:.1f} before and {results['load'][1]:.1f} after: other agents "
        "were running tests).",
        "",
        "The worker job is `worker.computation.run_compute(job_id)`, the function the `dvemb.compute` Celery task "
        "calls, in its own process against PostgreSQL (a throwaway database made by the migrations): claim, lease "
        "heartbeat, the engine (one segment) with its progress written to the job's row, then the job's rows (top-k, "
        "per-example totals, curves, phases, the stored windows) in short fenced transactions, and the job set to "
        "succeeded. It reads Engine memory's synthetic log (same writer and seed), written into a run's log "
        "directory under the storage root, and `dvemb compute` (the peer) runs on the same log in the same run, "
        "with the same defaults (top-k 100, float32 embeddings written). Memory is sampled as in Engine memory "
        "(`bench.engine_memory.measure`: `/proc` every 20 ms; anonymous = `RssAnon`, file pages = `RssFile` + "
        "`RssShmem`). The job's process splits its samples at the moment `store_results` starts (it wraps the "
        "function only to write that time to a file): 'engine part' is before, 'rows part' after. Each job "
        "ended succeeded with the scores of `dvemb compute` (max relative difference in the last column). A "
        "process that only imports `worker.computation` peaks at "
        f"{floor['peak_anon_mb']:.0f} MB anonymous and {floor['peak_file_mb']:.0f} MB of file pages"
        + (
            f"; one that only imports `dvemb.cli` and `dvemb.engine` at {cli['peak_anon_mb']:.0f} MB and "
            f"{cli['peak_file_mb']:.0f} MB."
            if (cli := results.get("cli_floor"))
            else "."
        ),
        "",
        "| examples | steps | occurrences | process | wall s | peak anonymous MB | ratio to `dvemb compute` | "
        "peak file pages MB | engine part: anon / file MB | rows part: anon / file MB, s | rows stored | "
        "scores: max rel. diff |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    rows = results["rows"]
    for r in rows:
        peer = next(p for p in rows if p["process"] == "dvemb compute" and _same(p, r))
        ratio = r["peak_anon_mb"] / peer["peak_anon_mb"]
        if r["process"] == "worker job":
            parts = (
                f"{r['engine_peak_anon_mb']:.0f} / {r['engine_peak_file_mb']:.0f} | "
                f"{r['rows_peak_anon_mb']:.0f} / {r['rows_peak_file_mb']:.0f}, {r['rows_s']:.0f} s | "
                f"{sum(r['rows'].values()):,} | {r['max_rel_diff_vs_cli']:.0e}"
            )
        else:
            parts = "- | - | - | -"
        lines.append(
            f"| {r['examples']} | {r['steps']:,} | {r['occurrences']:,} | {r['process']} | {r['seconds']:.1f} | "
            f"{r['peak_anon_mb']:.0f} | {ratio:.2f}x | {r['peak_file_mb']:.0f} | {parts} |"
        )
    lines += ["", _reading(rows)]
    replace_section(SECTION, "\n".join(lines))


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["examples"] == b["examples"] and a["steps"] == b["steps"])


def _reading(rows: list[dict[str, Any]]) -> str:
    parts = []
    for kind in ("reused", "unique"):
        for name, process, key in (
            ("dvemb compute", "dvemb compute", "peak_anon_mb"),
            ("worker job", "worker job", "peak_anon_mb"),
            ("worker job, engine part", "worker job", "engine_peak_anon_mb"),
            ("worker job, rows part", "worker job", "rows_peak_anon_mb"),
        ):
            mine = sorted(
                (r for r in rows if r["examples"] == kind and r["process"] == process), key=lambda r: r["steps"]
            )
            if len(mine) < 2:
                continue
            added = max(mine[-1]["occurrences"] - mine[0]["occurrences"], 1)
            growth = (mine[-1][key] - mine[0][key]) * 2**20 / added
            peaks = " / ".join(f"{r[key]:.0f}" for r in mine)
            steps = " / ".join(f"{r['steps']:,}" for r in mine)
            parts.append(
                f"{kind}, {name}: {peaks} MB at {steps} steps ({growth:.0f} B per added occurrence, first to last)"
            )
    return "Growth of the anonymous peak: " + "; ".join(parts) + "." if parts else ""


if __name__ == "__main__":
    main()
