"""When to run data selection for a job: its curve binned in SQL (the per-step sums of |influence| and of
|influence| / lr), handed to the pure server.selection."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import Float, case, cast, func, select
from sqlalchemy.orm import Session

from server.db.models import CurvePoint, Job
from server.selection import selection_timing
from server.services.results import check_query_set, curve_bucket, phases, summary_of

__all__ = ["job_selection"]


def job_selection(
    session: Session, *, job: Job, query_set: str, share: float, max_windows: int, measure: str, points: int
) -> dict[str, Any]:
    """The recommendation for a job's query set, searched on at most ``points`` bins of consecutive steps."""
    check_query_set(job, query_set)
    steps = summary_of(job).steps or 1
    bucket = curve_bucket(steps, points, binned=steps > points)
    per_lr = case((CurvePoint.lr > 0, CurvePoint.abs_sum / CurvePoint.lr), else_=0.0)
    weight = cast(CurvePoint.abs_sum, Float) if measure == "raw" else per_lr
    rows = session.execute(
        select(func.min(CurvePoint.step), func.max(CurvePoint.step), func.sum(func.abs(weight)))
        .where(CurvePoint.job_id == job.id, CurvePoint.query_set == query_set)
        .group_by(bucket)
        .order_by(func.min(CurvePoint.step))
    ).all()
    first, last, weights = (np.array([r[i] for r in rows]) for i in range(3))
    return selection_timing(
        first.astype(np.int64),
        last.astype(np.int64),
        weights.astype(np.float64),
        phases(session, job=job, query_set=query_set),
        share=share,
        max_windows=max_windows,
        measure=measure,
    )
