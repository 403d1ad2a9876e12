"""A job's agreement with an exact replay of its run (``dvemb trust``'s record, uploaded by the user: the replay
itself needs the training code, which stays on their side; docs/replay.md, "In the service")."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.api.schemas import ReplayAgreementIn
from server.db.agreements import store_agreement
from server.db.models import Job, ReplayAgreement
from server.errors import BadRequest, Conflict
from server.services import results

__all__ = ["agreements", "put_agreement"]


def put_agreement(session: Session, *, job: Job, query_set: str, record: ReplayAgreementIn) -> dict[str, Any]:
    """Store (or replace) the job's agreement on ``query_set`` once it is checked to be about this job's scores:
    the same query set, number of occurrences and steps, removal and propagation (409 naming what differs)."""
    if record.query_set != query_set:
        raise BadRequest(f"the record is about query set {record.query_set!r}, not {query_set!r}")
    results.check_query_set(job, query_set)
    summary = results.summary_of(job)
    expected = {
        "occurrences": (record.all.occurrences, summary.occurrences),
        "steps": (record.steps, summary.steps),
        "removal": (record.removal, summary.removal),
        "propagation": (record.propagation, summary.propagation),
    }
    differ = [
        f"{name} {mine!r} (this analysis: {theirs!r})" for name, (mine, theirs) in expected.items() if mine != theirs
    ]
    if differ:
        raise Conflict(
            "this replay agreement was measured on other scores than this analysis's: "
            + ", ".join(differ)
            + "; run `dvemb compute` with this analysis's options on the same log, replay it, then `dvemb trust`"
        )
    stored = record.model_dump(mode="json")
    store_agreement(session, job_id=job.id, query_set=query_set, record=stored)
    return stored


def agreements(session: Session, *, job: Job) -> dict[str, dict[str, Any]]:
    """The job's stored agreements, by query set."""
    rows = session.execute(
        select(ReplayAgreement.query_set, ReplayAgreement.record).where(ReplayAgreement.job_id == job.id)
    ).all()
    return {query_set: record for query_set, record in rows}
