"""How long CI takes (issue 26.6): `.ci/run` on a clean clone of the committed HEAD, as CI runs it, timed in wall
time and CPU time, and the README's development section's line rewritten with the figures.

Run (from the repository root; it takes as long as CI does, about 10-20 minutes on 2 cores)::

    .venv/bin/python -m bench.ci_time

The clone is made in a temporary directory (`git clone` of this repository: what is committed, nothing else) and
removed afterwards; its set-up (`scripts/setup.sh`) installs from scratch there, as on a CI machine, except the
system packages (Chromium) already present. Writes bench/out/ci_time.json and the README line between the markers
``<!-- ci-time -->`` and ``<!-- /ci-time -->``; a failed run writes nothing to the README.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, loadavg, replace_block, save_json, utc_stamp

README = ROOT / "README.md"
MARKERS = ("<!-- ci-time -->", "<!-- /ci-time -->")
TARGET_SECONDS = 12 * 60


def run_ci(clone: Path, log: Path) -> tuple[int, float, float]:
    """(exit status, wall seconds, CPU seconds of every process it started) of ``.ci/run`` in ``clone``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as out:
        status = subprocess.run(
            ["bash", ".ci/run"], cwd=clone, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return status, wall, cpu


def sentence(commit: str, wall: float, cpu: float, load: float, summary: str) -> str:
    met = "met" if wall <= TARGET_SECONDS else "not met"
    return (
        f"How long: `.ci/run` on a clean clone of {commit} took {wall:.0f} s ({wall / 60:.1f} minutes; target 12 "
        f"minutes on 2 idle cores: {met}), {cpu / 60:.1f} CPU minutes in all, load average {load:.1f} at the end "
        f"({summary}; measured on {utc_stamp()} by `.venv/bin/python -m bench.ci_time`)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="dvemb-ci-"))
    clone = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    log = ROOT / "bench" / "out" / "ci_time.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        status, wall, cpu = run_ci(clone, log)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    tail = log.read_text().splitlines()
    found = [line for line in tail if re.search(r"\d+ passed", line)]
    summary = found[-1].strip("= ") if found else "no pytest summary"
    load = loadavg()
    save_json(
        "ci_time.json", {"commit": commit, "status": status, "wall": wall, "cpu": cpu, "load": load, "summary": summary}
    )
    print(f"status {status}, {wall:.0f} s wall, {cpu:.0f} s CPU, {summary} (log: {log})")
    if status != 0:
        raise SystemExit(f".ci/run failed ({status}): the README is left as it is; see {log}")
    replace_block(README, *MARKERS, sentence(commit, wall, cpu, load, summary))


if __name__ == "__main__":
    main()
