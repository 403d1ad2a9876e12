"""Segmented computation: job wall time against segments and worker processes, and the cost of each stage.

Run:

    .venv/bin/python -m bench.segments_speed

Two synthetic logs shaped like a small language model (25 layers projected to 16 x 16 = 256, batch
32, random gradients; bench.optimizer_speed's writer): plain SGD, and AdamW with its recorded
optimizer state, where a segment runs 2 seeded recursions (``theta`` and the momentum slot; the
layers are projected, so no second-moment slot). Per-layer blocks (D = 6,400 > 4,096).

1. Job wall time: ``dvemb compute LOG --out OUT --no-embeddings`` in a fresh process (imports and
   the process pool's start included), for 1 segment (the sequential engine) and 2 or 4 segments on
   1 or 2 worker processes; rounds run every configuration in turn and each configuration's time is
   divided by the sequential engine's in the same round; the table gives medians over rounds.
2. Stages, in this process (one torch thread, CPU time): the sequential engine against
   :func:`~dvemb.engine.segmented.prepare_segments`, every :func:`~dvemb.engine.segmented.run_segment`
   and :func:`~dvemb.engine.segmented.combine_segments` run one after the other, with and without
   the embeddings file (which the combine step rebuilds from the local embeddings, ``D^2`` per row
   per layer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import ROOT, replace_section, save_json, utc_stamp
from bench.optimizer_speed import write_log
from dvemb.engine import ComputeArguments, compute
from dvemb.engine.segmented import combine_segments, prepare_segments, run_segment

BATCH = 32
STEPS = {"sgd": 800, "adamw": 300}
JOBS = [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)]  # (segments, workers)


def job_seconds(log: Path, out: Path, segments: int, workers: int) -> float:
    """Wall time of one ``dvemb compute`` process."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["compute", str(log), "--out", str(out), "--no-embeddings", "--quiet"]
    argv += ["--segments", str(segments), "--workers", str(workers)]
    code = f"import sys; from dvemb.cli import main; sys.exit(main({argv!r}))"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def stage_seconds(log: Path, out: Path, segments: int, embeddings: bool) -> dict[str, float]:
    """CPU seconds of the sequential engine, or of each stage of a segmented computation, in this process
    (one torch thread: wall time on the shared machine would measure the other agents' load)."""
    shutil.rmtree(out, ignore_errors=True)
    args = ComputeArguments(save_embeddings=embeddings, segments=segments)
    if segments == 1:
        start = time.process_time()
        compute(log, out, args)
        return {"sequential": time.process_time() - start}
    out.mkdir(parents=True)
    start = time.process_time()
    plan = prepare_segments(log, out, args, segments)
    prepared = time.process_time()
    per_segment = []
    for index in reversed(range(plan.num_segments)):
        begin = time.process_time()
        run_segment(log, out, args, plan, index)
        per_segment.append(time.process_time() - begin)
    ran = time.process_time()
    combine_segments(log, out, args, plan)
    done = time.process_time()
    return {
        "prepare": prepared - start,
        "segments": ran - prepared,
        "slowest_segment": max(per_segment),
        "combine": done - ran,
        "total": done - start,
    }


def run(rounds: int, work: Path) -> dict[str, Any]:
    logs = {}
    for name, steps in STEPS.items():
        logs[name] = work / f"log-{name}"
        write_log(logs[name], name, steps, BATCH)
    for log in logs.values():  # warm-up: the first process to start pays for cold caches
        job_seconds(log, work / "out", 1, 1)
    jobs: dict[str, dict[str, list[float]]] = {name: {} for name in logs}
    stages: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in logs}
    for r in range(rounds):
        for name, log in logs.items():
            for segments, workers in JOBS:
                key = f"{segments}x{workers}"
                jobs[name].setdefault(key, []).append(job_seconds(log, work / "out", segments, workers))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            for segments in (1, 2, 4):
                for embeddings in (False, True):
                    key = f"{segments}{'+emb' if embeddings else ''}"
                    stages[name].setdefault(key, []).append(stage_seconds(log, work / "out", segments, embeddings))
            torch.set_num_threads(threads)
        print(json.dumps({"round": r, "jobs": jobs}), flush=True)
    return {"jobs": jobs, "stages": stages}


