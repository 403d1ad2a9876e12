"""Runs and their files."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from server.db.models import LogFile, Project, Run
from server.errors import Conflict, NotFound
from server.storage import Storage, run_key


def get_run(session: Session, *, project: Project, run_id: int) -> Run:
    """The run, if it belongs to ``project``; another project's run is as absent as a missing one."""
    run = session.get(Run, run_id)
    if run is None or run.project_id != project.id:
        raise NotFound(f"run {run_id} not found")
    return run


def create_run(session: Session, *, project: Project, name: str) -> Run:
    run = Run(project_id=project.id, name=name)
    session.add(run)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a run named {name!r} already exists in this project") from None
    return run


def list_runs(
    session: Session, *, project: Project, search: str | None, offset: int, limit: int
) -> tuple[list[Run], int]:
    where = [Run.project_id == project.id]
    if search:
        # A substring, not a pattern: % and _ in the search match themselves.
        where.append(Run.name.icontains(search, autoescape=True))
    count = session.scalar(select(func.count()).select_from(Run).where(*where)) or 0
    # A run's manifest (up to 16 MiB of JSON per rank) is not shown in a listing: not read either (raiseload:
    # touching it would be a bug, not a silent load per row).
    query = select(Run).where(*where).options(defer(Run.manifest, raiseload=True))
    runs = session.scalars(query.order_by(Run.created_at.desc(), Run.id.desc()).offset(offset).limit(limit)).all()
    return list(runs), count


def run_files(session: Session, *, run: Run) -> list[LogFile]:
    return list(session.scalars(select(LogFile).where(LogFile.run_id == run.id).order_by(LogFile.name)).all())


def delete_run(session: Session, *, run: Run, storage: Storage) -> None:
    """Delete the run's rows now and its files once the deletion is committed."""
    session.delete(run)
    session.flush()
    session.info.setdefault("after_commit", []).append(lambda: storage.delete_prefix(run_key(run.id)))
