"""Storing a finished computation's aggregates (top-k rows, per-example totals, curves, phases) in the
database in short transactions, replacing any rows of an earlier attempt (idempotent)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session, sessionmaker

from dvemb.engine import load_results
from dvemb.formats import Summary, phase_of
from dvemb.reader import GradientLog
from server.db.models import CurvePoint, ExampleTotal, PhaseSummaryRow, TopKRow
from worker.windows import store_windows

__all__ = ["ShortTransactions", "example_metadata", "store_results"]


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


class ShortTransactions:
    """Writes a job's rows in short transactions, each opened by ``fence`` (a write to the job's row that raises
    when this attempt no longer holds the job: cancelled, or taken over). A job's rows may take seconds to write;
    on SQLite one transaction would hold the database's only write lock all that time and every API write would
    wait for it (issue 13.16). Writers of one job serialise on the fence (it locks the job's row), and a job's
    rows are only ever read once it has succeeded, which the last transaction says: half-written rows of a
    running, failed or cancelled job are never shown, and the next attempt deletes them before writing its own."""

    #: On SQLite, after holding the write lock this long (seconds, over several transactions), leave it free for
    #: ``YIELD_S``: a writer waiting in SQLite's busy handler looks again only every 100 ms, and would otherwise
    #: keep finding the lock taken by the next chunk (measured: 1.6 s for a POST /runs against back-to-back chunks).
    HOLD_S, YIELD_S = 0.25, 0.12

    def __init__(self, factory: sessionmaker[Session], fence: Callable[[Session], None]) -> None:
        self.factory, self.fence = factory, fence
        bind = factory.kw.get("bind")
        self.single_writer = bind is not None and bind.dialect.name == "sqlite"
        # Rows per transaction: about 50 ms of SQLite's write lock; PostgreSQL's writers do not block the API.
        self.chunk = 500 if self.single_writer else 5000
        self.held = 0.0

    def run(self, work: Callable[[Session], object]) -> None:
        """``work`` in one fenced transaction (keep it bounded)."""
        started = time.monotonic()
        with self.factory() as session:
            self.fence(session)
            work(session)
            session.commit()
        self.held += time.monotonic() - started
        if self.single_writer and self.held >= self.HOLD_S:
            time.sleep(self.YIELD_S)  # the API's writes get their turn
            self.held = 0.0

    def insert(self, model: Any, rows: Iterable[dict[str, Any]]) -> None:
        """Insert rows (dicts of plain values, one set of keys), a bounded batch per transaction: PostgreSQL's
        ``COPY`` (several times faster than a multi-row INSERT), SQLite's executemany."""
        iterator = iter(rows)
        while batch := list(islice(iterator, self.chunk)):

            def work(session: Session, batch: list[dict[str, Any]] = batch) -> None:
                if self.single_writer or any(isinstance(v, dict | list) for v in batch[0].values()):
                    session.execute(insert(model), batch)  # SQLite, or JSON values (COPY would need them adapted)
                else:
                    _copy_rows(session, model.__tablename__, batch)

            self.run(work)

    def delete_job_rows(self, model: Any, job_id: int) -> None:
        """Delete the job's rows of ``model``, a bounded number per transaction."""
        deleted = [self.chunk]
        while deleted[0] >= self.chunk:

            def work(session: Session) -> None:
                some = select(model.id).where(model.job_id == job_id).limit(self.chunk)
                deleted[0] = session.execute(delete(model).where(model.id.in_(some))).rowcount  # type: ignore[attr-defined]

            self.run(work)


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
    writer.run(lambda session: store_windows(session, job_id, results, typed, meta))


def _copy_rows(session: Session, table: str, rows: list[dict[str, Any]]) -> None:
    """``COPY table (columns) FROM STDIN`` of plain-valued rows, in the session's transaction (psycopg 3)."""
    from psycopg import sql

    columns = list(rows[0])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    )
    driver = session.connection().connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row([row[c] for c in columns])


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
