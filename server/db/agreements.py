"""Storing a job's agreement with an exact replay (one row per query set, replaced by a newer one): shared by the
API (a record the user uploads, checked first: server/services/replay_agreements.py) and the workers (a replay
they computed themselves: worker/replays.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from server.db.models import ReplayAgreement

__all__ = ["store_agreement"]


def store_agreement(session: Session, *, job_id: int, query_set: str, record: dict[str, Any]) -> None:
    """Make ``record`` the job's agreement on ``query_set`` (an earlier one is replaced) in the session's
    transaction."""
    session.execute(
        delete(ReplayAgreement).where(ReplayAgreement.job_id == job_id, ReplayAgreement.query_set == query_set)
    )
    session.add(ReplayAgreement(job_id=job_id, query_set=query_set, record=record))
    session.flush()
