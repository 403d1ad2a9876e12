"""Analyses: start with options, live progress, cancel, retry; and their results."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from dvemb.formats import PhaseName
from server.api.deps import (
    DoneJobDep,
    IdPath,
    IntQuery,
    JobDep,
    Kind,
    LimitQuery,
    OffsetQuery,
    ProjectDep,
    SessionDep,
    StorageDep,
    bearer,
)
from server.api.schemas import (
    ExamplesPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    ReplayAgreementIn,
    ReplayCreate,
    ReplayPublic,
    ReplaysPublic,
    TopPublic,
)
from server.services import jobs as service
from server.services import reads, replay_agreements, replays, results, windows
from server.services.figures import example_metadata

router = APIRouter(tags=["jobs"])
# The hot reads (top-k rows, ranked examples, curve: one SQL statement each, server/services/reads.py), matched
# before every other route (server/main.py includes this router first).
hot_reads = APIRouter(tags=["jobs"])


@router.post("/runs/{run_id}/jobs", status_code=201)
def start_job(run_id: IdPath, body: JobCreate, session: SessionDep, project: ProjectDep) -> JobPublic:
    return JobPublic.model_validate(
        service.start_job(session, project=project, run_id=run_id, options=body.model_dump(exclude_none=True))
    )


@router.get("/runs/{run_id}/jobs")
def list_jobs(run_id: IdPath, session: SessionDep, project: ProjectDep) -> JobsPublic:
    found = service.list_jobs(session, project=project, run_id=run_id)
    return JobsPublic(data=[JobPublic.model_validate(j) for j in found], count=len(found))


@router.get("/jobs/{job_id}")
def get_job(job: JobDep) -> JobPublic:
    return JobPublic.model_validate(job)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job: JobDep, session: SessionDep) -> JobPublic:
    return JobPublic.model_validate(service.cancel_job(session, job=job))


@router.post("/jobs/{job_id}/retry")
def retry_job(job: JobDep, session: SessionDep) -> JobPublic:
    return JobPublic.model_validate(service.retry_job(session, job=job))


@router.get("/jobs/{job_id}/summary")
def job_summary(job: DoneJobDep, session: SessionDep) -> dict[str, Any]:
    """The results summary as the engine wrote it, less the log's path on the server's disk, with the agreements
    with an exact replay uploaded for it (``replay_agreements``, by query set; empty when none)."""
    summary = {k: v for k, v in (job.summary or {}).items() if k != "log"}
    return summary | {"replay_agreements": replay_agreements.agreements(session, job=job)}


@router.put("/jobs/{job_id}/replay-agreement/{query_set}")
def put_replay_agreement(
    query_set: Annotated[str, PathParam(max_length=64)], body: ReplayAgreementIn, job: DoneJobDep, session: SessionDep
) -> dict[str, Any]:
    """Attach ``dvemb trust``'s record (how far this run's fast scores agree with its exact replay on a query set;
    docs/replay.md) to the analysis, replacing an earlier one; 409 when it was measured on other scores."""
    return replay_agreements.put_agreement(session, job=job, query_set=query_set, record=body)


@router.post("/jobs/{job_id}/replays", status_code=202)
def start_replay(body: ReplayCreate, job: DoneJobDep, session: SessionDep) -> ReplayPublic:
    """Replay the job's run exactly on one of its query sets, on a worker, from the run's replay bundle
    (``replay-bundle.safetensors``, uploaded with the log); when it succeeds, its agreement with this job's scores
    is the set's replay agreement (docs/replay.md, "In the service"). 409 without a validated bundle."""
    options = body.model_dump(exclude={"query_set"}, exclude_none=True)
    return ReplayPublic.model_validate(
        replays.start_replay(session, job=job, query_set=body.query_set, options=options)
    )


@router.get("/jobs/{job_id}/replays")
def list_replays(job: DoneJobDep, session: SessionDep) -> ReplaysPublic:
    found = replays.list_replays(session, job=job)
    return ReplaysPublic(data=[ReplayPublic.model_validate(r) for r in found], count=len(found))


@router.get("/jobs/{job_id}/replays/{replay_id}")
def get_replay(replay_id: IdPath, job: DoneJobDep, session: SessionDep) -> ReplayPublic:
    return ReplayPublic.model_validate(replays.get_replay(session, job=job, replay_id=replay_id))


