"""Storing a job's aggregate rows on PostgreSQL: ``COPY`` (worker/results_store.py) against the batched
multi-row INSERT it replaced, same rows, same 5,000-row transactions, interleaved rounds in one process.

Run (PostgreSQL on 127.0.0.1:5432, trust auth)::

    .venv/bin/python -m bench.copy_bench [--rows 60000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg
from sqlalchemy import create_engine, insert, text
from sqlalchemy.orm import sessionmaker

from server.db.models import ExampleTotal
from server.migrate import upgrade
from worker.row_writes import copy_rows

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
CHUNK = 5000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    name = f"dvemb_copy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        engine = create_engine(url)
        factory = sessionmaker(bind=engine)
        rows = [
            {"job_id": 1, "query_set": "val", "example_id": str(i), "total": float(i), "occurrences": 3}
            for i in range(args.rows)
        ]
        seconds: dict[str, list[float]] = {"insert": [], "copy": []}
        for _ in range(args.rounds):
            for kind in seconds:
                started = time.perf_counter()
                for i in range(0, len(rows), CHUNK):
                    with factory() as session:
                        session.execute(text("SET session_replication_role = replica"))  # no job row: skip FKs
                        if kind == "insert":
                            session.execute(insert(ExampleTotal), rows[i : i + CHUNK])
                        else:
                            batch = rows[i : i + CHUNK]
                            columns = list(batch[0])
                            values = ([row[c] for c in columns] for row in batch)
                            copy_rows(session, ExampleTotal.__tablename__, columns, values)
                        session.commit()
                seconds[kind].append(time.perf_counter() - started)
                with factory() as session:
                    session.execute(text("DELETE FROM example_totals"))
                    session.commit()
        median = {k: statistics.median(v) for k, v in seconds.items()}
        print(
            f"{args.rows} rows: INSERT {median['insert']:.2f} s, COPY {median['copy']:.2f} s, "
            f"COPY is {median['insert'] / median['copy']:.1f}x faster ({args.rows / median['copy']:,.0f} rows/s)"
        )
        engine.dispose()
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
