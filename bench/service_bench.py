"""Service benchmark: tus upload throughput and memory, and query latency under concurrency.

Run (from the repository root, with PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379)::

    .venv/bin/python -m bench.service_bench

For each database (a throwaway PostgreSQL database, then a SQLite file in a temporary directory)
the API runs as its own process, ``uvicorn server.main:app`` (one process, ``--log-level warning``
as ``dvemb serve`` does), on a schema made by the migrations. No Celery worker runs: the final
PATCH's validation task is sent to Redis db 9 and sits there (db 9 is flushed at the end).

1. Upload: one tus upload of 2 GiB (``shard-r0-000000.safetensors``) in PATCH requests of 256 MiB,
   streamed by httpx from a repeated random 8 MiB block (the client holds one block). Reported:
   end-to-end MB/s (POST to the last PATCH's answer), the API process's resident memory before
   (VmRSS) and its peak during the upload (VmHWM, reset just before through
   ``/proc/PID/clear_refs`` where allowed, and sampled every 20 ms as a cross-check); growth =
   peak - before. Physical limits measured in the same run: 2 GiB written to a file in the same
   storage directory with plain 8 MiB ``write`` calls and an ``fsync`` (the disk), and 2 GiB sent
   over a plain loopback TCP socket to a thread that discards it (the loopback, no HTTP).
2. Queries: a succeeded job is inserted directly into the database for the uploaded run, shaped
   as worker/results_store.py stores results: 100 queries + the whole set (query -1) x 2 kinds x top_k 100
   TopKRow rows (20,200), 100,000 ExampleTotal rows of 10 occurrences each (10^6 occurrences,
   labels "0".."9"), 10,000 curve points and a phase summary. Then 16 client threads, each with
   its own httpx.Client, hit ``/jobs/{id}/top`` (random query, kind harmful, limit 20),
   ``/jobs/{id}/examples`` (random label, kind harmful, limit 20) and ``/health`` (the framework
   floor, the peer in the same run: one ``SELECT 1`` through the same session dependency, no
   auth), interleaved in rounds. Reported: p50, p99, requests/s, and each p50 over health's p50.
   A single client's latency (the service time without queueing) is measured first.

The machine is shared and noisy: read the ratios. Results: a table on stdout,
bench/out/service_bench.json and the "## Service" section of BENCHMARKS.md (``--quick`` uses a
64 MiB upload and short load phases, writes bench/out/service_bench.quick.json and leaves
BENCHMARKS.md alone).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import os
import platform
import random
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# The scaffolding lives in bench/harness.py; these names stay importable from here (other scripts use them).
from bench.harness import OUT as OUT
from bench.harness import PG_ADMIN as PG_ADMIN
from bench.harness import QUIET_PATTERN as QUIET_PATTERN
from bench.harness import ROOT as ROOT
from bench.harness import ApiProcess as ApiProcess
from bench.harness import Postgres as Postgres
from bench.harness import Sqlite as Sqlite
from bench.harness import api_token, save_json
from bench.harness import busy_processes as busy_processes
from bench.harness import cpu_model as cpu_model
from bench.harness import free_port as free_port
from bench.harness import insert_results as insert_results
from bench.harness import loadavg as loadavg
from bench.harness import met as met
from bench.harness import own_cpu_seconds as own_cpu_seconds
from bench.harness import percentile as percentile
from bench.harness import proc_cpu_seconds as proc_cpu_seconds
from bench.harness import proc_status as proc_status
from bench.harness import replace_section as replace_section
from bench.harness import reset_peak as reset_peak
from bench.harness import utc_stamp as utc_stamp
from bench.harness import wait_until_quiet as wait_until_quiet

REDIS_DB = 9
BLOCK = 8 << 20  # bytes per generated block and per disk write
TARGETS = {"upload_mb_s": 200.0, "growth_mb": 100.0, "p50_ms": 50.0, "p99_ms": 200.0}
MB = 1e6  # MB are decimal megabytes throughout (MiB where written MiB)


# ----------------------------------------------------------------------------------------- upload


def byte_blocks(total: int, block: bytes) -> Iterator[bytes]:
    """``total`` bytes as repeats of ``block`` (the same object: no copies)."""
    sent = 0
    while sent < total:
        n = min(len(block), total - sent)
        yield block if n == len(block) else block[:n]
        sent += n


def upload(api: ApiProcess, client: httpx.Client, run_id: int, size: int, patch: int, block: bytes) -> dict[str, Any]:
    """One tus upload of ``size`` bytes in PATCHes of ``patch`` bytes; memory of the API process."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                samples.append(proc_status(api.pid)["VmRSS"])
            time.sleep(0.02)

    before = proc_status(api.pid)
    reset_ok = reset_peak(api.pid)
    hwm_after_reset = proc_status(api.pid)["VmHWM"]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    name = "shard-r0-000000.safetensors"
    tus = {"Tus-Resumable": "1.0.0"}
    start = time.perf_counter()
    created = client.post(
        f"/runs/{run_id}/uploads",
        headers={
            **tus,
            "Upload-Length": str(size),
            "Upload-Metadata": f"filename {base64.b64encode(name.encode()).decode()}",
        },
    )
    created.raise_for_status()
    location = created.headers["Location"]
    offset, patches = 0, []
    while offset < size:
        n = min(patch, size - offset)
        t0 = time.perf_counter()
        r = client.patch(
            location,
            headers={
                **tus,
                "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream",
                "Content-Length": str(n),
            },
            content=byte_blocks(n, block),
        )
        if r.status_code != 204:
            raise RuntimeError(f"PATCH at {offset}: {r.status_code} {r.text[:300]}")
        patches.append(time.perf_counter() - t0)
        offset = int(r.headers["Upload-Offset"])
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    after = proc_status(api.pid)
    run = client.get(f"/runs/{run_id}").json()
    files = {f["name"]: f for f in run["files"]}
    peak = after["VmHWM"] if reset_ok else max([*samples, after["VmRSS"]])
    result = {
        "bytes": size,
        "patch_bytes": patch,
        "seconds": seconds,
        "mb_s": size / MB / seconds,
        "patch_mb_s": [patch / MB / s for s in patches],
        "rss_before_mb": before["VmRSS"] / MB,
        "hwm_before_mb": before["VmHWM"] / MB,
        "hwm_reset": reset_ok,
        "hwm_after_reset_mb": hwm_after_reset / MB,
        "hwm_after_mb": after["VmHWM"] / MB,
        "rss_after_mb": after["VmRSS"] / MB,
        "sampled_peak_mb": max(samples) / MB if samples else None,
        "growth_mb": (peak - before["VmRSS"]) / MB,
        "server_status": files.get(name, {}).get("status"),
        "server_offset": files.get(name, {}).get("offset"),
    }
    client.delete(location, headers=tus).raise_for_status()  # removes the .part file and the row
    return result


