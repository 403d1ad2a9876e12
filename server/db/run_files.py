"""Which of the files a run's manifests list are not validated yet: the one definition of a complete run,
shared by the API (runs' ``missing_files``, starting a job) and the validator (a run becomes ready)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dvemb.formats import listed_files, manifest_names
from server.db.models import LogFile, Run
from server.db.states import FileStatus

__all__ = ["missing_files"]


def missing_files(session: Session, *, run: Run) -> list[str]:
    """Listed files without a validated upload, in manifest order: ``manifest.json`` until one is validated, then
    every rank's manifest its ``world_size`` announces, until all of them are (then every file they list)."""
    ready = set(
        session.scalars(select(LogFile.name).where(LogFile.run_id == run.id, LogFile.status == FileStatus.READY))
    )
    recorded = run.manifest or {}
    expected = listed_files(recorded.get("ranks", [])) or manifest_names(int(recorded.get("world_size", 1)))
    return [name for name in expected if name not in ready]
