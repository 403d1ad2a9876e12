"""Comparing two runs: the latency of the comparison (``server.services.compare.compare``, what
``GET /api/v1/compare`` runs) on two synthetic jobs of 10^6 examples each, against reading the two jobs'
per-example totals alone (the rows the rank correlation needs) in the same run.

Run (from the repository root, with PostgreSQL on 127.0.0.1:5432)::

    .venv/bin/python -m bench.compare_bench            # 10^6 examples per job; BENCHMARKS.md
    .venv/bin/python -m bench.compare_bench --quick    # 10^5; leaves BENCHMARKS.md alone

A throwaway database made by the migrations holds a project, two runs and a succeeded job of each with a
summary, a phase summary, 10,000 curve points and the per-example totals (random normal, the second job's
correlated with the first's: rho about 0.8), loaded with COPY. Timed (median of 3 after a warm-up): the
whole comparison (curves at 1,000 points, phases, top-100 overlap per kind, Spearman over every shared example
and over the top lists, the 20 most differing examples) and the floor: ``SELECT example_id, total`` of both
jobs into Python. The machine is shared and noisy: read the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import statistics
import time
from typing import Any

import numpy as np

from bench.harness import Postgres, replace_section, save_json

SECTION = "Comparing runs"
STEPS = 10_000


def summary(examples: int) -> dict[str, Any]:
    phases = {
        "boundaries": [STEPS // 10, STEPS * 8 // 10],
        "ranges": {
            "early": [0, STEPS // 10 - 1],
            "basin": [STEPS // 10, STEPS * 8 // 10 - 1],
            "late": [STEPS * 8 // 10, STEPS - 1],
        },
        "share_abs_per_lr": {"early": 0.3, "basin": 0.2, "late": 0.5},
        "share_abs": {"early": 0.4, "basin": 0.2, "late": 0.4},
    }
    return {
        "steps": STEPS,
        "occurrences": examples,
        "examples": examples,
        "arguments": {"top_k": 100},
        "propagation_label": "exact SGD",
        "query_sets": {"val": {"num_queries": 1, "query_ids": [0], "phases": phases}},
    }


def load(url: str, examples: int, seed: int = 0) -> tuple[Any, list[int]]:
    """The project and the ids of two succeeded jobs over the same examples."""
    import psycopg
    from sqlalchemy.orm import Session

    from server.db.models import Job, PhaseSummaryRow, Project, Run
    from server.db.session import get_engine

    rng = np.random.default_rng(seed)
    first = rng.normal(size=examples)
    second = 0.8 * first + 0.6 * rng.normal(size=examples)
    with Session(get_engine()) as session:
        project = Project(name="bench")
        session.add(project)
        session.flush()
        jobs = []
        for i in range(2):
            run = Run(project_id=project.id, name=f"run-{i}", status="ready")
            session.add(run)
            session.flush()
            job = Job(run_id=run.id, status="succeeded", summary=summary(examples), progress=1.0)
            session.add(job)
            session.flush()
            session.add(
                PhaseSummaryRow(
                    job_id=job.id, query_set="val", summary=summary(examples)["query_sets"]["val"]["phases"]
                )
            )
            jobs.append(job.id)
        project_id = project.id
        session.commit()
    raw = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw) as conn, conn.cursor() as cur:
        for job_id, totals in zip(jobs, (first, second), strict=True):
            with cur.copy("COPY example_totals (job_id, query_set, example_id, total, occurrences) FROM STDIN") as copy:
                buffer = io.StringIO()
                for e, t in enumerate(totals):
                    buffer.write(f"{job_id}\tval\t{e}\t{float(t)!r}\t1\n")
                copy.write(buffer.getvalue())
            with cur.copy(
                "COPY curve_points (job_id, query_set, step, lr, mean, mean_per_lr, abs_sum) FROM STDIN"
            ) as copy:
                copy.write(
                    "".join(
                        f"{job_id}\tval\t{s}\t0.1\t{float(rng.normal())!r}\t{float(rng.normal())!r}\t1.0\n"
                        for s in range(STEPS)
                    )
                )
        conn.commit()
        conn.execute("ANALYZE example_totals")
    return project_id, jobs


def median_seconds(fn: Any, repeats: int = 3) -> float:
    fn()  # warm-up (plans, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^5 examples; BENCHMARKS.md left alone")
    args = parser.parse_args()
    examples = 100_000 if args.quick else 1_000_000
    db = Postgres()
    db.create()
    try:
        import os

        os.environ["DVEMB_DATABASE_URL"] = db.url
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from server.db.models import ExampleTotal, Project
        from server.db.session import get_engine
        from server.migrate import upgrade
        from server.services.compare import compare

        upgrade(db.url)
        started = time.perf_counter()
        project_id, jobs = load(db.url, examples)
        loaded = time.perf_counter() - started

        def whole() -> dict[str, Any]:
            with Session(get_engine()) as session:
                project = session.get(Project, project_id)
                assert project is not None
                return compare(session, project=project, job_ids=jobs, query_set="val", points=1000, top=100, differ=20)

        def floor() -> int:
            with Session(get_engine()) as session:
                rows = 0
                for job_id in jobs:
                    q = select(ExampleTotal.example_id, ExampleTotal.total).where(
                        ExampleTotal.job_id == job_id, ExampleTotal.query_set == "val"
                    )
                    rows += len(session.execute(q).all())
                return rows

        found = whole()
        assert found["pairs"][0]["shared_examples"] == examples
        assert floor() == 2 * examples
        rho = found["pairs"][0]["spearman_all"]
        seconds, floor_seconds = median_seconds(whole), median_seconds(floor)
        get_engine().dispose()
    finally:
        db.drop()
    results = {
        "examples_per_job": examples,
        "compare_seconds": seconds,
        "read_totals_seconds": floor_seconds,
        "ratio": seconds / floor_seconds,
        "spearman_all": rho,
        "load_seconds": loaded,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": dt.date.today().isoformat(),
    }
    save_json("compare_bench.json", results, indent=2)
    print(json.dumps(results, indent=2))
    if not args.quick:
        replace_section(
            SECTION,
            f"""## {SECTION}

`.venv/bin/python -m bench.compare_bench` ({results["date"]}, {results["machine"]}, PostgreSQL on loopback):
two synthetic succeeded jobs of {examples:,} examples each (totals correlated, rho {rho:.3f}), 10,000 curve points.

| what | median of 3 |
|---|---|
| the whole comparison (`GET /compare`'s service: curves, phases, top-100 overlap, Spearman over every shared example and over the top lists, 20 most differing) | {seconds:.2f} s |
| floor: reading both jobs' (example id, total) rows into Python | {floor_seconds:.2f} s |
| ratio | {seconds / floor_seconds:.2f}x |
""",
        )


if __name__ == "__main__":
    main()
