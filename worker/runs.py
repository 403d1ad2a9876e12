"""What the tasks do: validate an uploaded file with the core reader; compute a job with the core engine
and store its aggregates. Both are idempotent: run twice, they leave the same rows."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, func, insert, literal, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dvemb.engine import ComputeArguments, ComputeProgress, compute, load_results
from dvemb.engine.scoring import RunningTopK
from dvemb.errors import DvembError
from dvemb.formats import EMBEDDINGS, MANIFEST, is_manifest_name, manifest_names, phase_of, rank_manifest_name
from dvemb.reader import GradientLog, check_manifest_file
from server.db.models import AdhocQuery, CurvePoint, ExampleTotal, Job, LogFile, PhaseSummaryRow, Run, TopKRow
from server.db.session import session_factory
from server.db.states import FileStatus, JobStatus, QueryStatus, RunStatus, transition
from server.services.adhoc import query_path as adhoc_query_path
from server.services.runs import expected_files
from server.settings import get_settings
from server.storage import log_dir, part_path, results_dir, staging_dir
from server.tasks import VALIDATE_FILE, enqueue_after_commit, sender


class JobCancelled(Exception):
    """The job was cancelled through the API while computing."""


# -- validation ------------------------------------------------------------------------------------


def run_validate_file(file_id: int) -> None:
    """Validate one received file; move it into the run's log if valid, reject it (and its bytes) if not."""
    storage = get_settings().storage
    with session_factory()() as session:
        # Claim the file: of two tasks for it (a re-delivery, a re-trigger), only one validates.
        upload = session.get(LogFile, file_id)
        claimed = upload is not None and transition(session, upload, FileStatus.VALIDATING)
        session.commit()
        if not claimed:
            return
        assert upload is not None
        run = session.get(Run, upload.run_id)
        assert run is not None
        part = part_path(storage, run.id, upload.upload_id)
        staging = staging_dir(storage, run.id)
        try:
            if is_manifest_name(upload.name):
                _accept_manifest(session, run, upload, part)
            else:
                if _staged_manifests(staging) is None:
                    _wait_for_manifest(session, upload, staging)
                    return
                GradientLog(staging).validate_file(upload.name, part)
                _publish(part, log_dir(storage, run.id) / upload.name)
        except Exception as exc:  # DvembError explains itself; anything else is still this file's fault
            problem = str(exc) if isinstance(exc, DvembError) else f"could not be read ({type(exc).__name__}: {exc})"
            transition(session, upload, FileStatus.REJECTED, error=problem.replace(str(part), upload.name))
            part.unlink(missing_ok=True)  # nothing of an invalid file stays
            session.commit()
            return
        transition(session, upload, FileStatus.READY, error=None)
        # Concurrent validators of one run serialise on the run row (Postgres); sizes add up in SQL.
        session.execute(update(Run).where(Run.id == run.id).values(size_bytes=Run.size_bytes + upload.size_bytes))
        locked = session.get(Run, run.id, with_for_update=True, populate_existing=True)
        assert locked is not None
        _update_run(session, locked)
        session.commit()
    _settle_run(upload.run_id)


def _settle_run(run_id: int) -> None:
    """A second look in a fresh transaction: the run is ready once every file it lists is, even when the
    validator that marked the last file could not see another file's commit (SQLite has no row locks)."""
    with session_factory()() as session:
        run = session.get(Run, run_id, with_for_update=True)
        if run is None or run.status != RunStatus.UPLOADING:
            return
        if _all_files_ready(session, run):
            transition(session, run, RunStatus.READY)
            session.commit()


def _wait_for_manifest(session: Session, upload: LogFile, staging: Any) -> None:
    transition(session, upload, FileStatus.RECEIVED, error="waiting for the manifest(s) to be uploaded and validated")
    session.commit()
    if _staged_manifests(staging) is not None:  # the manifest arrived meanwhile: its re-trigger may have missed us
        sender().send_task(VALIDATE_FILE, args=[upload.id])


def _staged_manifests(staging: Any) -> list[dict[str, Any]] | None:
    main = staging / MANIFEST
    if not main.exists():
        return None
    world = int(json.loads(main.read_text())["world_size"])
    paths = [staging / name for name in manifest_names(world)]
    return [json.loads(p.read_text()) for p in paths] if all(p.exists() for p in paths) else None


def _accept_manifest(session: Session, run: Run, upload: LogFile, part: Any) -> None:
    manifest = check_manifest_file(part)
    expected = rank_manifest_name(int(manifest["rank"]))
    if upload.name != expected:
        raise DvembError(f"{upload.name} holds the manifest of rank {manifest['rank']}; upload it as {expected}")
    storage = get_settings().storage
    staged = staging_dir(storage, run.id) / upload.name
    shutil.copyfile(part, staged)
    _publish(part, log_dir(storage, run.id) / upload.name)
    manifests = _staged_manifests(staging_dir(storage, run.id))
    if manifests is not None:
        run.manifest = {"ranks": manifests}
        run.num_steps = min((int(m["shards"][-1]["last_step"]) + 1 if m["shards"] else 0) for m in manifests)
        # Files that arrived before the manifest wait for it: validate them now.
        waiting = session.scalars(
            select(LogFile.id).where(
                LogFile.run_id == run.id, LogFile.status == FileStatus.RECEIVED, LogFile.id != upload.id
            )
        ).all()
        session.info.setdefault("after_commit_tasks", []).extend(waiting)


