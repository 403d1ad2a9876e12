"""The scaffolding every benchmark shares: managed processes, machine facts and timing helpers, the throwaway
databases, a synthetic stored job's summary, the provenance line and BENCHMARKS.md writing.

A new benchmark imports from here (and from nothing else in bench/ for its scaffolding)::

    from bench.harness import OUT, ROOT, Postgres, ManagedProcess, percentile, provenance, replace_section

What each piece measures or writes is the benchmarks' business; this module only starts, waits, stops and
describes the machine, the same way for all of them, so their figures stay comparable.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

# BENCHMARKS.md writing (bench/markdown.py), re-exported: a benchmark takes it from here with the rest
from bench.markdown import BENCHMARKS as BENCHMARKS
from bench.markdown import measured_commit as measured_commit
from bench.markdown import replace_block as replace_block
from bench.markdown import replace_section as replace_section

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
QUIET_PATTERN = "pytest|recorder_overhead|engine_speed|fidelity"


# ------------------------------------------------------------------------------ machine facts and timing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and of all its descendants (e.g. uvicorn's master and its workers)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            total += proc_cpu_seconds(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    t = os.times()
    return t.user + t.system


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs '5'); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def loadavg() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    """The processor as the provenance lines name it (``platform.processor()``, else the architecture)."""
    return platform.processor() or platform.machine()


def utc_stamp() -> str:
    """Now, as every section dates its run: ``2026-01-31 12:00 UTC``."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def provenance(*, commit: str | None = None) -> str:
    """The head of a section's provenance line: ``[at commit C ]on STAMP, MACHINE``; each benchmark appends its
    own details (threads, versions, duration) after it, in its own words.

    Args:
        commit: the measured commit (``measured_commit()``, or one given on the command line); left out when None.
    """
    return (f"at commit {commit} " if commit is not None else "") + f"on {utc_stamp()}, {machine()}"


def busy_processes(pattern: str = QUIET_PATTERN) -> list[str]:
    """Command lines of the other benchmarks or test runs found now (``pgrep -af pattern``)."""
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if line.strip()]


