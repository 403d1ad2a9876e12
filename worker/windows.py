"""Top examples per window of training, in the database: the stored windows (phases, tenths, epochs) written
with a job's results, and a step range asked for through the API computed on demand (dvemb.engine.windows
reads the scores file; the rows are cached in topk_windows / window_topk_rows)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from dvemb import formats
from dvemb.engine import load_results
from dvemb.engine.results import Results
from dvemb.engine.windows import Window, standard_windows, window_topk
from dvemb.formats import Summary
from server.db.models import ExampleTotal, Job
from server.db.session import session_factory
from server.db.states import QueryStatus, transition
from server.db.window_models import ANY_EPOCH, TopKWindow, WindowTopKRow
from server.storage import get_storage, results_key
from worker.row_writes import ShortTransactions

__all__ = ["run_window_topk", "store_windows"]

KINDS = ("helpful", "harmful")


def store_windows(
    writer: ShortTransactions,
    job_id: int,
    results: Results,
    summary: Summary,
    meta: dict[str, tuple[str | None, str | None]],
) -> None:
    """Replace the job's windows with its stored ones: each phase, tenth of training and epoch of every query set,
    with the job's top_k rows per query (and the set mean) and kind (idempotent; cached ranges are dropped too).
    The rows go in the writer's short transactions, like the job's other rows: a 1,000-query job has millions."""
    epochs = int(results.epoch.max()) + 1 if len(results.epoch) else 0
    windows = {
        name: standard_windows(summary.steps, info.boundaries, epochs) for name, info in summary.query_sets.items()
    }
    # Ranked before the first write: on SQLite the write lock is taken by the first write and held to the commit,
    # so the ranking (seconds on a large job) must not run inside it (issue 13.16).
    ranked = {name: _rank(results, name, windows[name], summary.top_k) for name in windows}
    record_ids: dict[str, list[int]] = {}

    def create_windows(session: Session) -> None:
        session.execute(delete(TopKWindow).where(TopKWindow.job_id == job_id))  # their rows go with them
        for name, of_set in windows.items():
            records = [_record(job_id, name, w, summary.top_k, QueryStatus.SUCCEEDED) for w in of_set]
            for record, occurrences in zip(records, ranked[name].occurrences.tolist(), strict=True):
                record.occurrences = int(occurrences)
            session.add_all(records)
            session.flush()
            record_ids[name] = [r.id for r in records]

    writer.run(create_windows)
    for name in windows:
        writer.insert_tuples(WindowTopKRow.__tablename__, COLUMNS, _rows(record_ids[name], results, ranked[name], meta))


def _record(job_id: int, query_set: str, window: Window, top_k: int, status: QueryStatus) -> TopKWindow:
    return TopKWindow(
        job_id=job_id,
        query_set=query_set,
        kind=window.kind,
        name=window.name,
        step_min=window.step_min,
        step_max=window.step_max,
        epoch=ANY_EPOCH if window.epoch is None else window.epoch,
        top_k=top_k,
        status=status,
    )


def run_window_topk(window_id: int) -> None:
    """Compute one asked-for window (a step range) from the job's scores file and store its rows."""
    storage = get_storage()
    factory = session_factory()
    with factory() as session:
        record = session.get(TopKWindow, window_id)
        if record is None or record.status != QueryStatus.QUEUED:
            return  # done already (a redelivery) or deleted with its run
        job = session.get(Job, record.job_id)
        assert job is not None
        job_id, query_set, top_k, directory = (
            job.id,
            record.query_set,
            record.top_k,
            results_key(job.run_id, job.id),
        )
        window = Window(
            record.kind,
            record.name,
            record.step_min,
            record.step_max,
            None if record.epoch == ANY_EPOCH else record.epoch,
        )
    # Nothing written yet: no transaction stays open while the scores file is read. The rows then go in short
    # transactions (the window's rows are read only once it has succeeded; a redelivery deletes them first).
    writer = ShortTransactions(factory, fence=functools.partial(_still_queued, window_id))
    try:
        tables = {formats.SUMMARY, formats.OCCURRENCES, formats.EXAMPLES, formats.scores_file(query_set)}
        with storage.local_copy(directory, keep=tables.__contains__) as local:  # only what ranking reads
            results = load_results(local)
            top = _rank(results, query_set, [window], top_k)
        with factory() as session:
            meta = _stored_metadata(session, job_id, query_set, _chosen_ids(results, top))

        def start(session: Session) -> None:
            session.execute(delete(WindowTopKRow).where(WindowTopKRow.window_id == window_id))
            session.execute(
                update(TopKWindow).where(TopKWindow.id == window_id).values(occurrences=int(top.occurrences[0]))
            )

        writer.run(start)
        writer.insert_tuples(WindowTopKRow.__tablename__, COLUMNS, _rows([window_id], results, top, meta))
    except _WindowGone:
        return
    except Exception as exc:  # in words on the window, not a task stuck in a retry loop
        _settle(factory, window_id, QueryStatus.FAILED, error=storage.public_message(f"{exc}"))
        return
    _settle(factory, window_id, QueryStatus.SUCCEEDED)


