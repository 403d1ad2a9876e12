"""Top examples per window of training, in the database: the stored windows (phases, tenths, epochs) written
with a job's results, and a step range asked for through the API computed on demand (dvemb.engine.windows
reads the scores file; the rows are cached in topk_windows / window_topk_rows)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from dvemb.engine import load_results
from dvemb.engine.results import Results
from dvemb.engine.windows import Window, standard_windows, window_topk
from dvemb.formats import Summary
from server.db.models import ExampleTotal, Job
from server.db.session import session_factory
from server.db.states import QueryStatus, transition
from server.db.window_models import ANY_EPOCH, TopKWindow, WindowTopKRow
from server.settings import get_settings
from server.storage import public_message, results_dir

__all__ = ["run_window_topk", "store_windows"]

KINDS = ("helpful", "harmful")


def store_windows(
    session: Session, job_id: int, results: Results, summary: Summary, meta: dict[str, tuple[str | None, str | None]]
) -> None:
    """Replace the job's windows with its stored ones: each phase, tenth of training and epoch of every query set,
    with the job's top_k rows per query (and the set mean) and kind (idempotent; cached ranges are dropped too)."""
    epochs = int(results.epoch.max()) + 1 if len(results.epoch) else 0
    # Ranked before the first write: on SQLite the write lock is taken by the first write and held to the commit,
    # so the ranking (seconds on a large job) must not run inside it (issue 13.16).
    ranked = {
        name: _rank(results, name, standard_windows(summary.steps, info.boundaries, epochs), summary.top_k)
        for name, info in summary.query_sets.items()
    }
    session.execute(delete(TopKWindow).where(TopKWindow.job_id == job_id))
    for name, info in summary.query_sets.items():
        windows = standard_windows(summary.steps, info.boundaries, epochs)
        records = [
            TopKWindow(
                job_id=job_id,
                query_set=name,
                kind=w.kind,
                name=w.name,
                step_min=w.step_min,
                step_max=w.step_max,
                epoch=ANY_EPOCH if w.epoch is None else w.epoch,
                top_k=summary.top_k,
                status=QueryStatus.SUCCEEDED,
            )
            for w in windows
        ]
        session.add_all(records)
        session.flush()
        _store_rows(session, records, windows, results, name, summary.top_k, lambda _: meta, top=ranked[name])


def run_window_topk(window_id: int) -> None:
    """Compute one asked-for window (a step range) from the job's scores file and store its rows."""
    storage = get_settings().storage
    with session_factory()() as session:
        record = session.get(TopKWindow, window_id)
        if record is None or record.status != QueryStatus.QUEUED:
            return  # done already (a redelivery) or deleted with its run
        job = session.get(Job, record.job_id)
        assert job is not None
        directory = results_dir(storage, job.run_id, job.id)
        window = Window(
            record.kind,
            record.name,
            record.step_min,
            record.step_max,
            None if record.epoch == ANY_EPOCH else record.epoch,
        )
        session.commit()  # nothing written: no transaction stays open while the scores file is read
        try:
            results = load_results(directory)
            meta = functools.partial(_stored_metadata, session, job.id, record.query_set)
            _store_rows(session, [record], [window], results, record.query_set, record.top_k, meta)
        except Exception as exc:  # in words on the window, not a task stuck in a retry loop
            session.rollback()
            record = session.get(TopKWindow, window_id)
            if record is not None:
                transition(session, record, QueryStatus.FAILED, error=public_message(f"{exc}", storage))
                session.commit()
            return
        transition(session, record, QueryStatus.SUCCEEDED)
        session.commit()