def _publish(part: Any, final: Any) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)


def _all_files_ready(session: Session, run: Run) -> bool:
    """Every file the run's manifests list has been validated."""
    ready = set(
        session.scalars(select(LogFile.name).where(LogFile.run_id == run.id, LogFile.status == FileStatus.READY)).all()
    )
    expected = expected_files(run)
    return bool(expected) and all(name in ready for name in expected)


def _update_run(session: Session, run: Run) -> None:
    transition(session, run, RunStatus.READY if _all_files_ready(session, run) else RunStatus.UPLOADING)
    for file_id in session.info.pop("after_commit_tasks", []):
        enqueue_after_commit(session, VALIDATE_FILE, file_id)


# -- computation -----------------------------------------------------------------------------------


def run_compute(job_id: int) -> None:
    """Compute a job (resuming the engine's checkpoint after a crash) and store its aggregates."""
    storage = get_settings().storage
    factory = session_factory()
    with factory() as session:
        now = dt.datetime.now(dt.UTC)
        # Claim the job conditionally: a cancel committed after we would have read the row must not be
        # overwritten by a plain write of 'running' (the job would then run to 'succeeded').
        job = session.get(Job, job_id)
        claimed = job is not None and transition(
            session,
            job,
            JobStatus.RUNNING,
            only_from=(JobStatus.QUEUED, JobStatus.RUNNING),  # running: a lost worker's task, redelivered
            attempts=Job.attempts + 1,
            error=None,
            started_at=func.coalesce(Job.started_at, literal(now, Job.__table__.c.started_at.type)),
        )
        session.commit()
        if not claimed:
            return  # done, cancelled or deleted: nothing to do (idempotent re-delivery)
        assert job is not None
        options, run_id = dict(job.options), int(job.run_id)
    out = results_dir(storage, run_id, job_id)
    args = ComputeArguments(
        curvature=options.get("curvature"),
        blocks=options.get("blocks", "auto"),
        top_k=int(options.get("top_k", 100)),
        query_sets=tuple(options["query_sets"]) if options.get("query_sets") else None,
        propagation=str(options.get("propagation", "auto")),
        second_moment=bool(options.get("second_moment", True)),
    )
    try:
        summary = compute(log_dir(storage, run_id), out, args, progress=_progress_writer(job_id))
        with factory() as session:
            _store_results(session, job_id, out, summary, _example_metadata(log_dir(storage, run_id)))
            # Conditional: a cancel that lands while the rows are written wins (the job's rows are then unused).
            job = session.get(Job, job_id)
            done = job is not None and transition(
                session,
                job,
                JobStatus.SUCCEEDED,
                summary=summary,
                progress=1.0,
                eta_seconds=0.0,
                finished_at=dt.datetime.now(dt.UTC),
            )
            if not done:
                session.rollback()
                return
            session.commit()
    except JobCancelled:
        return
    except OperationalError:
        raise  # transient (database): the task retries
    except Exception as exc:  # the job fails with the reason in words rather than staying 'running'
        problem = str(exc) if isinstance(exc, DvembError) else f"{type(exc).__name__}: {exc}"
        with factory() as session:
            job = session.get(Job, job_id)
            if job is not None:  # a cancel that came first stands
                transition(session, job, JobStatus.FAILED, error=problem, finished_at=dt.datetime.now(dt.UTC))
            session.commit()


def _progress_writer(job_id: int) -> Any:
    last = [0.0]

    def report(p: ComputeProgress) -> None:
        now = time.monotonic()
        if now - last[0] < 0.5 and p.steps_done < p.total_steps:
            return
        last[0] = now
        with session_factory()() as session:
            job = session.get(Job, job_id)
            progress = {"progress": p.fraction, "current_step": p.current_step, "eta_seconds": p.eta_s}
            if job is None or not transition(
                session, job, JobStatus.RUNNING, only_from=(JobStatus.RUNNING,), **progress
            ):
                raise JobCancelled
            session.commit()

    return report


def _example_metadata(directory: Any) -> dict[str, tuple[str | None, str | None]]:
    """Example id -> (label, source) from the log's example metadata files (validated on upload)."""
    meta: dict[str, tuple[str | None, str | None]] = {}
    for record in GradientLog(directory).iter_examples():
        label, source = record.get("label"), record.get("source")
        meta[str(record["id"])] = (
            None if label is None else str(label)[:255],
            None if source is None else str(source)[:255],
        )
    return meta


