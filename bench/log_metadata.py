"""Gradient-log metadata and shard reading: format version 3 against version 2, measured in the same run.

Run:

    .venv/bin/python -m bench.log_metadata

1. Bytes written for everything but the shards (manifest rewrites, shard index) while a writer records
   N shards, for the version-2 writer (the whole manifest, with every shard listed, rewritten after every
   shard) and the version-3 writer (one index line per shard; the manifest on rare events). Both are
   driven with the same steps; bytes are what the process passed to write() (``/proc/self/io`` wchar),
   less the shard files' sizes.
2. Time to read every shard of a log (``GradientLog.read_shard``: checks, checksum, tensors), for the
   version-2 reader (a separate sha256 pass over the file before loading it) on a version-2 log, and the
   version-3 reader (checksum over the loaded pages, on a second thread, in the same pass) on the same
   content as version 3, and on the version-2 log. Pages are cached (a warm-up read first), rounds are
   interleaved, medians reported.

The version-2 writer and reader are the code at ``BASELINE`` (``git show``), run against this checkout's
formats, so this needs the git history.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.harness import ROOT, machine, replace_section, save_json
from dvemb import logformat
from dvemb import reader as reader_v3
from dvemb import writer as writer_v3

BASELINE = "e300f16e8c39c04d6cc75768697f74ef0ed5b93a"  # the last commit writing format version 2


def module_at(revision: str, path: str, name: str) -> types.ModuleType:
    """The module at ``path`` as of ``revision``, imported under ``name``."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{revision[:7]}:{path}"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def version_2_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(writer, reader) of format version 2; the writer labels its manifests version 2."""
    writer = module_at(BASELINE, "dvemb/writer.py", "bench_v2_writer")
    writer.fmt = types.SimpleNamespace(**{**vars(logformat), "FORMAT_VERSION": 2})  # type: ignore[attr-defined]
    reader = module_at(BASELINE, "dvemb/reader.py", "bench_v2_reader")
    return writer, reader


def bytes_written() -> int:
    """Bytes this process passed to write() so far, all threads."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line (Linux only)")


def static_manifest(dims: list[int]) -> dict[str, Any]:
    """The run-level part of a manifest for layers of the given sizes (mean loss, empirical, plain SGD)."""
    layers = [
        {
            "name": f"blocks.{i // 4}.{('q', 'k', 'v', 'o')[i % 4]}",
            "kind": "linear",
            "out_dim": d,
            "in_dim": 1,
            "k_out": d,
            "k_in": 1,
            "seed_out": 2 * i,
            "seed_in": 2 * i + 1,
            "has_bias": False,
            "parameters": d,
        }
        for i, d in enumerate(dims)
    ]
    return {
        "world_size": 1,
        "loss_reduction": "mean",
        "layers": layers,
        "curvature": {"mode": "empirical", "samples": None, "rows_per_example": None},
        "optimizer": {"type": "SGD", "exact_sgd": True},
    }


def record(
    module: types.ModuleType, directory: Path, dims: list[int], shards: int, rows: int, steps_per_shard: int = 1
) -> tuple[int, float]:
    """Record ``shards`` shards with ``module``'s writer: (bytes written beyond the shards, seconds)."""
    names = [layer["name"] for layer in static_manifest(dims)["layers"]]
    generator = torch.Generator().manual_seed(0)
    before, start = bytes_written(), time.perf_counter()
    writer = module.LogWriter(directory, static_manifest(dims), shard_steps=steps_per_shard)
    for step in range(shards * steps_per_shard):
        grads = {n: torch.randn(rows, d, generator=generator) for n, d in zip(names, dims, strict=True)}
        ids = list(range(step * rows, (step + 1) * rows))
        writer.accept_step(module.StepRecord(step, ids, [0.1] * len(dims), [0.0] * len(dims), None, grads))
        writer.flush_if_full()
    writer.close()
    seconds = time.perf_counter() - start
    written = bytes_written() - before
    return written - sum(p.stat().st_size for p in directory.glob("shard-r0-*.safetensors")), seconds


def metadata_rows(work: Path, counts: list[int], dims: list[int]) -> list[dict[str, Any]]:
    v2_writer, _ = version_2_modules()
    rows = []
    for n in counts:
        old, old_s = record(v2_writer, work / f"meta-v2-{n}", dims, n, rows=1)
        new, new_s = record(writer_v3, work / f"meta-v3-{n}", dims, n, rows=1)
        rows.append({"shards": n, "v2_bytes": old, "v3_bytes": new, "v2_seconds": old_s, "v3_seconds": new_s})
        print(f"{n:>6} shards: v2 {old / 1e6:10.2f} MB in {old_s:6.1f} s   v3 {new / 1e6:8.3f} MB in {new_s:6.1f} s")
    return rows


def read_all(log: Any) -> None:
    for index in range(log.num_shards()):
        log.read_shard(index)


