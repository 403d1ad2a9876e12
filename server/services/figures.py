"""Data for the dashboard's figures: curves (the set's from the database, one query's from storage),
and a sample of per-occurrence scores by phase."""

from __future__ import annotations

import fnmatch
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from sqlalchemy.orm import Session

from dvemb import formats
from server.db.models import Job
from server.errors import BadRequest
from server.services import results
from server.storage import Storage, log_key, results_key


def _bins(n: int, points: int) -> np.ndarray:
    return np.linspace(0, n, min(n, points) + 1).astype(np.int64)


def _binned(values: np.ndarray, edges: np.ndarray) -> list[float | None]:
    out = []
    for a, b in itertools.pairwise(edges):
        chunk = values[a:b]
        chunk = chunk[np.isfinite(chunk)]
        out.append(float(chunk.mean()) if len(chunk) else None)
    return out


def _results_file(storage: Storage, job: Job, name: str) -> Path:
    return storage.local_file(results_key(job.run_id, job.id, name))


def query_curve(*, job: Job, query_set: str, query: int, points: int, storage: Storage) -> dict[str, list[Any]]:
    """One query's per-step curve, from the results files, averaged into at most ``points`` bins."""
    results.check_query(job, query_set, query)
    table = load_file(str(_results_file(storage, job, formats.curve_file(query_set))))
    curves = np.load(_results_file(storage, job, formats.curves_file(query_set)), mmap_mode="r")
    per_query = curves[:, query].astype(np.float64)
    lr = table["lr"]
    edges = _bins(len(lr), points)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_lr = np.where(lr > 0, per_query / lr, np.nan)
    return {
        "step": [int(a) for a in edges[:-1]],
        "mean": _binned(per_query, edges),
        "mean_per_lr": _binned(per_lr, edges),
        "lr": _binned(lr, edges),
        "loss": _binned(table["loss"], edges),
    }


def sampled_scores(*, job: Job, query_set: str, sample: int, storage: Storage) -> list[dict[str, Any]]:
    """Query-set-mean scores of up to ``sample`` evenly spaced occurrences (what the box plot draws), in row
    order: each with its occurrence row, step and phase."""
    results.check_query_set(job, query_set)
    scores = np.load(_results_file(storage, job, formats.scores_file(query_set)), mmap_mode="r")
    rows = np.unique(np.linspace(0, scores.shape[0] - 1, min(sample, scores.shape[0])).astype(np.int64))
    steps = load_file(str(_results_file(storage, job, formats.OCCURRENCES)))["row_step"][rows]
    values = np.asarray(scores[rows]).mean(axis=1)
    bounds = results.summary_of(job).query_set(query_set).boundaries
    return [
        {"row": row, "step": step, "phase": formats.phase_of(step, bounds), "score": value}
        for row, step, value in zip(rows.tolist(), steps.tolist(), values.tolist(), strict=True)
    ]


def scores_by_phase(*, job: Job, query_set: str, sample: int, storage: Storage) -> dict[str, list[float]]:
    """The sampled scores (:func:`sampled_scores`) grouped by phase."""
    out: dict[str, list[float]] = {name: [] for name in formats.PHASE_NAMES}
    for point in sampled_scores(job=job, query_set=query_set, sample=sample, storage=storage):
        out[point["phase"]].append(float(point["score"]))
    return out


def dynamics(job: Job) -> dict[str, Any]:
    """The job's value dynamics by series (the summary's ``dynamics``; empty when the log recorded no checkpoint)."""
    summary = job.results
    return dict(summary.dynamics) if summary is not None else {}


def dynamics_series(job: Job, series: str) -> dict[str, Any]:
    """One series of the job's value dynamics; a 400 naming the ones there are."""
    available = dynamics(job)
    if series not in available:
        known = ", ".join(sorted(available)) or "none: record queries with checkpoint=True during training"
        raise BadRequest(f"series {series!r} has no value dynamics in this job; available: {known}")
    return dict(available[series])


def examples_metadata(*, job: Job, example_ids: set[str], storage: Storage) -> dict[str, dict[str, Any]]:
    """What examples are (text, label, source, small image), from the run's validated log, in one scan."""
    found: dict[str, dict[str, Any]] = {}
    folder = log_key(job.run_id)
    for key in storage.keys(folder):
        if not fnmatch.fnmatchcase(key[len(folder) + 1 :], formats.EXAMPLE_FILES_GLOB):
            continue
        with storage.local_file(key).open(encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                key = str(record.get("id"))
                if key in example_ids:
                    found[key] = {k: record[k] for k in ("text", "label", "source", "image") if k in record}
                    if len(found) == len(example_ids):
                        return found
    return found


def example_metadata(*, job: Job, example_id: str, storage: Storage) -> dict[str, Any]:
    """What one example is; empty when the log does not describe it."""
    return examples_metadata(job=job, example_ids={example_id}, storage=storage).get(example_id, {})


def set_curve(session: Session, *, job: Job, query_set: str, points: int) -> dict[str, list[Any]]:
    return results.curve(session, job=job, query_set=query_set, points=points)
