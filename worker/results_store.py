"""Storing a finished computation's aggregates (top-k rows, per-example totals, curves, phases) in the
database in short transactions, replacing any rows of an earlier attempt (idempotent)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dvemb.engine import load_results
from dvemb.engine.windows import standard_windows
from dvemb.formats import Summary, phase_of
from dvemb.reader import GradientLog
from server.db.models import CurvePoint, ExampleTotal, PhaseSummaryRow, TopKRow
from server.db.window_models import TopKWindow, WindowTopKRow
from worker.row_writes import ShortTransactions
from worker.windows import store_windows

__all__ = ["example_metadata", "refresh_statistics", "store_results"]

log = logging.getLogger(__name__)

# Every table a job's results go to: their planner statistics are refreshed once the rows are in.
RESULT_TABLES = tuple(
    m.__tablename__ for m in (TopKRow, ExampleTotal, CurvePoint, PhaseSummaryRow, TopKWindow, WindowTopKRow)
)
# ANALYZE waits at most this long for a table's lock (another worker's ANALYZE of it, a VACUUM): skipped past it.
ANALYZE_LOCK_TIMEOUT = "5s"


def example_metadata(directory: Any) -> dict[str, tuple[str | None, str | None]]:
    """Example id -> (label, source) from the log's example metadata files (validated on upload)."""
    meta: dict[str, tuple[str | None, str | None]] = {}
    for record in GradientLog(directory).iter_examples():
        label, source = record.get("label"), record.get("source")
        meta[str(record["id"])] = (
            None if label is None else str(label)[:255],
            None if source is None else str(source)[:255],
        )
    return meta


def store_results(
    writer: ShortTransactions,
    job_id: int,
    out: Any,
    summary: dict[str, Any],
    meta: dict[str, tuple[str | None, str | None]],
) -> None:
    """Replace the job's aggregate rows with those of the results directory (idempotent: an earlier attempt's
    rows are deleted first), in short transactions while the job is still running."""
    for model in (TopKRow, ExampleTotal, CurvePoint, PhaseSummaryRow):
        writer.delete_job_rows(model, job_id)
    results = load_results(out)
    ids = [str(i) for i in results.example_ids]
    occurrences = np.bincount(results.example_index.numpy(), minlength=len(ids))
    typed = Summary.from_json(summary)
    writer.expect(expected_rows(typed, len(ids), int(results.epoch.max()) + 1 if len(results.epoch) else 0))
    for name, info in typed.query_sets.items():
        bounds = info.boundaries
        writer.insert(
            TopKRow,
            (
                {
                    "job_id": job_id,
                    "query_set": name,
                    "query": -1 if query is None else query,
                    "kind": kind,
                    "rank": r["rank"],
                    "score": r["score"],
                    "row": r["row"],
                    "step": r["step"],
                    "epoch": r["epoch"],
                    "example_id": str(r["example_id"]),
                    "phase": phase_of(r["step"], bounds),
                    "label": meta.get(str(r["example_id"]), (None, None))[0],
                    "source": meta.get(str(r["example_id"]), (None, None))[1],
                }
                for query in [None, *range(info.num_queries)]
                for kind in ("helpful", "harmful")
                for r in results.top(name, kind=kind, query=query, k=typed.top_k)
            ),
        )
        totals = results.totals(name).mean(axis=1)
        writer.insert(
            ExampleTotal,
            (
                {
                    "job_id": job_id,
                    "query_set": name,
                    "example_id": ids[i],
                    "total": float(totals[i]),
                    "occurrences": int(occurrences[i]),
                    "label": meta.get(ids[i], (None, None))[0],
                    "source": meta.get(ids[i], (None, None))[1],
                }
                for i in range(len(ids))
            ),
        )
        curve = results.curve(name)
        writer.insert(
            CurvePoint,
            (
                {
                    "job_id": job_id,
                    "query_set": name,
                    "step": int(curve["step"][t]),
                    "lr": float(curve["lr"][t]),
                    "mean": float(curve["mean"][t]),
                    "abs_sum": float(curve["abs_sum"][t]),
                    "mean_per_lr": _finite(curve["mean_per_lr"][t]),
                    "loss": _finite(curve["loss"][t]),
                }
                for t in range(len(curve["step"]))
            ),
        )
        writer.insert(PhaseSummaryRow, [{"job_id": job_id, "query_set": name, "summary": info.phases}])
    # The top examples of each phase, tenth and epoch (bounded: windows x queries x top_k rows).
    store_windows(writer, job_id, results, typed, meta)


def expected_rows(summary: Summary, examples: int, epochs: int) -> int:
    """About how many rows :func:`store_results` inserts (windows counted at full ``top_k``, an upper bound), for
    the job's storing progress."""
    per_set = []
    for info in summary.query_sets.values():
        lists = (info.num_queries + 1) * 2  # every query and the set mean, helpful and harmful
        windows = len(standard_windows(summary.steps, info.boundaries, epochs))
        per_set.append(lists * summary.top_k * (1 + windows) + examples + summary.steps + 1)
    return sum(per_set)


def refresh_statistics(factory: sessionmaker[Session]) -> None:
    """``ANALYZE`` the result tables on PostgreSQL (a no-op on SQLite), before the job is marked succeeded.

    Freshly written rows have no statistics until autovacuum comes by (a minute or more, later on a busy database):
    meanwhile the planner takes a job's 10^4 example totals for one row and joins two jobs with a nested loop
    (84 s for ``GET /compare`` of two 9,600-example jobs, 0.14 s once analysed). ANALYZE samples at most 30,000 rows
    per table whatever its size, so it costs about as much for the millionth job as for the first. Statistics are
    an optimisation: a failure (a lock held past ANALYZE_LOCK_TIMEOUT, a lost connection) is logged, not the job's.
    """
    try:
        with factory() as session:
            if session.get_bind().dialect.name != "postgresql":
                return
            session.execute(text(f"SET LOCAL lock_timeout = '{ANALYZE_LOCK_TIMEOUT}'"))
            session.execute(text(f"ANALYZE {', '.join(RESULT_TABLES)}"))
            session.commit()
    except SQLAlchemyError as exc:
        log.warning("statistics of the result tables not refreshed (autovacuum will): %s", exc)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
