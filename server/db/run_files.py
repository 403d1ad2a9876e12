"""Which of the files a run's manifests list are not validated yet: the one definition of a complete run,
shared by the API (runs' ``missing_files``, starting a job) and the validator (a run becomes ready)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dvemb.formats import MANIFEST, listed_files
from server.db.models import LogFile, Run
from server.db.states import FileStatus

__all__ = ["missing_files"]


def missing_files(session: Session, *, run: Run) -> list[str]:
    """Listed files without a validated upload, in manifest order (``manifest.json`` until one is validated)."""
    ready = set(
        session.scalars(select(LogFile.name).where(LogFile.run_id == run.id, LogFile.status == FileStatus.READY))
    )
    expected = listed_files((run.manifest or {}).get("ranks", [])) or [MANIFEST]
    return [name for name in expected if name not in ready]
