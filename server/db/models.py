"""SQLAlchemy models. The schema is made only by the Alembic migrations in migrations/.

Dense embeddings and gradients stay in storage; the database holds runs, files, jobs and the
aggregates the API serves: top-k rows, per-example totals, per-step curves and phase summaries.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dvemb.formats import Manifest, Summary
from server.db.states import FileStatus, JobStatus, QueryStatus, ReplayStatus, RunStatus, SegmentStatus
from server.db.status_column import StatusColumn


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Stable constraint names: migrations can drop and alter them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex: tokens are never stored
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_runs_project_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[RunStatus] = mapped_column(
        StatusColumn(RunStatus), default=RunStatus.CREATED
    )  # lifecycle: server/db/states.py
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    num_steps: Mapped[int | None] = mapped_column(Integer)
    num_examples: Mapped[int | None] = mapped_column(Integer)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    @property
    def rank_manifests(self) -> list[Manifest]:
        """Every rank's manifest, typed (dvemb.formats.Manifest), once the validator has accepted them all (empty
        before). The column keeps them as JSON: ``{"ranks": [...]}``, written by worker/validation.py."""
        return [Manifest.from_json(m) for m in (self.manifest or {}).get("ranks") or []]


class LogFile(Base):
    __tablename__ = "log_files"
    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_log_files_run_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    upload_id: Mapped[str] = mapped_column(String(64), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    # uploading -> received -> validating -> ready | rejected
    status: Mapped[FileStatus] = mapped_column(StatusColumn(FileStatus), default=FileStatus.UPLOADING)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # While validating: until when its validator holds it (renewed by a heartbeat; server/db/leases.py); while
    # received with a task sent: by when a validator should have claimed it (past it the task is sent again). And
    # how many validators have claimed it (the cap rejects a file that kills every validator).
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    status: Mapped[JobStatus] = mapped_column(StatusColumn(JobStatus), default=JobStatus.QUEUED)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    current_step: Mapped[int | None] = mapped_column(Integer)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    # While the worker writes a finished computation's rows: the share written (an estimate, at most 0.99 until
    # the job succeeds); None before.
    stored_fraction: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # While running: until when the worker computing it holds it (renewed by a heartbeat; server/db/leases.py);
    # while queued: by when a worker should have claimed it (past it the reconciler sends its task again).
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def results(self) -> Summary | None:
        """The typed summary of the job's results, once it has succeeded (dvemb.formats.Summary)."""
        return Summary.from_json(self.summary) if self.summary else None

    @property
    def propagation(self) -> str | None:
        """How the scores follow the optimizer (``exact SGD``, ``Adam``, ``SGD proxy``...), once computed."""
        results = self.results
        return results.propagation_label if results is not None else None

    @property
    def approximations(self) -> list[dict[str, str]] | None:
        """What the scores approximate beyond first order (``{kind, label, detail}``, largest first), once computed
        (None also when the summary predates the list)."""
        results = self.results
        return results.approximations_json() if results is not None else None


