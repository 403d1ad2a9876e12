"""Engine memory: peak memory of ``dvemb compute`` against the run's length, and bytes on disk per occurrence.

Run:

    .venv/bin/python -m bench.engine_memory            # 1k, 10k, 100k steps
    .venv/bin/python -m bench.engine_memory --steps 1000 10000 --no-old

Synthetic logs (4 layers of projected size 64, batch 8, random gradients, one query set of 16) are
written with dvemb's real writer: one with a fixed data set of 2,000 examples reused every epoch
(250 steps per epoch), one where every example is new. Each ``dvemb compute`` runs in its own
process; a sampler reads ``/proc`` of that process and its children every 20 ms and keeps the peak of
their summed resident memory, split into anonymous memory (heap: what the engine allocates) and
file-backed pages (the memory-mapped result and scratch files, and the libraries: the kernel can
drop them at any time, they are page cache counted in RSS). The previous engine (commit
:data:`OLD_COMMIT`, before the occurrence table, totals and per-step arrays were memory-mapped)
runs in a git worktree of that commit on a log written by its own writer with the same seed (the log
format has moved on since), so every ratio is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PYTHON = sys.executable
#: The engine before issue 14 (occurrence index, per-example totals and curves in memory).
OLD_COMMIT = "28e449c"
DIMS = [64, 64, 64, 64]
BATCH = 8
DATASET = 2000
QUERIES = 16
SAMPLE_S = 0.02


# -- synthetic logs (imports dvemb lazily: also runs against the old commit's writer) -----------------


def write_log(directory: str, steps: int, unique: bool, seed: int = 0) -> None:
    """A synthetic log of ``steps`` steps written with the ``dvemb.writer`` found on ``sys.path``.

    Args:
        directory: the log directory (created).
        steps: number of steps.
        unique: every example used once (ids ``0..steps*B-1``) instead of a reused data set of
            :data:`DATASET` examples in a new random order every epoch.
        seed: of the gradients and the order.
    """
    import torch

    from dvemb.writer import LogWriter, StepRecord

    layers = [
        {
            "name": f"l{i}",
            "kind": "linear",
            "out_dim": d,
            "in_dim": 1,
            "k_out": d,
            "k_in": 1,
            "seed_out": 0,
            "seed_in": 1,
            "has_bias": False,
            "parameters": d,
        }
        for i, d in enumerate(DIMS)
    ]
    manifest = {
        "world_size": 1,
        "loss_reduction": "mean",
        "layers": layers,
        "curvature": {"mode": "empirical", "samples": None, "rows_per_example": None},
        "optimizer": {"type": "SGD", "exact_sgd": True},
    }
    writer = LogWriter(directory, manifest, shard_bytes=64 << 20)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = DATASET // BATCH
    order = torch.zeros(0, dtype=torch.int64)
    for step in range(steps):
        if unique:
            ids = list(range(step * BATCH, (step + 1) * BATCH))
        else:
            if step % per_epoch == 0:
                order = torch.randperm(DATASET, generator=generator)
            position = (step % per_epoch) * BATCH
            ids = order[position : position + BATCH].tolist()
        grads = {f"l{i}": torch.randn(BATCH, d, generator=generator) / d**0.5 for i, d in enumerate(DIMS)}
        writer.accept_step(StepRecord(step, ids, [0.05] * len(DIMS), [0.0] * len(DIMS), 1.0, grads))
        writer.flush_if_full()
    queries = {f"grad.l{i}": torch.randn(QUERIES, d, generator=generator) for i, d in enumerate(DIMS)}
    queries.update(example_id=torch.arange(QUERIES), loss=torch.zeros(QUERIES, dtype=torch.float64))
    writer.write_query_set("val", queries, {"num_queries": QUERIES, "step": steps, "texts": None})
    writer.close()


def _python_with(root: Path, code: str) -> list[str]:
    """A Python command running ``code`` with ``root``'s dvemb first on the path."""
    return [PYTHON, "-c", f"import sys; sys.path[:0] = [{str(root)!r}]; " + code]


def _write_command(root: Path, log: Path, steps: int, unique: bool) -> list[str]:
    """Write a log with ``root``'s writer (this file loaded by path: ``root`` may have no such module)."""
    code = (
        "import importlib.util as u; "
        f"spec = u.spec_from_file_location('engine_memory', {__file__!r}); m = u.module_from_spec(spec); "
        f"spec.loader.exec_module(m); m.write_log({str(log)!r}, {steps}, {unique})"
    )
    return _python_with(root, code)