def wait_until_quiet(max_minutes: float, poll_s: float = 20.0) -> dict[str, Any]:
    """Poll until no other benchmark or test run is found (or give up after ``max_minutes``)."""
    start = time.monotonic()
    first = busy_processes()
    seen = list(first)
    while True:
        busy = busy_processes()
        if not busy:
            return {"waited_s": round(time.monotonic() - start), "gave_up": False, "busy_at_start": first}
        seen = busy
        if time.monotonic() - start >= max_minutes * 60:
            return {
                "waited_s": round(time.monotonic() - start),
                "gave_up": True,
                "busy_at_start": first,
                "busy_at_end": seen,
            }
        print(f"waiting for a quiet machine: {len(busy)} busy process(es), e.g. {busy[0][:100]}", flush=True)
        time.sleep(poll_s)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (numpy's linear interpolation); NaN for no values."""
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def met(flag: bool) -> str:
    """A verdict against a target, as the sections print it."""
    return "**met**" if flag else "**NOT met**"


def save_json(name: str, data: Any, *, indent: int = 1) -> Path:
    """Write a benchmark's measurements to ``bench/out/NAME`` (git-ignored); returns the path."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, indent=indent, default=str))
    return path


# ------------------------------------------------------------------------------------ managed processes


class ManagedProcess:
    """A child process whose stdout and stderr go to a temporary log file: started, waited on until ``ready()``
    holds, read back (``output()``), its process tree's CPU time counted, and stopped (terminate, then kill).

    Subclasses (or callers) give the command and the readiness predicate; the constructor raises RuntimeError,
    with the log's tail, when the process exits or is not ready in time (and stops it first).
    """

    #: seconds ``stop()`` waits after SIGTERM before SIGKILL
    stop_timeout = 20.0

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        ready: Callable[[ManagedProcess], bool] | None = None,
        timeout: float = 60.0,
        poll: float = 0.2,
    ) -> None:
        """Start ``command`` in the repository root with ``os.environ`` updated by ``env``; with ``ready``, wait
        (polling every ``poll`` s, at most ``timeout`` s) until it returns true."""
        self.name = name or command[0]
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            list(command), cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid
        if ready is not None:
            self.wait_until(ready, timeout=timeout, poll=poll)

    def wait_until(self, ready: Callable[[ManagedProcess], bool], *, timeout: float, poll: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise RuntimeError(f"{self.name} exited with {code}: {self.output()}")
            if ready(self):
                return
            time.sleep(poll)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready in {timeout:g} s: {self.output()}")

    def running(self) -> bool:
        return self.process.poll() is None

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the process's log (after ``stop()``: the tail it had then)."""
        if self.log.closed:
            return self._final
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-tail:]

    def cpu_seconds(self) -> float:
        """CPU seconds of the process and its descendants so far."""
        return tree_cpu_seconds(self.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout`` s; closes the log (its tail stays readable)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self._final = self.output()
            self.log.close()

    _final = ""


def _answers(url: str, headers: Mapping[str, str] | None = None) -> Callable[[ManagedProcess], bool]:
    def ready(_: ManagedProcess) -> bool:
        import httpx

        try:
            return httpx.get(url, headers=dict(headers or {}), timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


class ApiProcess(ManagedProcess):
    """``uvicorn APP`` as a separate process (``server.main:app``, one process, ``--log-level warning`` as
    ``dvemb serve`` does), ready once ``probe`` answers 200.

    Args:
        env: added to the environment (``DVEMB_DATABASE_URL``, ...).
        app: the ASGI app.
        workers: ``--workers N`` (a master and N worker processes: count their CPU with ``cpu_seconds()``).
        probe: the path polled until it answers 200.
        headers: sent with the probe.
        settle: seconds slept once ready (every worker up, not just the first).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        app: str = "server.main:app",
        workers: int | None = None,
        probe: str = "/api/v1/health",
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        poll: float = 0.2,
        settle: float = 0.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port),
            *(["--workers", str(workers)] if workers else []), "--log-level", "warning",
        ]  # fmt: skip
        ready = _answers(f"{self.url}{probe}", headers)
        super().__init__(command, env=env, name=app, ready=ready, timeout=timeout, poll=poll)
        if settle:
            time.sleep(settle)


class CeleryWorker(ManagedProcess):
    """One Celery worker process on ``queues`` (``server.tasks.worker_command``, as the service tests start it),
    ready once its log says `` ready.``; one OpenMP thread."""

    def __init__(self, env: Mapping[str, str], queues: str) -> None:
        from server.tasks import worker_command

        super().__init__(
            [*worker_command(queues, 1), "--loglevel", "INFO"],
            env={**env, "OMP_NUM_THREADS": "1"},
            name=f"the {queues} worker",
            ready=lambda p: " ready." in p.output(),
            timeout=90,
            poll=0.3,
        )


# -------------------------------------------------------------------------------------------- databases


class Postgres:
    """A throwaway database on the local PostgreSQL (127.0.0.1:5432, user postgres): ``create()``, ``drop()``."""

    name = "postgres"

    def __init__(self) -> None:
        self.db = f"dvemb_bench_{uuid.uuid4().hex[:10]}"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db}"

    def create(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def sessions(self) -> int:
        """Connections ever opened to the database (pg_stat_database.sessions, flushed within ~1 s)."""
        import psycopg

        time.sleep(1.2)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (self.db,)).fetchone()
        return int(row[0]) if row else 0

    def version(self) -> str:
        import psycopg

        with psycopg.connect(PG_ADMIN) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return f"PostgreSQL {row[0] if row else '?'}"


class Sqlite:
    """A SQLite file ``dvemb.db`` in ``directory``, with the same methods as Postgres."""

    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.path = directory / "dvemb.db"
        self.url = f"sqlite:///{self.path}"

    def create(self) -> None:
        pass

    def sessions(self) -> int | None:
        return None

    def drop(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def version(self) -> str:
        return f"SQLite {sqlite3.sqlite_version}"


# ---------------------------------------------------------------------------------- a synthetic stored job


def synthetic_phases(steps: int) -> dict[str, Any]:
    """A phase summary for ``steps`` steps: boundaries at 10% and 80% of training, fixed shares."""
    bounds = [steps // 10, steps * 8 // 10]
    return {
        "boundaries": bounds,
        "ranges": {"early": [0, bounds[0] - 1], "basin": [bounds[0], bounds[1] - 1], "late": [bounds[1], steps - 1]},
        "share_abs": {"early": 0.3, "basin": 0.5, "late": 0.2},
        "share_abs_per_lr": {"early": 0.2, "basin": 0.6, "late": 0.2},
        "mean_per_lr": {"early": 0.01, "basin": 0.001, "late": 0.005},
    }


def synthetic_summary(
    *,
    steps: int,
    occurrences: int,
    examples: int,
    queries: int,
    arguments: dict[str, Any],
    phases: dict[str, Any],
    results_file: bool = False,
) -> dict[str, Any]:
    """A job's summary with one query set, ``val``.

    Args:
        results_file: also the fields of a results directory's summary file (format, version, propagation label,
            the query ids), for the readers of the files; without it, what a job row needs for the API's reads.
    """
    val: dict[str, Any] = {"num_queries": queries}
    if results_file:
        val["query_ids"] = list(range(queries))
    val["phases"] = phases
    head: dict[str, Any] = {"format": "dvemb-results", "version": 1} if results_file else {}
    summary = {**head, "steps": steps, "occurrences": occurrences, "examples": examples, "arguments": arguments}
    if results_file:
        summary["propagation_label"] = "exact SGD"
    summary["query_sets"] = {"val": val}
    return summary


def insert_results(url: str, run_id: int, *, queries: int, top_k: int, examples: int, steps: int) -> dict[str, Any]:
    """A succeeded job with aggregate rows shaped as worker/results_store.py stores them: (queries + the set) x
    2 kinds x ``top_k`` top-k rows, ``examples`` example totals of 10 occurrences each, ``steps`` curve points
    and the phase summary (PostgreSQL: ANALYZE after, as autovacuum would)."""
    import datetime as dt

    from sqlalchemy import insert, text

    from server.db.models import CurvePoint, ExampleTotal, Job, PhaseSummaryRow, TopKRow
    from server.db.session import make_engine

    rng = np.random.default_rng(0)
    phases = synthetic_phases(steps)
    bounds = phases["boundaries"]
    summary = synthetic_summary(
        steps=steps,
        occurrences=10 * examples,  # every example occurs 10 times (the ExampleTotal rows below)
        examples=examples,
        queries=queries,
        arguments={"top_k": top_k, "curvature": "empirical", "blocks": "layer"},
        phases=phases,
    )
    engine = make_engine(url)
    start = time.perf_counter()

    def phase(step: int) -> str:
        return "early" if step < bounds[0] else "basin" if step < bounds[1] else "late"

    with engine.begin() as conn:
        job_id = conn.execute(
            insert(Job).returning(Job.id),
            {
                "run_id": run_id,
                "status": "succeeded",
                "options": {"top_k": top_k},
                "progress": 1.0,
                "attempts": 1,
                "summary": summary,
                "created_at": dt.datetime.now(dt.UTC),
                "finished_at": dt.datetime.now(dt.UTC),
            },
        ).scalar_one()
        top_rows = []
        for query in range(-1, queries):
            for kind, sign in (("helpful", 1.0), ("harmful", -1.0)):
                scores = np.sort(rng.exponential(size=top_k))[::-1] * sign
                occ = rng.integers(0, examples * 10, size=top_k)
                for rank in range(top_k):
                    step = int(occ[rank] * steps // (examples * 10))
                    ex = int(occ[rank] % examples)
                    top_rows.append(
                        {
                            "job_id": job_id, "query_set": "val", "query": query, "kind": kind, "rank": rank + 1,
                            "score": float(scores[rank]), "row": int(occ[rank]), "step": step,
                            "epoch": int(occ[rank] // examples), "example_id": str(ex), "phase": phase(step),
                            "label": str(ex % 10), "source": "train",
                        }
                    )  # fmt: skip
        totals = rng.normal(size=examples)
        example_rows = [
            {
                "job_id": job_id, "query_set": "val", "example_id": str(i), "total": float(totals[i]),
                "occurrences": 10, "label": str(i % 10), "source": "train",
            }
            for i in range(examples)
        ]  # fmt: skip
        curve_rows = [
            {
                "job_id": job_id, "query_set": "val", "step": s, "lr": 0.01, "mean": float(v),
                "mean_per_lr": float(v) * 100, "abs_sum": abs(float(v)) * 10, "loss": 1.0,
            }
            for s, v in enumerate(rng.normal(size=steps))
        ]  # fmt: skip
        for model, rows in ((TopKRow, top_rows), (ExampleTotal, example_rows), (CurvePoint, curve_rows)):
            for i in range(0, len(rows), 5000):
                conn.execute(insert(model), rows[i : i + 5000])
        conn.execute(insert(PhaseSummaryRow), {"job_id": job_id, "query_set": "val", "summary": phases})
    insert_s = time.perf_counter() - start
    analyzed = False
    if engine.dialect.name == "postgresql":  # what autovacuum does shortly after a worker's bulk insert
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
        analyzed = True
    engine.dispose()
    return {
        "job_id": job_id,
        "topk_rows": len(top_rows),
        "example_totals": len(example_rows),
        "occurrences": 10 * len(example_rows),
        "curve_points": len(curve_rows),
        "insert_seconds": insert_s,
        "analyzed": analyzed,
    }


def api_token(url: str, *, migrate: bool = True) -> str:
    """Migrate the database at ``url`` (unless ``migrate`` is False) and make a bearer token for project
    ``bench``."""
    from sqlalchemy.orm import Session

    from server.db.session import make_engine
    from server.migrate import upgrade
    from server.services.auth import create_token, get_or_create_project

    if migrate:
        upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session:
        token = create_token(session, project=get_or_create_project(session, name="bench"))
        session.commit()
    engine.dispose()
    return token