def disk_write(directory: Path, size: int, block: bytes) -> dict[str, Any]:
    """Plain 8 MiB writes + fsync into ``directory``: the disk's rate now."""
    path = directory / "disk-probe.bin"
    start = time.perf_counter()
    with path.open("wb") as f:
        for chunk in byte_blocks(size, block):
            f.write(chunk)
        buffered = time.perf_counter() - start
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return {"seconds": seconds, "mb_s": size / MB / seconds, "buffered_mb_s": size / MB / buffered}


def loopback(size: int, block: bytes) -> dict[str, Any]:
    """``size`` bytes over a plain loopback TCP socket to a thread that discards them."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buffer = bytearray(1 << 20)
        with conn:
            while True:
                n = conn.recv_into(buffer)
                if not n:
                    break
                received[0] += n

    thread = threading.Thread(target=sink)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(server.getsockname()) as s:
        for chunk in byte_blocks(size, block):
            s.sendall(chunk)
    thread.join()
    seconds = time.perf_counter() - start
    server.close()
    assert received[0] == size
    return {"seconds": seconds, "mb_s": size / MB / seconds}


def sql_timing(url: str, job_id: int, repeats: int = 30) -> dict[str, Any]:
    """Median ms of each endpoint's own statements (count + page; health: SELECT 1), run directly and
    serially on one connection in this process: the database's share of a request, without the API."""
    from sqlalchemy import text

    from server.db.session import make_engine

    base = {
        "top": f"FROM topk_rows WHERE job_id = {job_id} AND query_set = 'val' AND query = :q AND kind = 'harmful'",
        "examples": f"FROM example_totals WHERE job_id = {job_id} AND query_set = 'val' AND label = :q",
    }
    statements = {
        "health": ["SELECT 1"],
        "top": [f"SELECT count(*) {base['top']}", f"SELECT * {base['top']} ORDER BY rank LIMIT 20 OFFSET 0"],
        "examples": [
            f"SELECT count(*) {base['examples']}",
            f"SELECT * {base['examples']} ORDER BY total ASC, example_id LIMIT 20 OFFSET 0",
        ],
    }
    engine = make_engine(url)
    out: dict[str, Any] = {}
    rng = random.Random(0)
    with engine.connect() as conn:
        for name, sqls in statements.items():
            for i, sql in enumerate(sqls):
                times = []
                for _ in range(repeats):
                    q = rng.randrange(100) if name == "top" else str(rng.randrange(10))
                    t0 = time.perf_counter()
                    conn.execute(text(sql), {"q": q}).all()
                    times.append(time.perf_counter() - t0)
                out[f"{name}_{['count', 'page'][i] if name != 'health' else 'select1'}_ms"] = 1000 * statistics.median(
                    times
                )
            conn.rollback()
    engine.dispose()
    for name in ("top", "examples"):
        out[f"{name}_ms"] = out[f"{name}_count_ms"] + out[f"{name}_page_ms"]
    out["health_ms"] = out["health_select1_ms"]
    return out