def _store_results(
    session: Session, job_id: int, out: Any, summary: dict[str, Any], meta: dict[str, tuple[str | None, str | None]]
) -> None:
    """Replace the job's aggregate rows with those of the results directory (idempotent)."""
    for model in (TopKRow, ExampleTotal, CurvePoint, PhaseSummaryRow):
        session.execute(delete(model).where(model.job_id == job_id))
    results = load_results(out)
    ids = [str(i) for i in results.example_ids]
    occurrences = np.bincount(results.example_index.numpy(), minlength=len(ids))
    for name, info in summary["query_sets"].items():
        bounds = info["phases"]["boundaries"]
        rows = []
        for query in [None, *range(info["num_queries"])]:
            for kind in ("helpful", "harmful"):
                for r in results.top(name, kind=kind, query=query, k=summary["arguments"]["top_k"]):
                    rows.append(
                        {
                            "job_id": job_id,
                            "query_set": name,
                            "query": -1 if query is None else query,
                            "kind": kind,
                            "rank": r["rank"],
                            "score": r["score"],
                            "row": r["row"],
                            "step": r["step"],
                            "epoch": r["epoch"],
                            "example_id": str(r["example_id"]),
                            "phase": phase_of(r["step"], bounds),
                            "label": meta.get(str(r["example_id"]), (None, None))[0],
                            "source": meta.get(str(r["example_id"]), (None, None))[1],
                        }
                    )
        _insert(session, TopKRow, rows)
        totals = results.totals(name).mean(axis=1)
        _insert(
            session,
            ExampleTotal,
            [
                {
                    "job_id": job_id,
                    "query_set": name,
                    "example_id": ids[i],
                    "total": float(totals[i]),
                    "occurrences": int(occurrences[i]),
                    "label": meta.get(ids[i], (None, None))[0],
                    "source": meta.get(ids[i], (None, None))[1],
                }
                for i in range(len(ids))
            ],
        )
        curve = results.curve(name)
        _insert(
            session,
            CurvePoint,
            [
                {
                    "job_id": job_id,
                    "query_set": name,
                    "step": int(curve["step"][t]),
                    "lr": float(curve["lr"][t]),
                    "mean": float(curve["mean"][t]),
                    "abs_sum": float(curve["abs_sum"][t]),
                    "mean_per_lr": _finite(curve["mean_per_lr"][t]),
                    "loss": _finite(curve["loss"][t]),
                }
                for t in range(len(curve["step"]))
            ],
        )
        session.add(PhaseSummaryRow(job_id=job_id, query_set=name, summary=info["phases"]))
    session.flush()


def _insert(session: Session, model: Any, rows: list[dict[str, Any]], chunk: int = 5000) -> None:
    for start in range(0, len(rows), chunk):
        session.execute(insert(model), rows[start : start + chunk])


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


# -- ad-hoc queries ---------------------------------------------------------------------------------


def run_adhoc_query(query_id: int, chunk_rows: int = 65536) -> None:
    """Score posted test gradients against a job's stored embeddings; keep the top-k of each."""
    storage = get_settings().storage
    with session_factory()() as session:
        query = session.get(AdhocQuery, query_id)
        if query is None or query.status != QueryStatus.QUEUED:
            return
        job = session.get(Job, query.job_id)
        assert job is not None
        out = results_dir(storage, job.run_id, job.id)
        try:
            vectors = torch.from_numpy(np.load(adhoc_query_path(storage, job, query.id)))  # (Q, D)
            embeddings = np.load(out / EMBEDDINGS, mmap_mode="r")  # (R, D)
        except OSError as exc:
            missing = f"the job's embeddings or the query's vectors are missing: {exc}"
            transition(session, query, QueryStatus.FAILED, error=missing)
            session.commit()
            return
        helpful = RunningTopK(vectors.shape[0], query.top_k, largest=True)
        harmful = RunningTopK(vectors.shape[0], query.top_k, largest=False)
        for start in range(0, embeddings.shape[0], chunk_rows):
            block = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + chunk_rows])).float()
            scores = block @ vectors.T  # (n, Q): positive = the occurrence helped this test example
            rows = torch.arange(start, start + block.shape[0])
            helpful.update(scores, rows)
            harmful.update(scores, rows)
        results = load_results(out)
        query.result = {
            "queries": [
                {
                    kind: [
                        _occurrence(results, int(r), float(v)) for v, r in zip(top.values[q], top.rows[q], strict=True)
                    ]
                    for kind, top in (("helpful", helpful), ("harmful", harmful))
                }
                for q in range(vectors.shape[0])
            ]
        }
        transition(session, query, QueryStatus.SUCCEEDED)
        session.commit()


def _occurrence(results: Any, row: int, score: float) -> dict[str, Any]:
    return {
        "score": score,
        "row": row,
        "step": int(results.row_step[row]),
        "epoch": int(results.epoch[row]),
        "example_id": str(results.example_ids[int(results.example_index[row])]),
    }