class _WindowGone(Exception):
    """The window was deleted (with its job or run) or settled by another task while this one wrote."""


def _still_queued(window_id: int, session: Session) -> None:
    status = session.scalar(select(TopKWindow.status).where(TopKWindow.id == window_id).with_for_update())
    if status != QueryStatus.QUEUED:
        raise _WindowGone


def _settle(factory: Any, window_id: int, status: QueryStatus, **values: Any) -> None:
    with factory() as session:
        record = session.get(TopKWindow, window_id)
        if record is not None and record.status == QueryStatus.QUEUED:
            transition(session, record, status, **values)
            session.commit()


def _chosen_ids(results: Results, top: Any) -> set[str]:
    """The example ids of every row the ranking chose."""
    examples = results.example_index.numpy()
    return {str(results.example_ids[int(examples[r])]) for r in np.unique(top.rows[top.rows >= 0])}


def _rows(
    record_ids: list[int], results: Results, top: Any, meta: dict[str, tuple[str | None, str | None]]
) -> Iterator[tuple[Any, ...]]:
    """The windows' top rows in ``COLUMNS`` order (query -1 is the set mean), window by window, each query's
    rows best first."""
    steps, epochs, examples = results.row_step.numpy(), results.epoch.numpy(), results.example_index.numpy()
    ids = [str(i) for i in results.example_ids]
    queries = top.values.shape[2] - 1
    for w, record_id in enumerate(record_ids):
        for kind_index, kind in enumerate(KINDS):
            chosen = top.rows[w, kind_index]  # (Q + 1, k)
            columns, ranks = np.nonzero(chosen >= 0)  # query by query, best first
            rows = chosen[columns, ranks]
            example_ids = [ids[i] for i in examples[rows].tolist()]
            labels = [meta.get(e, (None, None)) for e in example_ids]
            yield from zip(
                itertools.repeat(record_id),
                np.where(columns == queries, -1, columns).tolist(),
                itertools.repeat(kind),
                ranks.tolist(),
                top.values[w, kind_index][columns, ranks].tolist(),
                rows.tolist(),
                steps[rows].tolist(),
                epochs[rows].tolist(),
                example_ids,
                [label for label, _ in labels],
                [source for _, source in labels],
            )


def _rank(results: Results, query_set: str, windows: list[Window], k: int) -> Any:
    """The windows' top-k rows and scores of each query, from the scores file (CPU: no transaction needed)."""
    return window_topk(results.scores(query_set), results.row_step.numpy(), results.epoch.numpy(), windows, k)


COLUMNS = ("window_id", "query", "kind", "rank", "score", "row", "step", "epoch", "example_id", "label", "source")


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
