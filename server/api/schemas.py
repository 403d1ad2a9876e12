"""Request and response bodies."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from dvemb.formats.statuses import FileStatus, JobStatus, ReplayStatus, RunStatus
from server.settings import get_settings


class RunCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")


class RunPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    status: RunStatus
    size_bytes: int
    num_steps: int | None
    num_examples: int | None
    created_at: dt.datetime


class RunsPublic(BaseModel):
    data: list[RunPublic]
    count: int


class LogFilePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    upload_id: str
    size_bytes: int
    offset: int
    status: FileStatus
    error: str | None


class RunDetail(RunPublic):
    files: list[LogFilePublic]
    missing_files: list[str]


class JobCreate(BaseModel):
    """Options of an analysis; an option left out takes the engine's default (dvemb.engine.ComputeArguments:
    the log's curvature, blocks "auto", every query set, top_k 100, propagation "auto", second_moment on)."""

    curvature: Literal["empirical", "ggn"] | None = None
    blocks: Literal["auto", "layer", "full"] | None = None
    query_sets: list[str] | None = None
    top_k: int | None = Field(default=None, ge=1, le=1000)
    propagation: Literal["auto", "optimizer", "sgd-proxy"] | None = None
    second_moment: bool | None = None
    second_moment_lifted: bool | None = Field(
        default=None,
        description="Adam: carry the second-moment term of small projected layers over their own coordinates; "
        "default: while its states hold at most 16x the recursion's own (docs/optimizers.md section 3)",
    )
    segments: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="split training into this many segments, computed in parallel by the workers and combined "
        "exactly; default: the deployment's DVEMB_COMPUTE_WORKERS",
    )


class ApproximationPublic(BaseModel):
    """One approximation the scores carry beyond first order (docs/results.md, "Approximations")."""

    kind: str = Field(description='a stable key, e.g. "random-projection", "curvature-empirical"')
    label: str = Field(description="a few words for a display")
    detail: str = Field(description="what it means for the scores and how to avoid it")


_APPROXIMATIONS = (
    "every approximation the scores carry beyond first order, largest first (empty: none); set when done "
    "(null also for results computed before dvemb listed them)"
)


def job_stage(
    status: str, progress: float, current_step: int | None, lease_expires_at: dt.datetime | None = None
) -> str:
    """What a job is doing, in the words the dashboard shows (see :class:`JobPublic`'s ``stage``)."""
    if status != "running":
        return status
    if worker_silent(lease_expires_at):
        return "worker not responding"
    if progress >= 1.0:
        return "storing results"  # the engine has reported its last step: the worker writes the rows
    if progress <= 0.0 and current_step is None:
        return "reading the log"
    return "computing"


def worker_silent(lease_expires_at: dt.datetime | None) -> bool:
    """True when a running job's worker has not renewed its lease for half the lease (it renews every third): it is
    probably gone, and the reconciler queues the job again when the lease expires."""
    if lease_expires_at is None:
        return False
    if lease_expires_at.tzinfo is None:  # SQLite returns naive datetimes (stored in UTC)
        lease_expires_at = lease_expires_at.replace(tzinfo=dt.UTC)
    left = (lease_expires_at - dt.datetime.now(dt.UTC)).total_seconds()
    return left < get_settings().job_lease_seconds / 2


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    run_id: int
    status: JobStatus
    options: dict[str, Any]
    progress: float
    current_step: int | None
    eta_seconds: float | None
    stored_fraction: float | None = Field(
        default=None,
        description="while 'storing results': the share of the job's rows written so far (an estimate, at most "
        "0.99 until the job succeeds); null before",
    )
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    propagation: str | None = Field(
        default=None, description="how the scores follow the optimizer (exact SGD, Adam, SGD proxy...); set when done"
    )
    approximations: list[ApproximationPublic] | None = Field(default=None, description=_APPROXIMATIONS)
    lease_expires_at: dt.datetime | None = Field(default=None, exclude=True)

    @computed_field(  # type: ignore[prop-decorator]
        description="what a job is doing: its status, or while running 'reading the log' (no progress reported "
        "yet), 'computing' (progress, current_step and eta_seconds count its work), 'storing results' (computed, "
        "its rows being written: stored_fraction says how far) or 'worker not responding' (no sign of its worker "
        "for half the job lease: it is queued again when the lease expires)"
    )
    @property
    def stage(self) -> str:
        return job_stage(self.status, self.progress, self.current_step, self.lease_expires_at)

    @model_validator(mode="after")
    def _eta_while_computing(self) -> JobPublic:
        """An estimate of the time left only while the job computes: none once it is storing its results,
        cancelled, failed or done (the worker's last estimate stays in the row)."""
        if self.stage != "computing":
            self.eta_seconds = None
        return self


class TopRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    rank: int
    score: float
    step: int
    epoch: int
    phase: str
    example_id: str
    label: str | None
    source: str | None


class ExampleRank(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    example_id: str
    total: float
    occurrences: int
    label: str | None
    source: str | None


class ExamplesPublic(BaseModel):
    data: list[ExampleRank]
    count: int


class TopPublic(BaseModel):
    query_set: str
    query: int | None
    kind: str
    propagation: str | None = Field(default=None, description="how these scores follow the optimizer")
    approximations: list[ApproximationPublic] | None = Field(default=None, description=_APPROXIMATIONS)
    chosen: str | None = Field(default=None, description="how the rows were chosen (what was kept, which filters)")
    data: list[TopRow]
    count: int


class WindowPublic(BaseModel):
    """A window of training whose top examples are ranked on their own (docs/dashboard.md)."""

    id: int
    query_set: str
    kind: Literal["phase", "tenth", "epoch", "range"]
    name: str
    step_min: int
    step_max: int
    epoch: int | None = Field(description="the epoch (occurrence number) it is limited to; null: every epoch")
    top_k: int
    occurrences: int | None = Field(description="occurrences in the window, once computed")
    status: Literal["queued", "succeeded", "failed"]
    error: str | None
    chosen: str = Field(description='how its rows are chosen, e.g. "top 100 of steps 0–99 (early phase), exact"')


class WindowsPublic(BaseModel):
    data: list[WindowPublic]
    count: int


class WindowCreate(BaseModel):
    query_set: str = Field(min_length=1, max_length=64)
    step_min: int = Field(ge=0, le=2**31 - 1)
    step_max: int = Field(ge=0, le=2**31 - 1)
    epoch: int | None = Field(default=None, ge=0, le=2**31 - 1, description="only this epoch's occurrences")
    wait_seconds: float = Field(default=10.0, ge=0, le=60, description="how long to wait for a computed answer")


class WindowTopPublic(TopPublic):
    window: WindowPublic


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class QueryCreate(BaseModel):
    gradients: list[dict[str, list[float]]] = Field(description="per query: layer name -> projected gradient")
    top_k: int = Field(default=10, ge=1, le=1000)
    wait_seconds: float = Field(default=10.0, ge=0, le=60)


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class AgreementIn(BaseModel):
    """Agreement of the fast scores with the replay over a set of occurrences (dvemb.replay.comparison.agreement)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    occurrences: int = Field(ge=0)
    spearman: float | None = Field(default=None, ge=-1, le=1)
    pearson: float | None = Field(default=None, ge=-1, le=1)
    top_k: int = Field(ge=0)
    top_helpful_overlap: float | None = Field(default=None, ge=0, le=1)
    top_harmful_overlap: float | None = Field(default=None, ge=0, le=1)


class PhaseAgreementIn(AgreementIn):
    steps: tuple[int, int]


class ReplayAgreementIn(BaseModel):
    """``dvemb trust``'s record (``trust-<set>.json``), as uploaded: what the dashboard shows next to the scores."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    format: Literal["dvemb-trust"]
    version: Literal[1]
    query_set: str = Field(min_length=1, max_length=64)
    removal: Literal["batch", "weight"]
    propagation: str | None = Field(default=None, max_length=32)
    steps: int | None = Field(default=None, ge=0)
    fingerprint: str | None = Field(default=None, max_length=128)
    all: AgreementIn
    phases: dict[Literal["early", "basin", "late"], PhaseAgreementIn] = Field(default_factory=dict)
    per_query_spearman: float | None = Field(default=None, ge=-1, le=1)
    replay_loss_gap: float | None = None
    first_order_predictable: bool | None = None
    first_order_verdict: Literal["predictable", "partly predictable", "not predictable"] | None = None


class ReplayCreate(BaseModel):
    """An exact replay of the job's run on one of its query sets, from the run's replay bundle (docs/replay.md)."""

    model_config = ConfigDict(extra="forbid")

    query_set: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    probe: int = Field(
        default=0, ge=0, le=32, description="occurrences whose removal is retrained (the linearity probe); 0: none"
    )
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="steps between kept states; default ceil(sqrt(steps))"
    )


class ReplayPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: int
    query_set: str
    status: ReplayStatus
    options: dict[str, Any]
    progress: float = Field(description="share of the replay done: its forward pass is the first half")
    summary: dict[str, Any] | None = Field(
        description="once succeeded: the replay's record (removal, steps, seconds, cost over training, loss gap, the "
        "probe's medians); its agreement with the job's scores is the set's replay agreement"
    )
    error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


class ReplaysPublic(BaseModel):
    data: list[ReplayPublic]
    count: int