def _store_rows(
    session: Session,
    records: list[TopKWindow],
    windows: list[Window],
    results: Results,
    query_set: str,
    k: int,
    metadata: Callable[[Collection[str]], dict[str, tuple[str | None, str | None]]],
    top: Any = None,
) -> None:
    """Rank the windows on the scores file (unless ``top`` is their ranking, done already) and insert their rows
    (query -1 is the set mean); ``metadata`` gives the (label, source) of the example ids it is passed."""
    steps, epochs, examples = results.row_step.numpy(), results.epoch.numpy(), results.example_index.numpy()
    if top is None:
        top = _rank(results, query_set, windows, k)
    ids = [str(i) for i in results.example_ids]
    meta = metadata({ids[int(examples[r])] for r in np.unique(top.rows[top.rows >= 0])})
    # A redelivered task's earlier attempt may have left rows (the ranking is done: the write starts now).
    session.execute(delete(WindowTopKRow).where(WindowTopKRow.window_id.in_([r.id for r in records])))
    queries = top.values.shape[2] - 1
    session.flush()  # the windows' rows exist before their top rows are copied in
    for w, record in enumerate(records):
        record.occurrences = int(top.occurrences[w])
        for kind_index, kind in enumerate(KINDS):
            chosen = top.rows[w, kind_index]  # (Q + 1, k)
            columns, ranks = np.nonzero(chosen >= 0)  # query by query, best first
            rows = chosen[columns, ranks]
            example_ids = [ids[i] for i in examples[rows].tolist()]
            labels = [meta.get(e, (None, None)) for e in example_ids]
            n = len(rows)
            _copy_rows(
                session,
                zip(
                    [record.id] * n,
                    np.where(columns == queries, -1, columns).tolist(),
                    [kind] * n,
                    ranks.tolist(),
                    top.values[w, kind_index][columns, ranks].tolist(),
                    rows.tolist(),
                    steps[rows].tolist(),
                    epochs[rows].tolist(),
                    example_ids,
                    [label for label, _ in labels],
                    [source for _, source in labels],
                    strict=True,
                ),
            )
    session.flush()


def _rank(results: Results, query_set: str, windows: list[Window], k: int) -> Any:
    """The windows' top-k rows and scores of each query, from the scores file (CPU: no transaction needed)."""
    return window_topk(results.scores(query_set), results.row_step.numpy(), results.epoch.numpy(), windows, k)


COLUMNS = ("window_id", "query", "kind", "rank", "score", "row", "step", "epoch", "example_id", "label", "source")


def _copy_rows(session: Session, rows: Iterable[tuple[Any, ...]]) -> None:
    """Insert top rows through the driver, in the session's transaction: PostgreSQL's COPY (a 1,000-query job
    stores millions of rows: an INSERT per batch of them costs ~50 times longer), sqlite3's ``executemany`` of
    tuples (the demo's 683,400 rows: 14 s through SQLAlchemy's INSERT of dicts, about 10 times faster)."""
    connection = session.connection()
    driver = connection.connection.driver_connection
    assert driver is not None
    if connection.dialect.name == "postgresql":
        with driver.cursor() as cursor, cursor.copy(f"COPY window_topk_rows ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    if connection.dialect.name == "sqlite":
        marks = ", ".join("?" * len(COLUMNS))
        driver.executemany(f"INSERT INTO window_topk_rows ({', '.join(COLUMNS)}) VALUES ({marks})", rows)
        return
    batch = [dict(zip(COLUMNS, row, strict=True)) for row in rows]
    for start in range(0, len(batch), 20_000):
        session.execute(insert(WindowTopKRow), batch[start : start + 20_000])


def _stored_metadata(
    session: Session, job_id: int, query_set: str, example_ids: Collection[str]
) -> dict[str, tuple[str | None, str | None]]:
    """(label, source) of these examples, as stored with the job's per-example totals."""
    of_job = select(ExampleTotal.example_id, ExampleTotal.label, ExampleTotal.source).where(
        ExampleTotal.job_id == job_id, ExampleTotal.query_set == query_set
    )
    if len(example_ids) > 1000:
        # Many ids (a window of many queries): one pass over the job's examples. A long IN list is searched
        # per row when the planner has no fresh statistics (34 s for 5,000 ids among 10^5 examples).
        wanted = set(example_ids)
        return {e: (label, source) for e, label, source in session.execute(of_job) if e in wanted}
    found = session.execute(of_job.where(ExampleTotal.example_id.in_(sorted(example_ids))))
    return {e: (label, source) for e, label, source in found}
