"""Windows of training on SQLite (the embedded mode's database, made by the migrations): the stored windows'
rows are those of dvemb.engine.windows with the examples' ids and labels, pages come back best first, and a
step range asked twice is one window. No broker: only the stored windows are committed (in the job writer's short
transactions, as the worker writes them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dvemb import formats
from dvemb.engine import load_results
from dvemb.engine.windows import standard_windows, window_topk
from dvemb.formats import Summary
from server.db.models import ExampleTotal, Job, Project, Run
from server.db.session import make_engine
from server.db.window_models import TopKWindow
from server.migrate import upgrade
from server.services import windows as service
from worker.row_writes import ShortTransactions
from worker.windows import _stored_metadata, store_windows

STEPS, BATCH, QUERIES, TOP_K = 20, 6, 3, 4


def results_directory(directory: Path) -> dict[str, object]:
    """A small but complete results directory (2 epochs of 60 examples) and its summary."""
    rng = np.random.default_rng(0)
    rows = STEPS * BATCH
    np.save(directory / formats.scores_file("val"), rng.standard_normal((rows, QUERIES)).astype(np.float32))
    order = np.concatenate([rng.permutation(rows // 2), rng.permutation(rows // 2)]).astype(np.int64)
    occurrences = {
        "row_step": np.repeat(np.arange(STEPS, dtype=np.int64), BATCH),
        "example_index": order,
        "epoch": np.repeat(np.arange(2, dtype=np.int64), rows // 2),
    }
    save_file(occurrences, str(directory / formats.OCCURRENCES))
    save_file(formats.encode_ids([f"ex{i}" for i in range(rows // 2)]), str(directory / formats.EXAMPLES))
    phases = {"boundaries": [3, 15], "ranges": {"early": [0, 2], "basin": [3, 14], "late": [15, 19]}}
    summary = {
        "steps": STEPS,
        "occurrences": rows,
        "examples": rows // 2,
        "arguments": {"top_k": TOP_K},
        "query_sets": {"val": {"num_queries": QUERIES, "query_ids": [0, 1, 2], "phases": phases}},
    }
    (directory / formats.SUMMARY).write_text(json.dumps(summary))
    return summary


def add_job(session: Session, status: str, summary: dict[str, object] | None) -> Job:
    """A job in a run in a project, committed."""
    project = Project(name="p")
    session.add(project)
    session.flush()
    run = Run(project_id=project.id, name="r")
    session.add(run)
    session.flush()
    job = Job(run_id=run.id, status=status, options={}, summary=summary)
    session.add(job)
    session.commit()
    return job


def test_windows_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dvemb.db'}"
    upgrade(url)
    summary = results_directory(tmp_path)
    results = load_results(tmp_path)
    engine = make_engine(url)
    with Session(engine) as session:
        job = add_job(session, "succeeded", summary)
        meta: dict[str, tuple[str | None, str | None]] = {f"ex{i}": (str(i % 3), "train") for i in range(60)}
        fenced: list[int] = []
        writer = ShortTransactions(sessionmaker(bind=engine), fence=lambda _: fenced.append(1))
        writer.chunk = 50  # rows per transaction: the windows' 480 rows never hold SQLite's write lock at once
        store_windows(writer, job.id, results, Summary.from_json(summary), meta)
        assert len(fenced) == 1 + 10  # the windows, then their rows 50 at a time (query set, window, kind order)
        stored = service.list_windows(session, job=job, query_set="val")
        assert [w.name for w in stored][:3] == ["early", "basin", "late"]
        assert [w.kind for w in stored].count("epoch") == 2 and len(stored) == 3 + 10 + 2
        expected = window_topk(
            np.load(tmp_path / formats.scores_file("val")),
            results.row_step.numpy(),
            results.epoch.numpy(),
            standard_windows(STEPS, [3, 15], 2),
            TOP_K,
        )
        for w, window in enumerate(stored):
            for kind_index, kind in enumerate(("helpful", "harmful")):
                for query in (None, 2):
                    rows, count = service.window_rows(
                        session, job=job, window=window, query=query, kind=kind, offset=0, limit=10
                    )
                    column = QUERIES if query is None else query
                    values = expected.values[w, kind_index, column]
                    signed = values > 0 if kind == "helpful" else values < 0  # a kind's rows have its sign
                    chosen = expected.rows[w, kind_index, column][signed]
                    ids = [f"ex{int(results.example_index[r])}" for r in chosen]
                    assert [r["example_id"] for r in rows] == ids and count == signed.sum()
                    np.testing.assert_array_equal([r["score"] for r in rows], values[signed])
                    assert all(r["label"] == meta[r["example_id"]][0] for r in rows)
        asked = service.ask_window(session, job=job, query_set="val", step_min=4, step_max=9, epoch=1)
        again = service.ask_window(session, job=job, query_set="val", step_min=4, step_max=9, epoch=1)
        assert asked.id == again.id and asked.status == "queued" and asked.kind == "range"
        assert service.chosen(asked) == "top 4 of steps 4–9, epoch 1, exact, computed on demand from the scores file"
        phase = service.ask_window(session, job=job, query_set="val", step_min=0, step_max=2, epoch=None)
        assert phase.id == stored[0].id  # the stored early phase answers it
        assert session.scalars(select(TopKWindow).where(TopKWindow.kind == "range")).all() == [asked]
        # Labels of an on-demand window's examples: by id for a few, one pass over the job's examples for many.
        session.add_all(
            ExampleTotal(
                job_id=job.id, query_set="val", example_id=e, total=0.0, occurrences=2, label=m[0], source=m[1]
            )
            for e, m in meta.items()
        )
        session.flush()
        few = _stored_metadata(session, job.id, "val", ["ex3", "ex7", "nope"])
        many = _stored_metadata(session, job.id, "val", ["ex3", "ex7", *(f"absent{i}" for i in range(1200))])
        assert few == many == {"ex3": ("0", "train"), "ex7": ("1", "train")}
        session.rollback()


def test_storing_results_reports_its_own_progress(tmp_path: Path) -> None:
    """A finished computation's rows go in with the job's storing progress written in the same transactions:
    increasing, below 1 while rows are still to come, and the expected count an upper bound of the rows written
    (windows are counted at full top_k) that is not far above it."""
    from service_harness import record_log

    from dvemb.engine import ComputeArguments, compute
    from worker.results_store import store_results

    url = f"sqlite:///{tmp_path / 'dvemb.db'}"
    upgrade(url)
    summary = compute(record_log(tmp_path / "log", steps=12, batch=8), tmp_path / "out", ComputeArguments(top_k=5))
    engine = make_engine(url)
    with Session(engine) as session:
        job_id = add_job(session, "running", None).id
    seen: list[float] = []

    def progress(session: Session, fraction: float) -> None:
        seen.append(fraction)
        session.get(Job, job_id).stored_fraction = fraction  # type: ignore[union-attr]

    writer = ShortTransactions(sessionmaker(bind=engine), fence=lambda _: None, progress=progress)
    writer.chunk = 40
    store_results(writer, job_id, tmp_path / "out", summary, {})
    assert len(seen) >= 5
    assert seen == sorted(seen)
    assert seen[0] > 0
    assert seen[-1] <= 0.99
    assert writer.rows_expected >= writer.rows_inserted >= 0.5 * writer.rows_expected
    with Session(engine) as session:
        assert session.get(Job, job_id).stored_fraction == seen[-1]  # type: ignore[union-attr]