def _median_ratio(values: list[float], base: list[float]) -> float:
    return statistics.median(v / b for v, b in zip(values, base, strict=True))


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    jobs = {}
    for name, per in raw["jobs"].items():
        base = per["1x1"]
        jobs[name] = {key: {"seconds": statistics.median(v), "ratio": _median_ratio(v, base)} for key, v in per.items()}
    stages: dict[str, dict[str, dict[str, float]]] = {}
    for name, per in raw["stages"].items():
        stages[name] = {}
        for emb in ("", "+emb"):
            base = [s["sequential"] for s in per[f"1{emb}"]]
            stages[name][f"1{emb}"] = {"sequential": statistics.median(base)}
            for segments in (2, 4):
                runs = per[f"{segments}{emb}"]
                stages[name][f"{segments}{emb}"] = {
                    **{part: statistics.median(s[part] for s in runs) for part in runs[0]},
                    **{
                        f"{part}_ratio": _median_ratio([s[part] for s in runs], base)
                        for part in ("prepare", "segments", "slowest_segment", "combine", "total")
                    },
                }
    return {"jobs": jobs, "stages": stages}


def write_markdown(results: dict[str, Any]) -> None:
    jobs, stages = results["summary"]["jobs"], results["summary"]["stages"]
    lines = [
        "## Segmented computation",
        "",
        f"Command: `.venv/bin/python -m bench.segments_speed` ({results['date']}, {results['seconds']:.0f} s, "
        f"{results['rounds']} interleaved rounds, 2 CPU cores shared with other agents' test runs: load average "
        f"{results['load'][0]:.1f} before, {results['load'][1]:.1f} after; torch {results['torch']}).",
        "",
        "Synthetic logs shaped like a small language model: 25 layers projected to 16 x 16 (D = 6,400, per-layer "
        f"blocks), batch {BATCH}, random gradients, one query set of 16; SGD over {STEPS['sgd']} steps and AdamW (with "
        f"its recorded state; a segment runs 2 seeded recursions) over {STEPS['adamw']} steps. Job: `dvemb compute LOG "
        "--out OUT --no-embeddings --segments K --workers W` in a fresh process; ratio = median over rounds of the job's "
        "time / the sequential job's time in the same round.",
        "",
        "| log | segments | workers | job seconds (median) | time / sequential job |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, per in jobs.items():
        for key, value in per.items():
            segments, workers = key.split("x")
            lines.append(f"| {name} | {segments} | {workers} | {value['seconds']:.1f} | {value['ratio']:.2f}x |")
    lines += [
        "",
        "Stages in one process (one torch thread, CPU seconds), run one after the other: `prepare_segments`, every `run_segment`, "
        "`combine_segments`, each as a ratio to the sequential engine (`compute()` with one segment) in the same "
        "round; 'slowest segment' is the bound on the segments' stage with one worker per segment. With "
        "embeddings, the combine step rebuilds every occurrence's full embedding from the local ones.",
        "",
        "| log | embeddings file | segments | sequential CPU s | prepare | all segments | slowest segment | combine | total |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per in stages.items():
        for emb in ("", "+emb"):
            seq = per[f"1{emb}"]["sequential"]
            for segments in (2, 4):
                s = per[f"{segments}{emb}"]
                cells = " | ".join(
                    f"{s[part]:.2f} s ({s[part + '_ratio']:.2f}x)"
                    for part in ("prepare", "segments", "slowest_segment", "combine", "total")
                )
                lines.append(f"| {name} | {'yes' if emb else 'no'} | {segments} | {seq:.2f} | {cells} |")
    lines += ["", *reading(results["summary"])]
    replace_section("Segmented computation", "\n".join(lines))


def reading(summary: dict[str, Any]) -> list[str]:
    jobs, stages = summary["jobs"], summary["stages"]
    out = []
    for name in jobs:
        best = min((k for k in jobs[name] if k != "1x1"), key=lambda k: jobs[name][k]["ratio"])
        s4, e4 = stages[name]["4"], stages[name]["4+emb"]
        out.append(
            f"- {name}: best job {best.replace('x', ' segments x ')} workers at {jobs[name][best]['ratio']:.2f}x the "
            f"sequential job; the combine step adds {s4['combine_ratio']:.2f}x the sequential engine's time without "
            f"embeddings and {e4['combine_ratio']:.2f}x with them (4 segments); the segments together cost "
            f"{s4['segments_ratio']:.2f}x the sequential engine."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        raw = run(options.rounds, Path(tmp))
    results = {
        "raw": raw,
        "summary": summarise(raw),
        "rounds": options.rounds,
        "date": utc_stamp(),
        "seconds": time.time() - started,
        "load": (load_before, os.getloadavg()[0]),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    save_json("segments_speed.json", results)
    write_markdown(results)
    print("\n".join(reading(results["summary"])))


if __name__ == "__main__":
    main()
