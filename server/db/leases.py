"""Leases and locks: how a worker holds a row while it works on it, and the order in which rows are locked.

A worker that dies (killed, out of memory) must not leave its resource ``running`` or ``validating`` for ever.
Jobs (worker/computation.py) and uploaded files (worker/validation.py) share one mechanism, over a model with
``status``, ``attempts`` and ``lease_expires_at``:

* :func:`claim` moves the row from its waiting status to its working status, or takes it over in the working
  status once the lease has expired (its worker is gone), counting an attempt and starting a lease;
* :class:`Heartbeat` renews the lease while the work runs, from a thread of its own;
* :func:`holder` is the claim's token: a write conditional on it is lost once another attempt took the row;
* :func:`hold` locks the row for the rest of a transaction while the claim holds: anything done outside the
  database that only the holder may do (moving or deleting a file's bytes) comes after it, so a taken-over
  worker does nothing, and a worker taking the row over waits for that transaction;
* :func:`hand_back` gives an attempt back uncounted after a transient database error;
* :func:`requeue_expired` (the API's reconciler) moves rows whose lease expired back to their waiting status
  and queues their task; the attempt cap stops a row that kills every worker;
* :func:`task_deadline` and :func:`resend_overdue`: a row waiting for its task (a ``queued`` job, a ``received``
  file) keeps in ``lease_expires_at`` the time by which a worker should have claimed it; past it (the message was
  lost: a worker killed with the task prefetched, a broker restarted without its queue) the reconciler sends the
  task again and pushes the deadline back. Idempotent: :func:`claim` lets one delivery do the work.

**Lock order.** A transaction that writes a run's row and its files' rows locks the run's row first
(:func:`lock_run`), then the files. Inserting a file takes a key-share lock on the run's row (the foreign key);
a transaction that took that first and then updated the run deadlocked with a validator that had updated the
run and then locked it ``FOR UPDATE``. Every such path (an upload's creation, a validator's verdict, the run
becoming ready) now starts with :func:`lock_run`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, true, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import Run
from server.db.session import session_factory
from server.db.states import transition
from server.settings import get_settings
from server.tasks import enqueue_after_commit

__all__ = [
    "Heartbeat",
    "LeaseHeld",
    "claim",
    "hand_back",
    "hold",
    "holder",
    "lock_run",
    "requeue_expired",
    "resend_overdue",
    "task_deadline",
]

logger = logging.getLogger(__name__)

BATCH = 200  # rows re-queued per reconciler pass: a long backlog is worked off over several passes


class LeaseHeld(Exception):
    """The row is being worked on by a worker whose lease is alive; the task should come back in ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"another worker holds the lease; retry in {seconds:.0f} s")
        self.seconds = seconds


def lock_run(session: Session, run_id: int) -> Run | None:
    """Lock the run's row for the rest of the transaction (the first lock of any transaction that also writes
    the run's files; see the module docstring) and return it freshly read. ``FOR NO KEY UPDATE``: inserts of the
    run's jobs and files (key-share locks) go on. SQLite has no row locks: it serialises writers anyway."""
    return session.get(Run, run_id, with_for_update={"key_share": True}, populate_existing=True)


def claim(session: Session, row: Any, *, working: StrEnum, waiting: StrEnum, lease: float, **values: Any) -> bool:
    """Move ``row`` to ``working`` from ``waiting``, or take it over in ``working`` once its lease has expired (never
    while its worker holds it); counts an attempt and starts a lease of ``lease`` seconds. A compare-and-set
    (server/db/states.py): of two deliveries of one task, one claims. Clears ``error`` unless ``values`` sets it:
    a note from an earlier attempt ('waiting for the manifest') no longer says why the row waits."""
    model = type(row)
    now = dt.datetime.now(dt.UTC)
    return transition(
        session,
        row,
        working,
        only_from=(waiting, working),
        when=or_(model.status == waiting, model.lease_expires_at.is_(None), model.lease_expires_at < now),
        attempts=model.attempts + 1,
        lease_expires_at=now + dt.timedelta(seconds=lease),
        **{"error": None, **values},
    )


def holder(row: Any) -> ColumnElement[bool]:
    """This claim's token: true while no later attempt has claimed the row (a taken-over worker writes nothing)."""
    model = type(row)
    return model.attempts == row.attempts  # type: ignore[no-any-return]


def hold(session: Session, model: Any, row_id: int, working: StrEnum, mine: Any, lease: float) -> bool:
    """Whether this claim still holds the row; if so, the row is locked until the transaction ends (its lease
    renewed). A write rather than ``FOR UPDATE``: SQLite takes its write lock only then. Whoever takes the row
    over next (its ``claim`` is an update of the row) waits for this transaction and finds its outcome."""
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lease)
    renewed = session.execute(
        update(model).where(model.id == row_id, model.status == working, mine).values(lease_expires_at=expires)
    )
    return bool(renewed.rowcount == 1)  # type: ignore[attr-defined]


