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
* :class:`Lease` puts these together for a worker's task, in one ``with`` block: it claims the row (:func:`take`),
  enforces the attempt cap, gives the block the claim's token, beats for the block and hands the claim back after
  a transient error (jobs, files, replays and segments: worker/);
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
from collections.abc import Callable
from contextlib import AbstractContextManager
from enum import StrEnum
from time import monotonic
from types import TracebackType
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, true, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import Run
from server.db.session import session_factory
from server.db.states import transition
from server.settings import get_settings
from server.tasks import enqueue_after_commit

__all__ = [
    "Heartbeat",
    "Lease",
    "LeaseHeld",
    "claim",
    "hand_back",
    "hold",
    "holder",
    "lock_run",
    "requeue_expired",
    "resend_overdue",
    "take",
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


def take(
    session: Session,
    model: Any,
    key: int | ColumnElement[bool],
    *,
    working: StrEnum,
    waiting: StrEnum,
    lease: float,
    raise_if_held: bool = True,
    **values: Any,
) -> Any | None:
    """The row of ``model`` with id ``key`` (or the first one ``key``, a condition, finds), claimed (:func:`claim`,
    with ``values``) and committed; None when there is nothing to do (done, failed, cancelled, deleted).

    Raises:
        LeaseHeld: another worker holds the row and its lease is alive (the task should come back later); with
            ``raise_if_held=False`` the answer is None instead (the caller moves on to other work).
    """
    row = session.get(model, key) if isinstance(key, int) else session.scalars(select(model).where(key)).first()
    claimed = row is not None and claim(session, row, working=working, waiting=waiting, lease=lease, **values)
    session.commit()
    if claimed:
        return row
    if raise_if_held and row is not None and row.status == working:
        raise LeaseHeld(lease)  # delivered again while its worker works on it
    return None


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
        last = monotonic()
        while not self.stopped.wait(self.lease / 3):
            now = monotonic()
            if now - last > self.lease * 2 / 3:  # one renewal missed: a third more and the row is taken over
                logger.warning(
                    "the lease of %s %s was renewed %.1f s after the last (lease %g s): this process is starved of "
                    "CPU, and another worker takes the row over (counting an attempt) once a renewal comes later than "
                    "the lease; raise DVEMB_JOB_LEASE_SECONDS on a machine this loaded",
                    self.model.__tablename__,
                    self.row_id,
                    now - last,
                    self.lease,
                )
            last = now
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


class Lease:
    """One worker's claim of a row for a ``with`` block: claim, attempt cap, token, heartbeat, hand back.

    ``__enter__`` claims the row (:func:`take`, in a short session of its own, or in ``session``) and returns the
    lease, which is falsy when there is nothing to do: the row is done, failed, cancelled or deleted, or (with
    ``gave_up``) its attempts passed DVEMB_TASK_MAX_ATTEMPTS, each of its workers having died on it; the row is
    then failed by ``fail(session, row, mine, gave_up(cap))`` in the claim's session, in the caller's words.
    Otherwise :attr:`row` is the claimed row (read when claimed; detached unless ``session`` was given) and
    :attr:`mine` the claim's token (:func:`holder`): every write of the attempt is conditional on it. A
    :class:`Heartbeat` renews the lease for the block. When the block ends with a ``transient`` error (by default
    ``OperationalError``: a database hiccup, a lock timeout) and the task has ``transient_retries_left``, the
    claim is handed back uncounted (:func:`hand_back`; ``session`` is rolled back first: it may hold the row's
    lock); the error goes on either way, for the task to retry. The last retry leaves the lease to expire (the
    reconciler queues the row again, and that attempt counts), so an error that persists still ends.

    Usage::

        with Lease(Job, job_id, working=JobStatus.RUNNING, waiting=JobStatus.QUEUED, lease=30.0) as held:
            if not held:
                return
            ...  # writes conditional on held.mine

    Args:
        model, key: the row's model, and its id or a condition that finds it (a segment's row).
        working, waiting, lease, values: as for :func:`claim` (``values`` are written with the claim).
        transient_retries_left: how many more times the task will be retried after a ``transient`` error.
        transient: the errors after which the claim is handed back.
        gave_up: the failure message once the row's attempts passed the cap (given the cap); None: no cap.
        fail: records that failure, ``fail(session, row, mine, message)`` (required with ``gave_up``).
        raise_if_held: raise :class:`LeaseHeld` when a live worker holds the row (False: the lease is falsy).
        session: the session to claim in, kept by the caller for the block (else a short one of the lease's own).
        heartbeat: what renews the lease for the block, called as ``heartbeat(model, id, working, lease, mine)``.

    Raises:
        LeaseHeld: on entering, when another worker holds the row and its lease is alive (unless
            ``raise_if_held=False``).
    """

    def __init__(
        self,
        model: Any,
        key: int | ColumnElement[bool],
        *,
        working: StrEnum,
        waiting: StrEnum,
        lease: float,
        transient_retries_left: int = 0,
        transient: type[Exception] | tuple[type[Exception], ...] = OperationalError,
        gave_up: Callable[[int], str] | None = None,
        fail: Callable[[Session, Any, Any, str], None] | None = None,
        raise_if_held: bool = True,
        session: Session | None = None,
        heartbeat: Callable[..., AbstractContextManager[Any]] = Heartbeat,
        **values: Any,
    ) -> None:
        if gave_up is not None and fail is None:
            raise ValueError("an attempt cap (gave_up) needs fail to record the failure")
        self.model, self.key, self.working, self.waiting, self.lease = model, key, working, waiting, lease
        self.transient_retries_left, self.transient = transient_retries_left, transient
        self.gave_up, self.fail, self.raise_if_held = gave_up, fail, raise_if_held
        self.session, self.heartbeat, self.values = session, heartbeat, values
        self.row: Any = None
        self.mine: Any = None
        self.held = False
        self._beat: AbstractContextManager[Any] | None = None

    def __bool__(self) -> bool:
        """Whether the block has work to do: the row is claimed and under the attempt cap."""
        return self.held

    def __enter__(self) -> Lease:
        if self.session is not None:
            self._claim(self.session)
        else:
            with session_factory()() as session:
                self._claim(session)
        if self.held:
            self._beat = self.heartbeat(self.model, self.row.id, self.working, self.lease, self.mine)
            self._beat.__enter__()
        return self

    def _claim(self, session: Session) -> None:
        self.row = take(
            session,
            self.model,
            self.key,
            working=self.working,
            waiting=self.waiting,
            lease=self.lease,
            raise_if_held=self.raise_if_held,
            **self.values,
        )
        if self.row is None:
            return
        self.mine = holder(self.row)
        cap = get_settings().task_max_attempts
        if self.gave_up is not None and self.row.attempts > cap:  # each worker died on it (out of memory? killed?)
            assert self.fail is not None
            self.fail(session, self.row, self.mine, self.gave_up(cap))
            return
        self.held = True

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._beat is not None:
            self._beat.__exit__(kind, error, traceback)
            self._beat = None
        if self.held and isinstance(error, self.transient):
            if self.session is not None:
                self.session.rollback()
            if self.transient_retries_left > 0:
                hand_back(session_factory(), self.model, self.row.id, self.working, self.mine)


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