# -- peak memory of a process tree ------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def measure(
    command: list[str], env: dict[str, str] | None = None, samples: list[tuple[float, int, int]] | None = None
) -> dict[str, float]:
    """Run ``command``; its wall time and the peaks of its process tree's summed memory (MB). ``samples``, if
    given, receives every sample as (``time.time()``, anonymous kB, file-backed kB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0, "anon": 0, "file": 0, "hwm": 0, "processes": 0}
    while process.poll() is None:
        tree = _children()
        pids, frontier = [process.pid], [process.pid]
        while frontier:
            frontier = [c for p in frontier for c in tree.get(p, [])]
            pids += frontier
        stats = [_status_kb(p) for p in pids]
        peak["rss"] = max(peak["rss"], sum(s.get("VmRSS", 0) for s in stats))
        peak["anon"] = max(peak["anon"], sum(s.get("RssAnon", 0) for s in stats))
        peak["file"] = max(peak["file"], sum(s.get("RssFile", 0) + s.get("RssShmem", 0) for s in stats))
        peak["hwm"] = max(peak["hwm"], max((s.get("VmHWM", 0) for s in stats), default=0))
        peak["processes"] = max(peak["processes"], len([s for s in stats if s]))
        if samples is not None:
            anon = sum(s.get("RssAnon", 0) for s in stats)
            samples.append((time.time(), anon, sum(s.get("RssFile", 0) + s.get("RssShmem", 0) for s in stats)))
        time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - start
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {stderr[-2000:]}")
    return {
        "seconds": seconds,
        "peak_rss_mb": peak["rss"] / 1024,
        "peak_anon_mb": peak["anon"] / 1024,
        "peak_file_mb": peak["file"] / 1024,
        "peak_process_hwm_mb": peak["hwm"] / 1024,
        "processes": peak["processes"],
    }


def _compute_command(root: Path, log: Path, out: Path, extra: list[str]) -> list[str]:
    argv = ["compute", str(log), "--out", str(out), "--quiet", *extra]
    return _python_with(root, f"from dvemb.cli import main; sys.exit(main({argv!r}))")


def _file_sizes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}


def _old_worktree(directory: Path) -> Path:
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(directory), OLD_COMMIT], cwd=ROOT, check=True, capture_output=True
    )
    return directory


# -- the benchmark ----------------------------------------------------------------------------------


CONFIGS = {
    "sequential": [],
    "segments 4, workers 2": ["--segments", "4", "--workers", "2"],
}


def run(steps_list: list[int], old: bool, work: Path, old_max_steps: int) -> dict[str, Any]:
    old_root = _old_worktree(work / "old") if old else None
    rows: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    try:
        for unique in (False, True):
            for steps in steps_list:
                kind = "unique" if unique else "reused"
                log = work / f"log-{kind}-{steps}"
                started = time.perf_counter()
                subprocess.run(_write_command(ROOT, log, steps, unique), cwd=ROOT, check=True)
                write_s = time.perf_counter() - started
                runs: list[tuple[str, Path, list[str], Path]] = [
                    (name, ROOT, extra, log) for name, extra in CONFIGS.items()
                ]
                if old_root is not None and steps <= old_max_steps:
                    old_log = work / f"oldlog-{kind}-{steps}"
                    subprocess.run(_write_command(old_root, old_log, steps, unique), cwd=ROOT, check=True)
                    runs.append((f"previous engine ({OLD_COMMIT})", old_root, [], old_log))
                reference = work / "out-sequential"
                for name, root, extra, log_dir in runs:
                    out = reference if name == "sequential" else work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    result = measure(_compute_command(root, log_dir, out, extra))
                    files = _file_sizes(out)
                    summary = json.loads((out / "summary.json").read_text())
                    # The same results as the sequential engine (a benchmark of wrong answers is worthless).
                    mine, ref = np.load(out / "scores-val.npy"), np.load(reference / "scores-val.npy")
                    result["max_rel_diff_vs_sequential"] = float(np.abs(mine - ref).max() / np.abs(ref).max())
                    row = {
                        "examples": kind,
                        "steps": steps,
                        "engine": name,
                        "occurrences": summary["occurrences"],
                        "distinct_examples": summary["examples"],
                        "log_write_s": write_s,
                        "out_bytes": sum(files.values()),
                        **result,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if name == "sequential":
                        sizes.append(
                            {"examples": kind, "steps": steps, "occurrences": row["occurrences"], "files": files}
                        )
                shutil.rmtree(log, ignore_errors=True)
                shutil.rmtree(reference, ignore_errors=True)
                if old_root is not None:
                    shutil.rmtree(work / f"oldlog-{kind}-{steps}", ignore_errors=True)
        sizes.append(_float16_sizes(work, steps_list[0]))
    finally:
        if old_root is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=ROOT, capture_output=True)
    return {"rows": rows, "sizes": sizes}


def _float16_sizes(work: Path, steps: int) -> dict[str, Any]:
    """File sizes of a run with float16 embeddings (reused examples)."""
    log = work / "log-f16"
    subprocess.run(_write_command(ROOT, log, steps, False), cwd=ROOT, check=True)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(_compute_command(ROOT, log, out, ["--embeddings-dtype", "float16"]), cwd=ROOT, check=True)
    summary = json.loads((out / "summary.json").read_text())
    files = _file_sizes(out)
    shutil.rmtree(log, ignore_errors=True)
    return {
        "examples": "reused, float16 embeddings",
        "steps": steps,
        "occurrences": summary["occurrences"],
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--no-old", action="store_true", help="skip the previous engine")
    parser.add_argument(
        "--old-max-steps",
        type=int,
        default=10000,
        help="largest log the previous engine runs on (4 min at 10k steps on the loaded, shared machine)",
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    options = parser.parse_args()
    load_before = os.getloadavg()[0]
    started = time.time()
    with tempfile.TemporaryDirectory(dir=options.work) as tmp:
        results = run(options.steps, not options.no_old, Path(tmp), options.old_max_steps)
    results.update(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        seconds=time.time() - started,
        load=(load_before, os.getloadavg()[0]),
        machine=platform.machine(),
        command=" ".join(["python -m bench.engine_memory", *sys.argv[1:]]),
        old_max_steps=options.old_max_steps,
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "engine_memory.json").write_text(json.dumps(results, indent=1))
    write_markdown(results)


def write_markdown(results: dict[str, Any]) -> None:
    from bench.markdown import replace_section

    lines = [
        "## Engine memory",
        "",
        f"Command: `.venv/bin/{results['command']}` ({results['date']}, {results['seconds']:.0f} s, 2 shared CPU "
        f"cores, load average {results['load'][0]:.1f} before and {results['load'][1]:.1f} after: other agents "
        "were running tests).",
        "",
        f"Synthetic logs written with dvemb's writer: {len(DIMS)} layers of projected size {DIMS[0]} (D = "
        f'{sum(DIMS)}, so `blocks="auto"` keeps one full `M`), batch {BATCH}, random gradients, one query set of '
        f"{QUERIES}; 'reused': a data set of {DATASET:,} examples in a new order every epoch; 'unique': every example "
        "new. Each `dvemb compute` (embeddings written, float32) runs in its own process; every 20 ms the benchmark "
        "reads `/proc/PID/status` of that process and its children and keeps the peak of their summed `VmRSS`, "
        "split into `RssAnon` (memory the engine allocates) and `RssFile` + `RssShmem` (pages of the "
        "memory-mapped results and scratch files, and of the libraries: page cache that the kernel can drop, "
        f"counted in RSS while mapped). 'previous engine' is commit {OLD_COMMIT} (occurrence index, per-example "
        "totals and curves in memory), run from a git worktree on a log written by its own writer with the same seed, "
        f"up to {results.get('old_max_steps', 10000):,} steps. Wall seconds are what each run took on the loaded machine, "
        "not a speed figure (Engine speed and Segmented computation measure speed).",
        "",
        "| examples | steps | occurrences | engine | wall s | peak RSS MB | of which anonymous MB | of which file pages MB | processes | scores: max rel. diff vs sequential |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['examples']} | {r['steps']:,} | {r['occurrences']:,} | {r['engine']} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | {r['peak_file_mb']:.0f} | {r['processes']} | "
            f"{r['max_rel_diff_vs_sequential']:.0e} |"
        )
    lines += ["", _reading(results["rows"]), "", *_size_table(results["sizes"])]
    replace_section("Engine memory", "\n".join(lines))


def _reading(rows: list[dict[str, Any]]) -> str:
    parts = []
    for kind in ("reused", "unique"):
        for engine in sorted({r["engine"] for r in rows}):
            mine = sorted(
                (r for r in rows if r["examples"] == kind and r["engine"] == engine), key=lambda r: r["steps"]
            )
            if len(mine) < 2:
                continue
            first, last = mine[0], mine[-1]
            growth = (
                (last["peak_anon_mb"] - first["peak_anon_mb"])
                * 2**20
                / max(last["occurrences"] - first["occurrences"], 1)
            )
            parts.append(
                f"{kind}, {engine}: anonymous peak {first['peak_anon_mb']:.0f} -> {last['peak_anon_mb']:.0f} MB from "
                f"{first['steps']:,} to {last['steps']:,} steps ({growth:.0f} B per added occurrence)"
            )
    return "Growth of the anonymous peak: " + "; ".join(parts) + "."


def _size_table(sizes: list[dict[str, Any]]) -> list[str]:
    names = sorted({name for s in sizes for name in s["files"]})
    lines = [
        "Bytes on disk per occurrence of every results file (sequential engine; the segmented engine writes the same "
        "files, and while it runs also its segments' `segments/segment-JJJJ.local.npy`, seeds x D x 4 bytes per "
        "occurrence in all):",
        "",
        "| log | steps | " + " | ".join(f"`{n}`" for n in names) + " | all | all without embeddings |",
        "|---|---:|" + "---:|" * (len(names) + 2),
    ]
    for s in sizes:
        occ = max(s["occurrences"], 1)
        cells = [f"{s['files'].get(n, 0) / occ:.1f}" for n in names]
        total = sum(s["files"].values())
        without = total - s["files"].get("embeddings.npy", 0)
        lines.append(
            f"| {s['examples']} | {s['steps']:,} | "
            + " | ".join(cells)
            + f" | {total / occ:.1f} | {without / occ:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
