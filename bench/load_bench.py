"""Service under mixed load: latency of every endpoint while the worker computes and uploads arrive, then
again with 40 stalled clients holding requests open.

Run (from the repository root, with PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379)::

    .venv/bin/python -m bench.load_bench            # 60 s per phase
    .venv/bin/python -m bench.load_bench --quick    # 10 s per phase, leaves BENCHMARKS.md alone

Set-up: a throwaway PostgreSQL database made by the migrations, Redis db 11 as the broker (flushed at the
start and the end), the API as one ``uvicorn server.main:app`` process (bench/harness.py's
ApiProcess), and real Celery workers (``server.tasks.worker_command``): one on the ``gpu`` queue that
computes analyses, one on the ``celery`` queue that validates uploads (with a single worker on both
queues, a running compute would hold every upload's validation behind it). A small real log (the
service tests' ``record_log``) is uploaded into a run that becomes ready; a succeeded job with aggregate
rows (bench/harness.py's ``insert_results``) is inserted directly for the top-k reads. Before the
window, jobs are started on the ready run so the compute worker is busy all along; clients keep
starting more.

Phase 1 ("mixed"): 16 client threads for ``--seconds``, each picking at random per request: top-k read
(``/jobs/{id}/top``, 55 %), ``GET /health`` (20 %), a small log upload through
``dvemb.client.upload_log`` into a new run (15 %, analyze on every fourth of them; latency = the whole
call, validation included), a job start ``POST /runs/{id}/jobs`` (10 %).

Phase 2 ("mixed + 40 stalled"): the same, while one more thread holds 40 raw sockets open: 20 send
the headers of a tus PATCH (Content-Length 8 MiB) and 20 the headers of ``POST /runs`` with a 1 MB JSON
body, each then sends one byte every 5 s; a socket the server closes is opened again.

Errors = transport errors or answers other than 2xx (202 and 409 are not errors); an upload is an
error when ``upload_log`` raises or the run does not end ready.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    ROOT,
    ApiProcess,
    CeleryWorker,
    Postgres,
    api_token,
    cpu_model,
    insert_results,
    loadavg,
    met,
    percentile,
    replace_section,
    save_json,
    utc_stamp,
)

SECTION = "Service under mixed load"
REDIS_DB = 11
STALLED = 40
CLIENTS = 16
WEIGHTS = {"top": 0.55, "health": 0.20, "upload": 0.15, "job_start": 0.10}
TARGETS = {"errors": 0, "health_p99_ms": 50.0}
OK_STATUSES = {202, 409}
KEEPALIVE_S = 4.0  # the clients drop idle connections before uvicorn does (--timeout-keep-alive 5 s)


#: the Celery worker process (the shared one, bench/harness.py); the name stays importable from here
Worker = CeleryWorker


def fix_summary(engine: Any, job_id: int) -> None:
    """insert_results writes an older summary shape: add the fields dvemb.formats.Summary now requires."""
    from sqlalchemy import select, update

    from server.db.models import Job

    with engine.begin() as conn:
        summary = dict(conn.execute(select(Job.summary).where(Job.id == job_id)).scalar_one())
        summary.setdefault("examples", summary.get("num_examples", 0))
        summary.setdefault("occurrences", 10 * summary["examples"])
        conn.execute(update(Job).where(Job.id == job_id).values(summary=summary))


class _Discard(io.TextIOBase):
    """stderr during the load: upload_log's progress bars from 16 threads would flood the terminal."""

    def write(self, s: str) -> int:
        return len(s)


def record_small_log(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "service"))
    from service_harness import record_log

    return record_log(directory)


# -------------------------------------------------------------------------------------------- load