@router.get("/jobs/{job_id}/replay-agreement")
def get_replay_agreements(job: DoneJobDep, session: SessionDep) -> dict[str, Any]:
    """The agreements uploaded for the analysis, by query set."""
    return {"data": replay_agreements.agreements(session, job=job)}


class ExampleFilters(BaseModel):
    """The query parameters of the ranked examples, shared by GET /examples and its export."""

    query_set: str
    kind: Kind = "helpful"
    label: str | None = None
    source: str | None = None


class TopFilters(ExampleFilters):
    """The query parameters of the top occurrences, shared by GET /top and its export."""

    query: IntQuery = None
    step_min: IntQuery = None
    step_max: IntQuery = None
    phase: PhaseName | None = None
    epoch: IntQuery = None

    def given(self) -> dict[str, Any]:
        """The filters on a row's own columns (None: not filtered)."""
        return {"phase": self.phase, "epoch": self.epoch, "label": self.label, "source": self.source}


# Their fields are the keyword arguments of reads.ranked_examples and reads.top_rows.
ExampleFiltersQuery = Annotated[ExampleFilters, Query()]
TopFiltersQuery = Annotated[TopFilters, Query()]


@hot_reads.get("/jobs/{job_id}/top", response_model=TopPublic)
def top(
    job_id: IdPath,
    shown: TopFiltersQuery,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 20,
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Top occurrences; filters select among the job's stored top_k rows per query (raise top_k for deeper lists).
    One SQL statement answers it, authentication included (server/services/reads.py)."""
    facts, rows, count = reads.top_rows(bearer(authorization), job_id, offset=offset, limit=limit, **shown.model_dump())
    chosen = windows.chosen_overall(facts.top_k, shown.given(), shown.step_min, shown.step_max)
    return JSONResponse(
        {
            "query_set": shown.query_set,
            "query": shown.query,
            "kind": shown.kind,
            "propagation": facts.propagation,
            "approximations": facts.approximations,
            "chosen": chosen,
            "data": rows,
            "count": count,
        }
    )


@hot_reads.get("/jobs/{job_id}/examples", response_model=ExamplesPublic)
def ranked_examples(
    job_id: IdPath,
    shown: ExampleFiltersQuery,
    offset: OffsetQuery = 0,
    limit: LimitQuery = 20,
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Every example ranked by total influence (all epochs), exactly, with label and source filters (one SQL
    statement, authentication included)."""
    rows, count = reads.ranked_examples(bearer(authorization), job_id, offset=offset, limit=limit, **shown.model_dump())
    return JSONResponse({"data": rows, "count": count})


@hot_reads.get("/jobs/{job_id}/curve", response_model=dict[str, list[float | None]])
def curve(
    job_id: IdPath,
    query_set: str,
    points: Annotated[int, Query(ge=2, le=100_000)] = 1000,
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """The per-step curve in at most ``points`` bins (one SQL statement, authentication included)."""
    return JSONResponse(reads.curve(bearer(authorization), job_id, query_set=query_set, points=points))


@router.get("/jobs/{job_id}/phases")
def phases(job: DoneJobDep, session: SessionDep, query_set: str) -> dict[str, Any]:
    return results.phases(session, job=job, query_set=query_set)


ExampleIdQuery = Annotated[
    str,
    Query(min_length=1, description="the example's id, whatever characters it holds ('/' too), URL-encoded"),
]


@router.get("/jobs/{job_id}/example")
def example_by_id(
    job: DoneJobDep, example_id: ExampleIdQuery, session: SessionDep, storage: StorageDep, query_set: str
) -> dict[str, Any]:
    """One example's total and every occurrence, the id a query parameter: any id, a '/' or '..' in it included."""
    return example(job, example_id, session, storage, query_set)


@router.get("/jobs/{job_id}/examples/{example_id:path}")
def example(
    job: DoneJobDep, example_id: str, session: SessionDep, storage: StorageDep, query_set: str
) -> dict[str, Any]:
    """One example's total and every occurrence (the id in the path, '%2F' for '/'; ``GET /jobs/{id}/example?
    example_id=`` takes any id)."""
    history = results.example_history(session, job=job, query_set=query_set, example_id=example_id, storage=storage)
    history["metadata"] = example_metadata(job=job, example_id=example_id, storage=storage)
    return history
