"""Comparing analyses (jobs) of one project: their phase curves and shares, and for runs over the same data
(matched by example id) how far their top examples agree (overlap, Spearman's rank correlation) and which
examples' total influence differs most (docs/compare-and-export.md)."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

from sqlalchemy import Float, Select, cast, func, select
from sqlalchemy.orm import Session, aliased

from server.db.models import ExampleTotal, Job, Project, Run
from server.db.states import JobStatus
from server.errors import BadRequest
from server.services import results
from server.services.jobs import get_job

MAX_JOBS = 8


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
            "approximations": job.approximations,
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
                "approximations": job.approximations,
                "options": job.options,
                "phases": results.phases(session, job=job, query_set=query_set),
                "curve": results.curve(session, job=job, query_set=query_set, points=points),
            }
        )
    return out


def shared_rows(a: Job, b: Job, query_set: str, ids: set[str] | None = None) -> Select[str, float, float]:
    """The examples both jobs scored (matched by id; only ``ids`` when given): example id, total in a, in b."""
    ta, tb = aliased(ExampleTotal), aliased(ExampleTotal)
    q = (
        select(ta.example_id, ta.total.label("total_a"), tb.total.label("total_b"))
        .join(tb, (tb.example_id == ta.example_id) & (tb.job_id == b.id) & (tb.query_set == query_set))
        .where(ta.job_id == a.id, ta.query_set == query_set)
    )
    return q if ids is None else q.where(ta.example_id.in_(sorted(ids)))


def _average_rank(column: Any) -> Any:
    """A window expression: the column's rank (1..n) with ties sharing their average rank."""
    return cast(func.rank().over(order_by=column), Float) + cast(func.count().over(partition_by=column) - 1, Float) / 2


def spearman_in_database(
    session: Session, a: Job, b: Job, query_set: str, ids: set[str] | None = None
) -> tuple[int, float | None]:
    """How many examples both jobs scored (only ``ids`` when given), and Spearman's rho of their totals; None
    when it is undefined (fewer than two pairs, or one side constant). Computed by the database, so that only
    the sums come back however many examples there are: average ranks (ties share theirs) by window functions,
    then Pearson's correlation of the ranks centred on their exact mean (n + 1) / 2 (centring first keeps the
    sums of 10^6 squared ranks accurate)."""
    pairs = shared_rows(a, b, query_set, ids).subquery()
    ranked = select(
        _average_rank(pairs.c.total_a).label("ra"),
        _average_rank(pairs.c.total_b).label("rb"),
        ((cast(func.count().over(), Float) + 1) / 2).label("mean"),
    ).subquery()
    da, db = ranked.c.ra - ranked.c.mean, ranked.c.rb - ranked.c.mean
    n, sab, saa, sbb = session.execute(
        select(func.count(), func.sum(da * db), func.sum(da * da), func.sum(db * db)).select_from(ranked)
    ).one()
    if n < 2 or not saa or not sbb:
        return int(n), None
    return int(n), float(sab) / math.sqrt(float(saa) * float(sbb))


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
    shared, rho = spearman_in_database(session, a, b, query_set)
    overlap: dict[str, Any] = {}
    union: set[str] = set()
    for kind in ("helpful", "harmful"):
        top_a, top_b = _top_ids(session, a, query_set, kind, top), _top_ids(session, b, query_set, kind, top)
        both = set(top_a) & set(top_b)
        union |= set(top_a) | set(top_b)
        overlap[kind] = {"shared": len(both), "of": max(len(top_a), len(top_b)), "share": _share(both, top_a, top_b)}
    top_shared, top_rho = spearman_in_database(session, a, b, query_set, union)
    rows = shared_rows(a, b, query_set).subquery()
    differing = session.execute(
        select(rows).order_by(func.abs(rows.c.total_b - rows.c.total_a).desc(), rows.c.example_id).limit(differ)
    ).all()
    return {
        "a": a.id,
        "b": b.id,
        "examples_a": _count(session, a, query_set),
        "examples_b": _count(session, b, query_set),
        "shared_examples": shared,
        "top": top,
        "overlap": overlap,
        "spearman_all": rho,
        "spearman_top": top_rho,
        "top_union_shared": top_shared,
        "differences": [
            {"example_id": e, "total_a": ta, "total_b": tb, "difference": tb - ta} for e, ta, tb in differing
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