class Mix:
    """16 client threads picking endpoints at random until ``stop`` is set."""

    def __init__(self, url: str, token: str, *, top_job: int, ready_run: int, log_dir: Path, work: Path) -> None:
        self.url, self.token, self.top_job, self.ready_run = url, token, top_job, ready_run
        self.log_dir, self.work = log_dir, work
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.samples: dict[str, list[float]] = {k: [] for k in WEIGHTS}
        self.errors: dict[str, list[str]] = {k: [] for k in WEIGHTS}
        self.uploads = 0

    def record(self, name: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.samples[name].append(seconds)
            if error:
                self.errors[name].append(error)

    def client(self, i: int, phase: str) -> None:
        from dvemb.client.upload import upload_log

        rng = random.Random(f"{phase}-{i}")
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        own_log = self.work / f"log-{phase}-{i}"
        shutil.copytree(self.log_dir, own_log)
        headers = {"Authorization": f"Bearer {self.token}"}
        limits = httpx.Limits(keepalive_expiry=KEEPALIVE_S)
        with httpx.Client(base_url=f"{self.url}/api/v1", headers=headers, timeout=60, limits=limits) as c:
            while not self.stop.is_set():
                name = rng.choices(names, weights)[0]
                error = None
                t0 = time.perf_counter()
                try:
                    if name == "upload":
                        with self.lock:
                            self.uploads += 1
                            n = self.uploads
                        out = upload_log(
                            own_log, server=self.url, token=self.token, run_name=f"load-{phase}-{i}-{n}",
                            analyze=n % 4 == 0,
                        )  # fmt: skip
                        if out["status"] != "ready" or out["rejected"]:
                            error = f"upload: {out['status']} {out['rejected']}"
                    else:
                        if name == "top":
                            q = rng.randrange(100)
                            r = c.get(f"/jobs/{self.top_job}/top?query_set=val&kind=harmful&query={q}&limit=20")
                        elif name == "health":
                            r = c.get("/health")
                        else:
                            r = c.post(f"/runs/{self.ready_run}/jobs", json={})
                        if not (200 <= r.status_code < 300 or r.status_code in OK_STATUSES):
                            error = f"{name}: {r.status_code} {r.text[:200]}"
                except Exception as exc:  # every failure is counted, the load goes on
                    error = f"{name}: {type(exc).__name__}: {str(exc)[:200]}"
                self.record(name, time.perf_counter() - t0, error)

    def run(self, seconds: float, phase: str) -> dict[str, Any]:
        self.stop.clear()
        self.samples = {k: [] for k in WEIGHTS}
        self.errors = {k: [] for k in WEIGHTS}
        threads = [threading.Thread(target=self.client, args=(i, phase), daemon=True) for i in range(CLIENTS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        self.stop.wait(seconds)
        self.stop.set()
        for t in threads:
            t.join(120)
        wall = time.perf_counter() - start
        out: dict[str, Any] = {"wall_s": wall, "endpoints": {}}
        for name in WEIGHTS:
            ms = [x * 1000 for x in self.samples[name]]
            out["endpoints"][name] = {
                "requests": len(ms),
                "p50_ms": percentile(ms, 50),
                "p99_ms": percentile(ms, 99),
                "min_ms": min(ms) if ms else float("nan"),
                "max_ms": max(ms) if ms else float("nan"),
                "in_flight": sum(self.samples[name]) / wall,  # mean requests open (Little's law)
                "errors": len(self.errors[name]),
                "first_errors": self.errors[name][:3],
            }
        return out


class Stalled:
    """``count`` raw sockets holding slow requests open (half tus PATCH, half POST /runs), one byte per 5 s."""

    def __init__(self, url: str, token: str, count: int) -> None:
        self.host, self.port = url.removeprefix("http://").split(":")
        self.token, self.count = token, count
        self.api = httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.sockets: list[socket.socket | None] = [None] * count
        self.stop = threading.Event()
        self.opened = 0
        self.reopened = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self.hold, daemon=True)

    def request_head(self, i: int) -> bytes:
        auth = f"Authorization: Bearer {self.token}\r\nHost: {self.host}:{self.port}\r\n"
        if i % 2 == 0:
            run = self.api.post("/runs", json={"name": f"stall-{i}-{time.monotonic_ns()}"}).json()["id"]
            name = base64.b64encode(b"shard-r0-000000.safetensors").decode()
            created = self.api.post(
                f"/runs/{run}/uploads",
                headers={
                    "Tus-Resumable": "1.0.0",
                    "Upload-Length": str(8 << 20),
                    "Upload-Metadata": f"filename {name}",
                },
            )
            created.raise_for_status()
            path = httpx.URL(created.headers["Location"]).path
            return (
                f"PATCH {path} HTTP/1.1\r\n{auth}Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
                f"Content-Type: application/offset+octet-stream\r\nContent-Length: {8 << 20}\r\n\r\n"
            ).encode()
        return (
            f"POST /api/v1/runs HTTP/1.1\r\n{auth}Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        ).encode() + b'{"name": "'

    def open(self, i: int) -> None:
        s = socket.create_connection((self.host, int(self.port)), timeout=10)
        s.sendall(self.request_head(i))
        s.setblocking(False)
        self.sockets[i] = s
        self.opened += 1

    def hold(self) -> None:
        while not self.stop.is_set():
            for i, s in enumerate(self.sockets):
                if self.stop.is_set():
                    break
                try:
                    if s is not None:
                        try:
                            if s.recv(65536) == b"":
                                raise ConnectionError("closed by the server")
                        except BlockingIOError:
                            pass
                        s.send(b"a" if i % 2 else b"\0")
                        continue
                except OSError:
                    s.close()
                    self.sockets[i] = None
                    self.reopened += 1
                try:
                    self.open(i)
                except Exception as exc:
                    self.failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            self.stop.wait(5.0)

    def start(self) -> None:
        for i in range(self.count):
            self.open(i)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(30)
        for i, s in enumerate(self.sockets):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
                self.sockets[i] = None
        self.api.close()


# ------------------------------------------------------------------------------------------ driver


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from dvemb.client.upload import upload_log
    from server.db.models import Job
    from server.db.session import make_engine

    db = Postgres()
    api: ApiProcess | None = None
    stalled: Stalled | None = None
    workers_list: list[Worker] = []
    result: dict[str, Any] = {"database": None}
    try:
        db.create()
        result["database"] = db.version()
        token = api_token(db.url)
        engine = make_engine(db.url)
        (work / "storage").mkdir()
        (work / "data").mkdir()
        env = {
            "DVEMB_DATABASE_URL": db.url,
            "DVEMB_STORAGE_DIR": str(work / "storage"),
            "DVEMB_DATA_DIR": str(work / "data"),
            "DVEMB_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "DVEMB_VALIDATION_WAIT_SECONDS": "30",
        }
        api = ApiProcess(env)
        workers_list.append(Worker(env, "gpu"))
        workers_list.append(Worker(env, "celery"))
        log_dir = record_small_log(work / "log")
        print("uploading the ready run ...", flush=True)
        t0 = time.perf_counter()
        ready = upload_log(log_dir, server=api.url, token=token, run_name="ready")
        result["idle_upload_ms"] = 1000 * (time.perf_counter() - t0)
        if ready["status"] != "ready":
            raise RuntimeError(f"the setup upload did not become ready: {ready}")
        print("inserting a succeeded job's rows ...", flush=True)
        data = insert_results(db.url, ready["run"], queries=100, top_k=100, examples=args.examples, steps=2_000)
        fix_summary(engine, data["job_id"])
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"{api.url}/api/v1", headers=headers, timeout=60) as c:
            for _ in range(8):  # a backlog: the compute worker is busy from the start
                c.post(f"/runs/{ready['run']}/jobs", json={}).raise_for_status()
        mix = Mix(api.url, token, top_job=data["job_id"], ready_run=ready["run"], log_dir=log_dir, work=work)

        def jobs_done() -> int:
            with Session(engine) as session:
                return int(session.scalar(select(func.count()).select_from(Job).where(Job.status == "succeeded")) or 0)

        phases: dict[str, Any] = {}
        for phase in ("mixed", "stalled"):
            if phase == "stalled":
                stalled = Stalled(api.url, token, STALLED)
                stalled.start()
            print(f"phase {phase}: {args.seconds:g} s ...", flush=True)
            done, cpu0 = jobs_done(), os.times()
            stderr, sys.stderr = sys.stderr, _Discard()
            try:
                out = mix.run(args.seconds, phase)
            finally:
                sys.stderr = stderr
            out["jobs_finished"] = jobs_done() - done
            out["load_1min"] = loadavg()
            out["client_cpu_cores"] = (os.times().user + os.times().system - cpu0.user - cpu0.system) / out["wall_s"]
            if stalled is not None:
                out["stalled"] = {
                    "held": sum(s is not None for s in stalled.sockets),
                    "opened": stalled.opened,
                    "reopened": stalled.reopened,
                    "open_failures": len(stalled.failures),
                    "first_failures": stalled.failures[:3],
                }
                stalled.close()
                stalled = None
            phases[phase] = out
            print(json.dumps({k: v for k, v in out.items() if k != "endpoints"}), flush=True)
            for name, s in out["endpoints"].items():
                print(
                    f"  {name:9s} n={s['requests']:6d} in flight={s['in_flight']:5.1f} p50={s['p50_ms']:8.1f} p99={s['p99_ms']:8.1f} err={s['errors']}"
                )
        result["phases"] = phases
        result["compute_worker_alive"] = workers_list[0].process.poll() is None
        engine.dispose()
    finally:
        if stalled is not None:
            stalled.close()
        if api is not None:
            result["api_log_tail"] = api.output()[-1500:]
            api.stop()
        for w in workers_list:
            w.stop()
        db.drop()
    return result


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        f"## {SECTION}",
        "",
        f"Command: `{m['command']}` on {m['date']} ({m['duration_s']:.0f} s in all), on {m['cpus']} CPU cores "
        f"({m['cpu']}), Python {m['python']}, {results['database']}, Redis on loopback. The API is one uvicorn process, "
        "with two Celery worker processes (one on the `gpu` queue computing the backlog of analyses, one on the "
        "`celery` queue validating uploads); client threads, API, workers and database share the same cores. "
        f"{CLIENTS} client threads for {m['seconds']:g} s per phase, each request picked at random: top-k read "
        "(`/jobs/{id}/top`, limit 20, 20,200 top-k rows; 55 %), `GET /health` (20 %), a small real log uploaded with "
        "`dvemb.client.upload_log` into a new run (15 %; analyze on every fourth; latency = the whole call, validation "
        "included), a job start `POST /runs/{id}/jobs` (10 %). Phase 2 adds one client holding "
        f"{STALLED} raw sockets open: 20 tus PATCH headers (Content-Length 8 MiB) and 20 `POST /runs` headers "
        "(Content-Length 1 MB), each sending one byte every 5 s, reopened when the server closes them. Each client "
        f"keeps idle connections {KEEPALIVE_S:g} s (under uvicorn's 5 s keep-alive timeout). Errors = "
        "transport errors or answers other than 2xx, 202 or 409; an upload whose run does not end ready.",
        "",
        "| phase | endpoint | requests | mean in flight | p50 ms | p99 ms | max ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, out in results["phases"].items():
        for name, s in out["endpoints"].items():
            lines.append(
                f"| {phase} | {name} | {s['requests']:,} | {s['in_flight']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.0f} | "
                f"{s['errors']} |"
            )
    lines += ["", "| phase | compute jobs finished | load (1 min) at end | stalled sockets held at end / reopened |"]
    lines += ["|---|---:|---:|---|"]
    for phase, out in results["phases"].items():
        st = out.get("stalled")
        held = f"{st['held']} / {st['reopened']}" if st else "-"
        lines.append(f"| {phase} | {out['jobs_finished']} | {out['load_1min']:.2f} | {held} |")
    lines += [
        "",
        "Mean in flight = the sum of an endpoint's latencies over the window's wall time: how many of the 16 clients "
        "were in that endpoint on average. Uploads last seconds, so most clients are inside an upload at any time, "
        "so they hold about 15 of the 16 clients; their latency is bounded by validation (one validator process, every "
        "file of every upload validated in turn) and the 2 shared cores, not separated here.",
    ]
    lines += [
        "",
        f"The same upload with no other load (the set-up's, before the window): {results['idle_upload_ms']:.0f} ms.",
    ]
    lines += ["", f"Targets: zero errors, `/health` p99 under {TARGETS['health_p99_ms']:.0f} ms, in both phases.", ""]
    for phase, v in results["verdicts"].items():
        out = results["phases"][phase]
        errors = sum(s["errors"] for s in out["endpoints"].values())
        lines.append(
            f"- {phase}: errors {errors} {met(v['errors'])}; /health p99 "
            f"{out['endpoints']['health']['p99_ms']:.1f} ms {met(v['health_p99'])}."
        )
    for note in results.get("notes") or []:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--quick", action="store_true", help="10 s per phase; leaves BENCHMARKS.md alone")
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a line added under the verdicts")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 10.0
    import redis

    command = ".venv/bin/python -m bench.load_bench" + (" --quick" if args.quick else "")
    if not args.quick and args.seconds != 60.0:
        command += f" --seconds {args.seconds:g}"
    meta = {
        "command": command,
        "date": utc_stamp(),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "seconds": args.seconds,
        "load_before": loadavg(),
    }
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="dvemb-load-bench-"))
    r = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    r.flushdb()
    try:
        results = bench(args, work)
    finally:
        r.flushdb()
        r.close()
        shutil.rmtree(work, ignore_errors=True)
    meta["duration_s"] = time.time() - started
    results["meta"] = meta
    results["notes"] = args.note
    results["verdicts"] = {
        phase: {
            "errors": sum(s["errors"] for s in out["endpoints"].values()) == TARGETS["errors"],
            "health_p99": out["endpoints"]["health"]["p99_ms"] < TARGETS["health_p99_ms"],
        }
        for phase, out in results["phases"].items()
    }
    out = save_json("load_bench.quick.json" if args.quick else "load_bench.json", results, indent=2)
    print(f"wrote {out.relative_to(ROOT)}")
    text = markdown(results)
    print(text)
    if not args.quick and not args.no_markdown:
        replace_section(SECTION, text)
        print(f"wrote the '## {SECTION}' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