def reading_rows(work: Path, dims: list[int], shard_mb: int, shards: int, rounds: int) -> dict[str, Any]:
    v2_writer, v2_reader = version_2_modules()
    rows_per_shard = (shard_mb << 20) // (4 * sum(dims))
    logs = {"v2": work / "read-v2", "v3": work / "read-v3"}
    record(v2_writer, logs["v2"], dims, shards, rows=rows_per_shard // 4, steps_per_shard=4)
    record(writer_v3, logs["v3"], dims, shards, rows=rows_per_shard // 4, steps_per_shard=4)
    shard_files = sorted(logs["v3"].glob("shard-r0-*.safetensors"))
    cases: dict[str, Callable[[], object]] = {
        "v2 reader, v2 log (separate sha256 pass)": lambda: read_all(v2_reader.GradientLog(logs["v2"])),
        "v3 reader, v3 log (checksum in the same pass)": lambda: read_all(reader_v3.GradientLog(logs["v3"])),
        "v3 reader, v2 log": lambda: read_all(reader_v3.GradientLog(logs["v2"])),
        "sha256 alone, read() in chunks (v2's pass)": lambda: [writer_v3.sha256_file(p) for p in shard_files],
        "sha256 alone, over the mapped pages (v3)": lambda: [reader_v3._sha256(p) for p in shard_files],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():
        case()  # warm the page cache
    for _ in range(rounds):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
    size = sum(p.stat().st_size for p in logs["v3"].glob("shard-r0-*.safetensors"))
    result: dict[str, Any] = {
        "shards": shards,
        "megabytes": size / 1e6,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "load_average": os.getloadavg()[0],
    }
    for name, seconds in result["seconds"].items():
        print(f"{name:48s} {seconds:7.3f} s  {size / 1e6 / seconds:7.0f} MB/s")
    return result


def markdown(meta: list[dict[str, Any]], reading: dict[str, Any], command: str, dims: list[int]) -> str:
    lines = [
        "## Gradient-log metadata and shard reading",
        "",
        f"Command: `{command}` ({machine()}, {torch.get_num_threads()} "
        f"threads, {time.strftime('%Y-%m-%d')}). Version 2 is the writer and reader at `{BASELINE[:7]}`, run in the "
        "same process on the same steps (bench/log_metadata.py).",
        "",
        f"Bytes written beyond the shards while recording N one-step shards ({len(dims)} layers in the manifest):",
        "version 2 rewrote the manifest with every shard listed after every shard, version 3 appends one line",
        "to the shard index and writes the manifest at open, at the first step's run-level fields and at close.",
        "",
        "| shards N | version 2 | version 3 | ratio | v3 bytes per shard |",
        "|---|---|---|---|---|",
    ]
    for row in meta:
        lines.append(
            f"| {row['shards']:,} | {row['v2_bytes'] / 1e6:,.2f} MB | {row['v3_bytes'] / 1e3:,.1f} kB | "
            f"{row['v2_bytes'] / row['v3_bytes']:,.0f}x | {row['v3_bytes'] / row['shards']:,.0f} B |"
        )
    first, last = meta[0], meta[-1]
    growth = last["shards"] / first["shards"]
    per_shard = (last["v3_bytes"] - first["v3_bytes"]) / (last["shards"] - first["shards"])
    quadratic = (last["v2_bytes"] - first["v2_bytes"] * growth) / (last["shards"] ** 2 - first["shards"] ** 2 * growth)
    lines += [
        "",
        f"For {growth:.0f}x the shards, version 2 wrote {last['v2_bytes'] / first['v2_bytes']:.0f}x the bytes "
        f"(quadratic), version 3 {last['v3_bytes'] / first['v3_bytes']:.1f}x (linear: {per_shard:.0f} B per "
        f"shard). Fitted, version 2 writes about {quadratic:.0f} B x N^2: {quadratic * 1e10 / 1e12:,.1f} TB at "
        f"10^5 shards and {quadratic * 1e12 / 1e12:,.0f} TB at 10^6; version 3 {per_shard * 1e6 / 1e6:.0f} MB at "
        "10^6 shards.",
        "",
        f"Reading every shard of a log ({reading['shards']} shards, {reading['megabytes']:.0f} MB, float32, pages "
        "cached, median of the rounds):",
        "",
        "| what | seconds | MB/s |",
        "|---|---|---|",
    ]
    for name, seconds in reading["seconds"].items():
        lines.append(f"| {name} | {seconds:.3f} | {reading['megabytes'] / seconds:,.0f} |")
    before = reading["seconds"]["v2 reader, v2 log (separate sha256 pass)"]
    after = reading["seconds"]["v3 reader, v3 log (checksum in the same pass)"]
    separate_pass = reading["seconds"]["sha256 alone, read() in chunks (v2's pass)"]
    lines += [
        "",
        f"Version 3 reads in {after / before:.2f}x the time of version 2 ({before / after:.1f}x faster): one pass over "
        "the pages (sha256 over the mapped file on a second thread while the tensors are checked) and finiteness "
        "checked on each tensor's sum instead of an isfinite() mask. Same checks: a corrupted shard is refused with "
        "a ChecksumError naming it (tests/core/test_log_format.py). In this run version 2's separate sha256 pass was "
        f"{separate_pass / before:.0%} of its reading time; most of the rest was the isfinite() masks. The sha256 "
        "itself remains (the last rows): with both cores busy it cannot hide entirely behind the checks. Timings are "
        f"of a shared 2-core machine (load average {reading['load_average']:.0f} at the end of the run): ratios are "
        "measured in the same rounds.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[250, 1000, 2000], help="shard counts (metadata)")
    parser.add_argument("--layers", type=int, default=25, help="layers of 256 dimensions")
    parser.add_argument("--shard-mb", type=int, default=64, help="shard size for the reading test")
    parser.add_argument("--read-shards", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    dims = [256] * args.layers
    with tempfile.TemporaryDirectory(prefix="dvemb-log-metadata-") as tmp:
        meta = metadata_rows(Path(tmp), args.counts, dims)
        reading = reading_rows(Path(tmp), dims, args.shard_mb, args.read_shards, args.rounds)
    save_json("log_metadata.json", {"metadata": meta, "reading": reading})
    if not args.no_markdown:
        command = ".venv/bin/python -m bench.log_metadata" + (" " + " ".join(argv) if argv else "")
        replace_section("Gradient-log metadata and shard reading", markdown(meta, reading, command, dims))


if __name__ == "__main__":
    main(sys.argv[1:])
