"""The storage layout: every object's key (a '/'-separated path relative to the storage's root), and the same
layout as paths under a local directory (the local storage's, and the tests').

    runs/<run>/staging/<upload id>.part     an upload's bytes, never read by anything but the validator
    runs/<run>/staging/<manifest or index>  the run's manifests and shard indexes as validated (the validator's view)
    runs/<run>/log/<name>                   validated files: all that computations read
    runs/<run>/results/<job>/...            a job's results directory (docs/results.md)
    runs/<run>/results/<job>/adhoc/<q>.npy  an ad-hoc query's posted vectors
"""

from __future__ import annotations

from pathlib import Path

from dvemb.formats import is_log_file_name
from server.errors import BadRequest


def check_log_file_name(name: str) -> str:
    """``name`` if a gradient log can hold it (dvemb.formats' grammar), else a 400 naming the problem."""
    if not is_log_file_name(name):
        raise BadRequest(
            f"file name {name!r} is not a gradient-log file name (manifest.json, shards.jsonl, "
            "shard-rR-NNNNNN.safetensors, queries-NAME.safetensors, examples-NNNNNN[.rankR].jsonl, "
            "projection.safetensors, replay-bundle.safetensors); paths are not accepted"
        )
    return name


def run_key(run_id: int) -> str:
    return f"runs/{run_id}"


def staging_key(run_id: int, name: str = "") -> str:
    """The run's staging area, or one name in it."""
    return f"{run_key(run_id)}/staging" + (f"/{name}" if name else "")


def log_key(run_id: int, name: str = "") -> str:
    """The run's validated log, or one file of it."""
    return f"{run_key(run_id)}/log" + (f"/{name}" if name else "")


def results_key(run_id: int, job_id: int, name: str = "") -> str:
    """A job's results directory, or one file of it."""
    return f"{run_key(run_id)}/results/{job_id}" + (f"/{name}" if name else "")


def adhoc_query_key(run_id: int, job_id: int, query_id: int) -> str:
    """Where an ad-hoc query's posted vectors are kept (.npy), next to its job's results."""
    return results_key(run_id, job_id, f"adhoc/{query_id}.npy")


def part_key(run_id: int, upload_id: str) -> str:
    return staging_key(run_id, f"{upload_id}.part")


# The same layout under a local directory.


def run_dir(root: Path, run_id: int) -> Path:
    return root / run_key(run_id)


def staging_dir(root: Path, run_id: int) -> Path:
    return root / staging_key(run_id)


def log_dir(root: Path, run_id: int) -> Path:
    return root / log_key(run_id)


def results_dir(root: Path, run_id: int, job_id: int) -> Path:
    return root / results_key(run_id, job_id)


def adhoc_query_path(root: Path, run_id: int, job_id: int, query_id: int) -> Path:
    return root / adhoc_query_key(run_id, job_id, query_id)


def part_path(root: Path, run_id: int, upload_id: str) -> Path:
    return root / part_key(run_id, upload_id)