# ------------------------------------------------------------------------------------------- load


def load(
    url: str, token: str, path: Callable[[random.Random], str], *, clients: int, seconds: float, seed: int
) -> dict[str, Any]:
    """``clients`` threads, each its own httpx.Client, requesting ``path(rng)`` for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1, timeout=120)
    deadline = [0.0]

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            client.get(path(rng)).raise_for_status()  # connect and warm up, not timed
            barrier.wait()
            own = latencies[i]
            while time.perf_counter() < deadline[0]:
                p = path(rng)
                t0 = time.perf_counter()
                r = client.get(p)
                own.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{p}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + 3600  # until every client is connected
    barrier.wait()
    return {"threads": threads, "latencies": latencies, "errors": errors, "deadline": deadline, "seconds": seconds}


def run_load(
    api: ApiProcess,
    token: str,
    path: Callable[[random.Random], str],
    *,
    clients: int,
    seconds: float,
    seed: int,
    sessions: Callable[[], int | None] = lambda: None,
) -> dict[str, Any]:
    opened = sessions()
    state = load(api.url, token, path, clients=clients, seconds=seconds, seed=seed)
    server_cpu, client_cpu = proc_cpu_seconds(api.pid), own_cpu_seconds()
    start = time.perf_counter()
    state["deadline"][0] = start + seconds
    for t in state["threads"]:
        t.join()
    wall = time.perf_counter() - start
    server_cpu, client_cpu = proc_cpu_seconds(api.pid) - server_cpu, own_cpu_seconds() - client_cpu
    flat = [x for own in state["latencies"] for x in own]
    after = sessions()
    return {
        "new_db_connections": None if opened is None or after is None else after - opened,
        "latencies": flat,
        "wall": wall,
        "errors": state["errors"],
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
    }


def summarize(parts: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for p in parts for x in p["latencies"]]
    wall = sum(p["wall"] for p in parts)
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(ms),
        "wall_s": wall,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "rps": len(ms) / wall if wall else float("nan"),
        "errors": sum(len(p["errors"]) for p in parts),
        "first_errors": [e for p in parts for e in p["errors"]][:3],
        "server_cpu_cores": sum(p["server_cpu_s"] for p in parts) / wall if wall else float("nan"),
        "client_cpu_cores": sum(p["client_cpu_s"] for p in parts) / wall if wall else float("nan"),
        "new_db_connections_per_1000": (
            None
            if any(p["new_db_connections"] is None for p in parts)
            else 1000 * sum(p["new_db_connections"] for p in parts) / max(1, len(ms))
        ),
    }


def query_bench(
    api: ApiProcess, token: str, job_id: int, args: argparse.Namespace, sessions: Callable[[], int | None]
) -> dict[str, Any]:
    endpoints: dict[str, Callable[[random.Random], str]] = {
        "health": lambda rng: "/health",
        "top": lambda rng: f"/jobs/{job_id}/top?query_set=val&kind=harmful&query={rng.randrange(100)}&limit=20",
        "examples": lambda rng: (
            f"/jobs/{job_id}/examples?query_set=val&kind=harmful&label={rng.randrange(10)}&limit=20"
        ),
    }
    with httpx.Client(base_url=f"{api.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        top = c.get(endpoints["top"](random.Random(1))).json()
        ex = c.get(endpoints["examples"](random.Random(1))).json()
    checks = {
        "top_rows": len(top["data"]),
        "top_count": top["count"],
        "examples_rows": len(ex["data"]),
        "examples_count": ex["count"],
    }
    if checks["top_rows"] != 20 or checks["examples_rows"] != 20:
        raise RuntimeError(f"unexpected answers: {checks}")
    serial: dict[str, list[dict[str, Any]]] = {name: [] for name in endpoints}
    concurrent: dict[str, list[dict[str, Any]]] = {name: [] for name in endpoints}
    names = list(endpoints)
    for r in range(args.rounds):  # interleaved rounds, rotating the order
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            serial[name].append(
                run_load(
                    api, token, endpoints[name], clients=1, seconds=args.serial_seconds / args.rounds, seed=r,
                    sessions=sessions,
                )
            )  # fmt: skip
        for name in order:
            concurrent[name].append(
                run_load(
                    api,
                    token,
                    endpoints[name],
                    clients=args.clients,
                    seconds=args.seconds / args.rounds,
                    seed=r,
                    sessions=sessions,
                )
            )
    result = {"checks": checks, "serial": {}, "concurrent": {}}
    for name in names:
        result["serial"][name] = summarize(serial[name])
        result["concurrent"][name] = summarize(concurrent[name])
    for kind in ("serial", "concurrent"):
        floor = result[kind]["health"]["p50_ms"]
        for name in names:
            result[kind][name]["p50_over_health"] = result[kind][name]["p50_ms"] / floor
    return result


# ------------------------------------------------------------------------------------------ driver


def bench_database(db: Postgres | Sqlite, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    storage, data = work / f"storage-{db.name}", work / f"data-{db.name}"
    storage.mkdir()
    data.mkdir()
    db.create()
    token = api_token(db.url)
    env = {
        "DVEMB_DATABASE_URL": db.url,
        "DVEMB_STORAGE_DIR": str(storage),
        "DVEMB_DATA_DIR": str(data),
        "DVEMB_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "DVEMB_VALIDATION_WAIT_SECONDS": "0",
        "DVEMB_MAX_FILE_BYTES": str(max(4 << 30, args.upload_bytes)),
    }
    api = ApiProcess(env)
    result: dict[str, Any] = {"database": db.version(), "url_kind": db.name}
    try:
        with httpx.Client(base_url=f"{api.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
            run = c.post("/runs", json={"name": f"bench-{db.name}"})
            run.raise_for_status()
            run_id = run.json()["id"]
            block = np.random.default_rng(1).integers(0, 256, size=BLOCK, dtype=np.uint8).tobytes()
            os.sync()
            print(f"[{db.name}] upload of {args.upload_bytes / 2**20:.0f} MiB ...", flush=True)
            result["upload"] = upload(api, c, run_id, args.upload_bytes, args.patch_bytes, block)
            print(
                f"[{db.name}]   {result['upload']['mb_s']:.0f} MB/s, growth {result['upload']['growth_mb']:.1f} MB",
                flush=True,
            )
            os.sync()
            result["disk"] = disk_write(storage, args.upload_bytes, block)
            result["loopback"] = loopback(args.upload_bytes, block)
            result["upload"]["over_disk"] = result["upload"]["mb_s"] / result["disk"]["mb_s"]
            result["upload"]["over_loopback"] = result["upload"]["mb_s"] / result["loopback"]["mb_s"]
            print(
                f"[{db.name}]   disk {result['disk']['mb_s']:.0f} MB/s, loopback {result['loopback']['mb_s']:.0f} MB/s",
                flush=True,
            )
        print(f"[{db.name}] inserting results ...", flush=True)
        result["data"] = insert_results(db.url, run_id, queries=100, top_k=100, examples=args.examples, steps=10_000)
        print(f"[{db.name}] query load ...", flush=True)
        result["sql"] = sql_timing(db.url, result["data"]["job_id"])
        result["queries"] = query_bench(api, token, result["data"]["job_id"], args, db.sessions)
        result["api_rss_end_mb"] = proc_status(api.pid)["VmRSS"] / MB
    finally:
        log = api.output()
        api.stop()
        if log.strip():
            result["server_log_tail"] = log[-2000:]
    return result


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, bool]]:
    out = {}
    for name, r in results["databases"].items():
        q = r["queries"]["concurrent"]
        out[name] = {
            "upload_mb_s": r["upload"]["mb_s"] >= TARGETS["upload_mb_s"],
            "growth_mb": r["upload"]["growth_mb"] < TARGETS["growth_mb"],
            "top_p50": q["top"]["p50_ms"] < TARGETS["p50_ms"],
            "top_p99": q["top"]["p99_ms"] < TARGETS["p99_ms"],
            "examples_p50": q["examples"]["p50_ms"] < TARGETS["p50_ms"],
            "examples_p99": q["examples"]["p99_ms"] < TARGETS["p99_ms"],
        }
    return out


def tables(results: dict[str, Any]) -> str:
    lines = [
        "| database | upload MB/s | disk write+fsync MB/s | upload / disk | loopback socket MB/s | upload / loopback | API RSS before MB | API peak MB | growth MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["databases"].items():
        u, d, lo = r["upload"], r["disk"], r["loopback"]
        peak = u["hwm_after_mb"] if u["hwm_reset"] else u["sampled_peak_mb"]
        lines.append(
            f"| {name} | {u['mb_s']:.0f} | {d['mb_s']:.0f} | {u['over_disk']:.2f}x | {lo['mb_s']:.0f} | "
            f"{u['over_loopback']:.2f}x | {u['rss_before_mb']:.1f} | {peak:.1f} | {u['growth_mb']:.1f} |"
        )
    lines += [
        "",
        "| database | endpoint | clients | requests | req/s | p50 ms | p99 ms | p50 / health p50 | API CPU cores | client CPU cores | new DB connections per 1000 requests | endpoint's own SQL, ms (direct, serial) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["databases"].items():
        for kind, clients in (("concurrent", results["meta"]["clients"]), ("serial", 1)):
            for endpoint, s in r["queries"][kind].items():
                lines.append(
                    f"| {name} | {endpoint} | {clients} | {s['requests']:,} | {s['rps']:.0f} | {s['p50_ms']:.1f} | "
                    f"{s['p99_ms']:.1f} | {s['p50_over_health']:.2f}x | {s['server_cpu_cores']:.2f} | {s['client_cpu_cores']:.2f} | "
                    f"{'-' if s['new_db_connections_per_1000'] is None else format(s['new_db_connections_per_1000'], '.0f')} | "
                    f"{r['sql'][endpoint + '_ms']:.2f} |" + (f" ({s['errors']} errors)" if s["errors"] else "")
                )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    quiet = m["quiet"]
    if quiet.get("skipped"):
        quiet_line = "The wait for a quiet machine was skipped."
    elif quiet["gave_up"]:
        quiet_line = (
            f"Other benchmarks or tests were still running after waiting {quiet['waited_s'] // 60} min "
            f"({len(quiet['busy_at_end'])} matching processes): the run went ahead on a busy machine."
        )
    else:
        quiet_line = f"It started once no other benchmark or test run was found (waited {quiet['waited_s']} s)."
    parts = [
        "## Service",
        "",
        f"Command: `{m['command']}` on {m['date']} ({m['duration_s']:.0f} s), on {m['cpus']} CPU cores "
        f"({m['cpu']}), loopback, the API as one uvicorn process (`uvicorn server.main:app --log-level warning`, "
        f"h11 and asyncio: {m['http_impl']}), Python {m['python']}, FastAPI {m['fastapi']}, uvicorn {m['uvicorn']}, "
        f"SQLAlchemy {m['sqlalchemy']}, httpx {m['httpx']}; {results['databases'].get('postgres', {}).get('database', '')}, "
        f"{results['databases'].get('sqlite', {}).get('database', '')}. Load average (1 min) {m['load_before']:.2f} before and "
        f"{m['load_after']:.2f} after. {quiet_line} The client runs on the same 2 cores as the API and the database: "
        "the machine is shared and noisy, and the ratios are what to read.",
        "",
        f"Upload: one tus upload of {m['upload_bytes'] / 2**30:g} GiB (`shard-r0-000000.safetensors`) in PATCH requests of "
        f"{m['patch_bytes'] / 2**20:g} MiB, streamed by httpx from a repeated random 8 MiB block; MB/s end to end (POST to the "
        "last PATCH's answer, MB = 10^6 bytes). Growth = the API process's peak resident memory during the upload "
        "(VmHWM, reset through /proc/PID/clear_refs just before) minus its VmRSS before. Physical limits in the same run: "
        "the same bytes written to a file in the same storage directory with plain 8 MiB writes and an fsync (the API "
        "does not fsync), and sent over a plain loopback TCP socket to a thread that discards them (no HTTP, no disk).",
        "",
        f"Queries: a succeeded job inserted directly into the database as worker/results_store.py stores results: 100 queries "
        f"+ the whole set x 2 kinds x top_k 100 = {m['topk_rows']:,} top-k rows, {m['examples']:,} example totals of 10 "
        f"occurrences each ({10 * m['examples']:,} occurrences, labels 0-9), 10,000 curve points (Postgres: ANALYZE "
        f"after the insert, as autovacuum would; SQLite: nothing, as the app does nothing). "
        f"{m['clients']} client threads, each with its own httpx.Client and the bearer token, on "
        "`/jobs/{id}/top?query_set=val&kind=harmful&query=<random 0-99>&limit=20`, "
        "`/jobs/{id}/examples?query_set=val&kind=harmful&label=<random 0-9>&limit=20`, and `/health` (no auth, one "
        f"`SELECT 1` through the same session dependency: the framework floor, the peer). {m['rounds']} interleaved rounds, "
        f"{m['seconds']:g} s per endpoint in all with {m['clients']} clients and {m['serial_seconds']:g} s with 1 client "
        "(the service time without queueing). CPU cores = CPU seconds of the API process (or of the client process) / wall seconds.",
        "",
        tables(results),
        "",
        f"Targets (from the issue): upload at least {TARGETS['upload_mb_s']:.0f} MB/s and under {TARGETS['growth_mb']:.0f} MB "
        f"growth during a 2 GB upload; top-k latency with {m['clients']} concurrent clients p50 under {TARGETS['p50_ms']:.0f} ms "
        f"and p99 under {TARGETS['p99_ms']:.0f} ms, on Postgres and on SQLite.",
        "",
    ]
    for name, v in results["verdicts"].items():
        r = results["databases"][name]
        q = r["queries"]["concurrent"]
        parts.append(
            f"- {name}: upload {r['upload']['mb_s']:.0f} MB/s {met(v['upload_mb_s'])} ({r['upload']['over_disk']:.2f}x the disk, "
            f"{r['upload']['over_loopback']:.2f}x the loopback socket); growth {r['upload']['growth_mb']:.1f} MB {met(v['growth_mb'])}; "
            f"top p50 {q['top']['p50_ms']:.1f} ms {met(v['top_p50'])}, p99 {q['top']['p99_ms']:.1f} ms {met(v['top_p99'])} "
            f"({q['top']['p50_over_health']:.2f}x health's p50); examples (same thresholds, not in the issue) p50 "
            f"{q['examples']['p50_ms']:.1f} ms, p99 {q['examples']['p99_ms']:.1f} ms ({q['examples']['p50_over_health']:.2f}x health)."
        )
    c = m["clients"]
    floors = ", ".join(
        f"{name} {r['queries']['concurrent']['health']['rps']:.0f} req/s ({1000 * c / r['queries']['concurrent']['health']['rps']:.0f} ms)"
        for name, r in results["databases"].items()
    )
    parts.append(
        f"- Queueing: {c} clients in a closed loop keep {c} requests in the API, so their mean latency is {c} / throughput "
        f"(Little's law); a mean under {TARGETS['p50_ms']:.0f} ms needs over {1000 * c / TARGETS['p50_ms']:.0f} requests/s from "
        f"one process that uses about one core (the GIL). The framework floor, /health, reaches {floors} in this run."
    )
    notes = results.get("notes") or []
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def write_markdown(section: str) -> None:
    replace_section("Service", section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB upload, short load; leaves BENCHMARKS.md alone")
    parser.add_argument("--databases", default="postgres,sqlite")
    parser.add_argument("--upload-mib", type=int, default=2048)
    parser.add_argument("--patch-mib", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of concurrent load per endpoint")
    parser.add_argument("--serial-seconds", type=float, default=3.0, help="seconds of single-client load per endpoint")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--wait-quiet-minutes", type=float, default=15.0)
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a line added under the section's verdicts")
    args = parser.parse_args()
    if args.quick:
        args.upload_mib, args.patch_mib, args.seconds, args.serial_seconds = 64, 16, 2.0, 1.0
        args.wait_quiet_minutes = 0
    args.upload_bytes, args.patch_bytes = args.upload_mib << 20, args.patch_mib << 20

    import fastapi
    import redis
    import sqlalchemy
    import uvicorn

    quiet = wait_until_quiet(args.wait_quiet_minutes) if args.wait_quiet_minutes > 0 else {"skipped": True}
    found = [m for m in ("httptools", "uvloop") if importlib.util.find_spec(m) is not None]
    http_impl = f"{' and '.join(found)} installed" if found else "neither httptools nor uvloop is installed"
    started = time.time()
    meta = {
        "command": ".venv/bin/python -m bench.service_bench" + (" --quick" if args.quick else ""),
        "date": utc_stamp(),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "httpx": httpx.__version__,
        "http_impl": http_impl,
        "load_before": loadavg(),
        "quiet": quiet,
        "upload_bytes": args.upload_bytes,
        "patch_bytes": args.patch_bytes,
        "clients": args.clients,
        "seconds": args.seconds,
        "serial_seconds": args.serial_seconds,
        "rounds": args.rounds,
        "examples": args.examples,
        "topk_rows": 101 * 2 * 100,
        "quick": args.quick,
    }
    results: dict[str, Any] = {"meta": meta, "databases": {}, "notes": args.note}
    work = Path(tempfile.mkdtemp(prefix="dvemb-service-bench-"))
    r = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        for name in args.databases.split(","):
            db: Postgres | Sqlite = Postgres() if name == "postgres" else Sqlite(work)
            try:
                results["databases"][name] = bench_database(db, args, work)
            finally:
                db.drop()
    finally:
        r.flushdb()
        shutil.rmtree(work, ignore_errors=True)
    meta["load_after"] = loadavg()
    meta["duration_s"] = time.time() - started
    results["verdicts"] = verdicts(results)
    text = tables(results)
    print()
    print(text)
    print()
    for name, v in results["verdicts"].items():
        print(name, {k: ("met" if ok else "NOT met") for k, ok in v.items()})
    out = save_json("service_bench.quick.json" if args.quick else "service_bench.json", results, indent=2)
    print(f"wrote {out.relative_to(ROOT)}")
    if not args.quick and not args.no_markdown:
        write_markdown(markdown(results))
        print("wrote the '## Service' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
