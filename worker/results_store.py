"""Storing a finished computation's aggregates (top-k rows, per-example totals, curves, phases) in the
database in short transactions, replacing any rows of an earlier attempt (idempotent)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dvemb.engine import load_results
from dvemb.formats import Summary, phase_of
from dvemb.reader import GradientLog
from server.db.models import CurvePoint, ExampleTotal, PhaseSummaryRow, TopKRow
from worker.row_writes import ShortTransactions
from worker.windows import store_windows

__all__ = ["example_metadata", "store_results"]


def example_metadata(directory: Any) -> dict[str, tuple[str | None, str | None]]:
    """Example id -> (label, source) from the log's example metadata files (validated on upload)."""
    meta: dict[str, tuple[str | None, str | None]] = {}
    for record in GradientLog(directory).iter_examples():
        label, source = record.get("label"), record.get("source")
        meta[str(record["id"])] = (
            None if label is None else str(label)[:255],
            None if source is None else str(source)[:255],
        )
    return meta


def store_results(
    writer: ShortTransactions,
    job_id: int,
    out: Any,
    summary: dict[str, Any],
    meta: dict[str, tuple[str | None, str | None]],
) -> None:
    """Replace the job's aggregate rows with those of the results directory (idempotent: an earlier attempt's
    rows are deleted first), in short transactions while the job is still running."""
    for model in (TopKRow, ExampleTotal, CurvePoint, PhaseSummaryRow):
        writer.delete_job_rows(model, job_id)
    results = load_results(out)
    ids = [str(i) for i in results.example_ids]
    occurrences = np.bincount(results.example_index.numpy(), minlength=len(ids))
    typed = Summary.from_json(summary)
    for name, info in typed.query_sets.items():
        bounds = info.boundaries
        writer.insert(
            TopKRow,
            (
                {
                    "job_id": job_id,
                    "query_set": name,
                    "query": -1 if query is None else query,
                    "kind": kind,
                    "rank": r["rank"],
                    "score": r["score"],
                    "row": r["row"],
                    "step": r["step"],
                    "epoch": r["epoch"],
                    "example_id": str(r["example_id"]),
                    "phase": phase_of(r["step"], bounds),
                    "label": meta.get(str(r["example_id"]), (None, None))[0],
                    "source": meta.get(str(r["example_id"]), (None, None))[1],
                }
                for query in [None, *range(info.num_queries)]
                for kind in ("helpful", "harmful")
                for r in results.top(name, kind=kind, query=query, k=typed.top_k)
            ),
        )
        totals = results.totals(name).mean(axis=1)
        writer.insert(
            ExampleTotal,
            (
                {
                    "job_id": job_id,
                    "query_set": name,
                    "example_id": ids[i],
                    "total": float(totals[i]),
                    "occurrences": int(occurrences[i]),
                    "label": meta.get(ids[i], (None, None))[0],
                    "source": meta.get(ids[i], (None, None))[1],
                }
                for i in range(len(ids))
            ),
        )
        curve = results.curve(name)
        writer.insert(
            CurvePoint,
            (
                {
                    "job_id": job_id,
                    "query_set": name,
                    "step": int(curve["step"][t]),
                    "lr": float(curve["lr"][t]),
                    "mean": float(curve["mean"][t]),
                    "abs_sum": float(curve["abs_sum"][t]),
                    "mean_per_lr": _finite(curve["mean_per_lr"][t]),
                    "loss": _finite(curve["loss"][t]),
                }
                for t in range(len(curve["step"]))
            ),
        )
        writer.insert(PhaseSummaryRow, [{"job_id": job_id, "query_set": name, "summary": info.phases}])
    # The top examples of each phase, tenth and epoch (bounded: windows x queries x top_k rows).
    store_windows(writer, job_id, results, typed, meta)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
