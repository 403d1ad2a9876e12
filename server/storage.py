"""Where runs' files live. Uploads land in ``staging/`` (never read by anything but the validator);
only validated files are moved into ``log/``, which is what computations read."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from dvemb.formats import is_log_file_name
from server.errors import BadRequest


def check_log_file_name(name: str) -> str:
    """``name`` if a gradient log can hold it (dvemb.formats' grammar), else a 400 naming the problem."""
    if not is_log_file_name(name):
        raise BadRequest(
            f"file name {name!r} is not a gradient-log file name (manifest.json, shards.jsonl, "
            "shard-rR-NNNNNN.safetensors, queries-NAME.safetensors, examples-NNNNNN.jsonl, projection.safetensors); "
            "paths are not accepted"
        )
    return name


def run_dir(root: Path, run_id: int) -> Path:
    return root / "runs" / str(run_id)


def staging_dir(root: Path, run_id: int) -> Path:
    return run_dir(root, run_id) / "staging"


def log_dir(root: Path, run_id: int) -> Path:
    return run_dir(root, run_id) / "log"


def results_dir(root: Path, run_id: int, job_id: int) -> Path:
    return run_dir(root, run_id) / "results" / str(job_id)


def adhoc_query_path(root: Path, run_id: int, job_id: int, query_id: int) -> Path:
    """Where an ad-hoc query's posted vectors are kept (.npy), next to its job's results."""
    return results_dir(root, run_id, job_id) / "adhoc" / f"{query_id}.npy"


def part_path(root: Path, run_id: int, upload_id: str) -> Path:
    return staging_dir(root, run_id) / f"{upload_id}.part"


def public_message(message: str, root: Path) -> str:
    """``message`` as users may see it: any path under the storage root reduced to its file name (the
    layout of the server's disk is nobody's business)."""
    return re.sub(re.escape(str(root.resolve())) + r"/(?:[^\s:'\"]*/)?", "", message)


def delete_run_files(root: Path, run_id: int) -> None:
    shutil.rmtree(run_dir(root, run_id), ignore_errors=True)