class JobSegment(Base):
    """One segment of a segmented job: who computes it (a lease, server/db/leases.py, as for jobs), and whether it is
    done (its two files are then in storage under the job's results, ``segments/``; worker/segments.py). The rows
    of a job are made by its own task when it plans the segments and removed once it has combined them."""

    __tablename__ = "job_segments"
    __table_args__ = (UniqueConstraint("job_id", "segment", name="uq_job_segments_segment"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    segment: Mapped[int] = mapped_column(Integer)  # its index in the plan
    plan: Mapped[str] = mapped_column(String(64))  # the plan's fingerprint (dvemb.engine.segmented.SegmentPlan)
    # waiting -> running -> done
    status: Mapped[SegmentStatus] = mapped_column(StatusColumn(SegmentStatus), default=SegmentStatus.WAITING)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    process: Mapped[str | None] = mapped_column(String(300))  # host:pid of the worker that holds or finished it
    error: Mapped[str | None] = mapped_column(Text)  # cleared by every claim (server/db/leases.claim)


class TopKRow(Base):
    __tablename__ = "topk_rows"
    __table_args__ = (
        UniqueConstraint("job_id", "query_set", "query", "kind", "rank", name="uq_topk_rows_position"),
        Index("ix_topk_rows_lookup", "job_id", "query_set", "query", "kind", "rank"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    query_set: Mapped[str] = mapped_column(String(64))
    query: Mapped[int] = mapped_column(Integer)  # -1: the whole query set
    kind: Mapped[str] = mapped_column(String(8))  # helpful | harmful
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    row: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    example_id: Mapped[str] = mapped_column(String(255))
    phase: Mapped[str] = mapped_column(String(8))
    label: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str | None] = mapped_column(String(255))


class ExampleTotal(Base):
    __tablename__ = "example_totals"
    __table_args__ = (
        UniqueConstraint("job_id", "query_set", "example_id", name="uq_example_totals_example"),
        # Ties by example_id in the order's direction: a page is read from the index either way (reads.py).
        Index("ix_example_totals_ranking", "job_id", "query_set", "total", "example_id"),
        Index("ix_example_totals_label", "job_id", "query_set", "label", "total", "example_id"),
        Index("ix_example_totals_source", "job_id", "query_set", "source", "total", "example_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    query_set: Mapped[str] = mapped_column(String(64))
    example_id: Mapped[str] = mapped_column(String(255))
    total: Mapped[float] = mapped_column(Float)
    occurrences: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str | None] = mapped_column(String(255))


class CurvePoint(Base):
    __tablename__ = "curve_points"
    __table_args__ = (UniqueConstraint("job_id", "query_set", "step", name="uq_curve_points_step"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    query_set: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float] = mapped_column(Float)
    mean: Mapped[float] = mapped_column(Float)
    mean_per_lr: Mapped[float | None] = mapped_column(Float)
    abs_sum: Mapped[float] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)


class PhaseSummaryRow(Base):
    __tablename__ = "phase_summaries"
    __table_args__ = (UniqueConstraint("job_id", "query_set", name="uq_phase_summaries_set"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    query_set: Mapped[str] = mapped_column(String(64))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)


class ReplayAgreement(Base):
    """How far a job's scores agree with an exact replay of the same run on one query set (``dvemb trust``'s
    record, uploaded by the user: the replay needs the training code, which stays with them; docs/replay.md)."""

    __tablename__ = "replay_agreements"
    __table_args__ = (UniqueConstraint("job_id", "query_set", name="uq_replay_agreements_set"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    query_set: Mapped[str] = mapped_column(String(64))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ReplayJob(Base):
    """An exact replay of a job's run on one query set, computed by a worker from the run's replay bundle
    (worker/replays.py; docs/replay.md, "In the service"); when it succeeds its agreement with the job's scores is
    stored as the set's :class:`ReplayAgreement`. Leased like a job (server/db/leases.py); a replay taken over after
    its worker died resumes from the checkpoints it left in storage."""

    __tablename__ = "replay_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    query_set: Mapped[str] = mapped_column(String(64))
    status: Mapped[ReplayStatus] = mapped_column(StatusColumn(ReplayStatus), default=ReplayStatus.QUEUED)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the replay's record, less its probe's rows
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class OutboxTask(Base):
    """A task waiting to be sent (the transactional outbox): written in the transaction that makes the task
    necessary, deleted once the broker has it. server/tasks.py sends it right after the commit; when the broker
    is down, server/reconciler.py sends it later (``due_at``: when it may be sent again; ``sends``: attempts,
    the token of a compare-and-set claim, so that two reconcilers never send the same entry at once)."""

    __tablename__ = "task_outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    args: Mapped[list[Any]] = mapped_column(JSON)
    due_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    sends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AdhocQuery(Base):
    """Test gradients posted for a job; the vectors are in storage, the answer in ``result``."""

    __tablename__ = "adhoc_queries"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[QueryStatus] = mapped_column(StatusColumn(QueryStatus), default=QueryStatus.QUEUED)
    num_queries: Mapped[int] = mapped_column(Integer)
    top_k: Mapped[int] = mapped_column(Integer)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