class Heartbeat:
    """Renews a claimed row's lease every third of its length while the work runs, from a thread of its own (a
    long shard or file gives no sign of life for a while); a dead worker stops renewing, so its row can be taken
    over once the lease expires."""

    def __init__(self, model: Any, row_id: int, working: StrEnum, lease: float, mine: Any) -> None:
        self.model, self.row_id, self.working, self.lease, self.mine = model, row_id, working, lease, mine
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{model.__tablename__}-{row_id}")

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(self.lease)

    def _beat(self) -> None:
        while not self.stopped.wait(self.lease / 3):
            try:
                with session_factory()() as session:
                    hold(session, self.model, self.row_id, self.working, self.mine, self.lease)
                    session.commit()
            except SQLAlchemyError:  # a database hiccup: try again at the next beat rather than stop renewing
                logger.warning(
                    "could not renew the lease of %s %s", self.model.__tablename__, self.row_id, exc_info=True
                )


def hand_back(factory: sessionmaker[Session], model: Any, row_id: int, working: StrEnum, mine: Any) -> None:
    """After a database error the task retries: give the claim back uncounted (attempts one less, a lease that has
    already expired, so that the task's retry takes the row at once). Expired rather than none: if the retry's
    message is lost, the reconciler re-queues the row (it skips rows without a lease); if both come, one claims
    and the other finds the lease held (:class:`LeaseHeld`) or the work done. Best effort: if the database is
    still unreachable, the lease expires and the attempt counts."""
    try:
        with factory() as session:
            session.execute(
                update(model)
                .where(model.id == row_id, model.status == working, mine)
                .values(attempts=model.attempts - 1, lease_expires_at=dt.datetime.now(dt.UTC))
            )
            session.commit()
    except SQLAlchemyError:
        logger.warning("could not hand %s %s back after a database error", model.__tablename__, row_id, exc_info=True)


def requeue_expired(
    factory: sessionmaker[Session], model: Any, *, working: StrEnum, waiting: StrEnum, task: str
) -> list[int]:
    """Move every row in ``working`` whose lease has expired (its worker is gone) back to ``waiting`` and queue
    ``task`` for it in the same transaction; returns their ids. Clears ``error``, as :func:`claim` does: the row
    is queued, whatever an earlier attempt noted."""
    now = dt.datetime.now(dt.UTC)
    with factory() as session:
        expired = session.scalars(
            select(model.id)
            .where(model.status == working, model.lease_expires_at.is_not(None), model.lease_expires_at < now)
            .limit(BATCH)
        ).all()
    moved = []
    for row_id in expired:
        with factory() as session:
            row = session.get(model, row_id)
            # Conditional on the lease being still expired: a worker that renewed it meanwhile keeps its row.
            if row is not None and transition(
                session,
                row,
                waiting,
                only_from=(working,),
                when=model.lease_expires_at < now,
                lease_expires_at=task_deadline(),
                error=None,
            ):
                enqueue_after_commit(session, task, row_id)
                moved.append(row_id)
            session.commit()
    return moved


def task_deadline() -> dt.datetime:
    """When a row whose task is being sent now must have been claimed by a worker (DVEMB_TASK_DEADLINE_SECONDS from
    now); kept in its ``lease_expires_at`` while it waits (``queued``, ``received``)."""
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=get_settings().task_deadline_seconds)


def resend_overdue(
    factory: sessionmaker[Session], model: Any, *, waiting: StrEnum, task: str, expects_task: Any = None
) -> list[int]:
    """Send ``task`` again for every row still ``waiting`` past its deadline (:func:`task_deadline`; a row written
    before deadlines were kept counts from its creation), whatever happened to its message; returns their ids.

    The next deadline is as far off as the row is old (at least DVEMB_TASK_DEADLINE_SECONDS): a job that waits for
    hours behind others in a busy queue is sent again a few times, not every pass. A task delivered twice does its
    work once (:func:`claim`). ``expects_task`` narrows the rows to those that wait for a task at all (a file
    waiting for its manifest has none: the manifest's validation sends it)."""
    now = dt.datetime.now(dt.UTC)
    base = dt.timedelta(seconds=get_settings().task_deadline_seconds)
    overdue = and_(
        model.status == waiting,
        or_(
            model.lease_expires_at < now,
            and_(model.lease_expires_at.is_(None), model.created_at < now - base),
        ),
        true() if expects_task is None else expects_task,
    )
    with factory() as session:
        found = session.scalars(select(model.id).where(overdue).order_by(model.id).limit(BATCH)).all()
    resent = []
    for row_id in found:
        with factory() as session:
            row = session.get(model, row_id)
            if row is None:
                continue
            created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=dt.UTC)
            again = now + max(base, now - created)
            # Conditional: a worker that claimed the row meanwhile (or another reconciler) keeps it.
            moved = session.execute(update(model).where(model.id == row_id, overdue).values(lease_expires_at=again))
            if moved.rowcount == 1:  # type: ignore[attr-defined]
                enqueue_after_commit(session, task, row_id)
                resent.append(row_id)
            session.commit()
    return resent
