"""Writing a job's many rows: fast (PostgreSQL's ``COPY``, sqlite3's ``executemany`` of tuples) and in short
transactions (so that in the embedded SQLite mode the API's writes never wait seconds for a job's)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["ShortTransactions", "copy_rows"]


def copy_rows(session: Session, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Insert rows of plain values (one tuple per row, in ``columns`` order) through the driver, in the session's
    transaction: PostgreSQL's ``COPY`` (a 1,000-query job stores millions of rows; bench.copy_bench measured it
    2.9 times faster than batched INSERTs), sqlite3's ``executemany`` of tuples (about 10 times faster than
    SQLAlchemy's INSERT of dicts)."""
    connection = session.connection()
    driver = connection.connection.driver_connection
    assert driver is not None
    if connection.dialect.name == "postgresql":
        from psycopg import sql

        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns)
        )
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
        return
    if connection.dialect.name == "sqlite":
        quoted = ", ".join(f'"{c}"' for c in columns)
        driver.executemany(f'INSERT INTO "{table}" ({quoted}) VALUES ({", ".join("?" * len(columns))})', rows)
        return
    raise NotImplementedError(f"storing rows on {connection.dialect.name}: use SQLite or PostgreSQL")


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

    def __init__(
        self,
        factory: sessionmaker[Session],
        fence: Callable[[Session], None],
        progress: Callable[[Session, float], None] | None = None,
    ) -> None:
        """``progress``: called in each transaction that inserts rows, after them, with the share of the expected
        rows (:meth:`expect`) inserted so far, at most 0.99 (the job's storing progress, written in the same
        transaction: no extra commit)."""
        self.factory, self.fence, self.progress = factory, fence, progress
        self.rows_inserted, self.rows_expected = 0, 0
        bind = factory.kw.get("bind")
        self.single_writer = bind is not None and bind.dialect.name == "sqlite"
        # Rows per transaction: about 50 ms of SQLite's write lock; PostgreSQL's writers do not block the API.
        self.chunk = 500 if self.single_writer else 5000
        self.held = 0.0

    def expect(self, rows: int) -> None:
        """How many rows the writer will insert in all (an estimate: the progress is capped below 1)."""
        self.rows_expected = rows

    def run(self, work: Callable[[Session], object], rows: int = 0) -> None:
        """``work`` in one fenced transaction (keep it bounded); ``rows``: how many rows it inserts."""
        started = time.monotonic()
        with self.factory() as session:
            self.fence(session)
            work(session)
            if rows and self.progress is not None and self.rows_expected:
                self.progress(session, min(0.99, (self.rows_inserted + rows) / self.rows_expected))
            session.commit()
        self.rows_inserted += rows
        self.held += time.monotonic() - started
        if self.single_writer and self.held >= self.HOLD_S:
            time.sleep(self.YIELD_S)  # the API's writes get their turn
            self.held = 0.0

    def insert(self, model: Any, rows: Iterable[dict[str, Any]]) -> None:
        """Insert rows (dicts of plain values, one set of keys), a bounded batch per transaction."""
        iterator = iter(rows)
        while batch := list(islice(iterator, self.chunk)):

            def work(session: Session, batch: list[dict[str, Any]] = batch) -> None:
                if any(isinstance(v, dict | list) for v in batch[0].values()):
                    session.execute(insert(model), batch)  # JSON values: the driver would need them adapted
                else:
                    columns = list(batch[0])
                    copy_rows(session, model.__tablename__, columns, ([row[c] for c in columns] for row in batch))

            self.run(work, len(batch))

    def insert_tuples(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Insert rows given as tuples in ``columns`` order, a bounded batch per transaction."""
        iterator = iter(rows)
        while batch := list(islice(iterator, self.chunk)):
            self.run(lambda session, batch=batch: copy_rows(session, table, columns, batch), len(batch))  # type: ignore[misc]

    def delete_job_rows(self, model: Any, job_id: int) -> None:
        """Delete the job's rows of ``model``, a bounded number per transaction."""
        deleted = [self.chunk]
        while deleted[0] >= self.chunk:

            def work(session: Session) -> None:
                some = select(model.id).where(model.job_id == job_id).limit(self.chunk)
                deleted[0] = session.execute(delete(model).where(model.id.in_(some))).rowcount  # type: ignore[attr-defined]

            self.run(work)
