"""Comparing analyses (jobs) of one project: their phase curves and shares, and for runs over the same data
(matched by example id) how far their top examples agree (overlap, Spearman's rank correlation) and which
examples' total influence differs most (docs/compare-and-export.md)."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from server.db.models import ExampleTotal, Job, Project, Run
from server.db.states import JobStatus
from server.errors import BadRequest
from server.services import results
from server.services.jobs import get_job

MAX_JOBS = 8


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (shape ``(n,)``), ties sharing their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1, dtype=np.float64)
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        if count > 1:  # a tie: every member gets the mean of the ranks it spans
            ranks[order[start : start + count]] = start + (count + 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of paired samples ``a`` and ``b`` (shape ``(n,)``); None when it is undefined
    (fewer than two pairs, or one side constant)."""
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return None if denominator == 0 else float((ra * rb).sum() / denominator)


def compared_jobs(session: Session, *, project: Project, job_ids: list[int], query_set: str) -> list[Job]:
    """The jobs to compare: two to MAX_JOBS distinct succeeded jobs of the project, each with the query set."""
    unique = list(dict.fromkeys(job_ids))
    if not 2 <= len(unique) <= MAX_JOBS:
        raise BadRequest(f"compare 2 to {MAX_JOBS} distinct jobs (got {len(unique)}): pass jobs=1,2")
    jobs = [get_job(session, project=project, job_id=i) for i in unique]
    for job in jobs:
        results.require_done(job)
        results.check_query_set(job, query_set)
    return jobs


def candidates(session: Session, *, project: Project) -> list[dict[str, Any]]:
    """Every succeeded job of the project, newest first, with its run and query sets (for the picker)."""
    rows = session.execute(
        select(Job, Run.name)
        .join(Run, Run.id == Job.run_id)
        .where(Run.project_id == project.id, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.id.desc())
    ).all()
    return [
        {
            "job_id": job.id,
            "run_id": job.run_id,
            "run_name": name,
            "options": job.options,
            "propagation": job.propagation,
            "query_sets": results.query_sets(job),
            "finished_at": job.finished_at,
        }
        for job, name in rows
    ]


def label_of(session: Session, job: Job) -> str:
    run = session.get(Run, job.run_id)
    return f"{run.name if run else job.run_id} · job {job.id}"


def run_summaries(session: Session, jobs: list[Job], *, query_set: str, points: int) -> list[dict[str, Any]]:
    """Per job: its label, run, steps, examples, propagation, phases and downsampled curve."""
    out = []
    for job in jobs:
        summary = results.summary_of(job)
        out.append(
            {
                "job_id": job.id,
                "run_id": job.run_id,
                "label": label_of(session, job),
                "steps": summary.steps,
                "examples": summary.examples,
                "propagation": job.propagation,
                "options": job.options,
                "phases": results.phases(session, job=job, query_set=query_set),
                "curve": results.curve(session, job=job, query_set=query_set, points=points),
            }
        )
    return out


def paired_totals(session: Session, a: Job, b: Job, query_set: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The examples both jobs scored (by id), with their totals in each: ids, totals in a, totals in b."""
    ta, tb = aliased(ExampleTotal), aliased(ExampleTotal)
    rows = session.execute(
        select(ta.example_id, ta.total, tb.total)
        .join(tb, (tb.example_id == ta.example_id) & (tb.job_id == b.id) & (tb.query_set == query_set))
        .where(ta.job_id == a.id, ta.query_set == query_set)
        .order_by(ta.example_id)
    ).all()
    ids = np.array([r[0] for r in rows], dtype=object)
    return ids, np.array([r[1] for r in rows], dtype=np.float64), np.array([r[2] for r in rows], dtype=np.float64)


def _count(session: Session, job: Job, query_set: str) -> int:
    q = select(func.count()).where(ExampleTotal.job_id == job.id, ExampleTotal.query_set == query_set)
    return int(session.scalar(q) or 0)


def _top_ids(session: Session, job: Job, query_set: str, kind: str, k: int) -> list[str]:
    order = ExampleTotal.total.desc() if kind == "helpful" else ExampleTotal.total.asc()
    q = (
        select(ExampleTotal.example_id)
        .where(ExampleTotal.job_id == job.id, ExampleTotal.query_set == query_set)
        .order_by(order, ExampleTotal.example_id)
        .limit(k)
    )
    return list(session.scalars(q))


def pair(session: Session, a: Job, b: Job, *, query_set: str, top: int, differ: int) -> dict[str, Any]:
    """How two jobs' examples agree: top-``top`` overlap per kind, Spearman's rho over every shared example and
    over the union of both top lists, and the ``differ`` shared examples whose totals differ most."""
    ids, total_a, total_b = paired_totals(session, a, b, query_set)
    index = {example: i for i, example in enumerate(ids)}
    overlap: dict[str, Any] = {}
    union: set[str] = set()
    for kind in ("helpful", "harmful"):
        top_a, top_b = _top_ids(session, a, query_set, kind, top), _top_ids(session, b, query_set, kind, top)
        shared = set(top_a) & set(top_b)
        union |= set(top_a) | set(top_b)
        overlap[kind] = {
            "shared": len(shared),
            "of": max(len(top_a), len(top_b)),
            "share": _share(shared, top_a, top_b),
        }
    in_union = np.array(sorted(index[e] for e in union if e in index), dtype=np.int64)
    difference = total_b - total_a
    order = np.lexsort((ids.astype(str), -np.abs(difference)))[:differ] if len(ids) else np.array([], dtype=np.int64)
    return {
        "a": a.id,
        "b": b.id,
        "examples_a": _count(session, a, query_set),
        "examples_b": _count(session, b, query_set),
        "shared_examples": len(ids),
        "top": top,
        "overlap": overlap,
        "spearman_all": spearman(total_a, total_b),
        "spearman_top": spearman(total_a[in_union], total_b[in_union]),
        "top_union_shared": len(in_union),
        "differences": [
            {
                "example_id": str(ids[i]),
                "total_a": float(total_a[i]),
                "total_b": float(total_b[i]),
                "difference": float(difference[i]),
            }
            for i in order
        ],
    }


def _share(shared: set[str], top_a: list[str], top_b: list[str]) -> float | None:
    size = max(len(top_a), len(top_b))
    return len(shared) / size if size else None


def compare(
    session: Session, *, project: Project, job_ids: list[int], query_set: str, points: int, top: int, differ: int
) -> dict[str, Any]:
    """Everything the comparison page shows (the figures are built from ``runs`` by server.figures)."""
    jobs = compared_jobs(session, project=project, job_ids=job_ids, query_set=query_set)
    pairs = [pair(session, a, b, query_set=query_set, top=top, differ=differ) for a, b in combinations(jobs, 2)]
    return {
        "query_set": query_set,
        "runs": run_summaries(session, jobs, query_set=query_set, points=points),
        "pairs": pairs,
    }
