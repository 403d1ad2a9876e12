"""Ad-hoc queries: projected test gradients posted for a finished job, scored by a worker against the
job's stored embeddings. Vectors go to storage as .npy; the database holds only the answer."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from server.db.models import AdhocQuery, Job, Run
from server.db.states import JobStatus

__all__ = ["AdhocQuery", "create_query", "get_query", "layer_dims", "public"]
from server.errors import BadRequest, Conflict, NotFound
from server.storage import Storage, adhoc_query_key
from server.tasks import ADHOC_QUERY, enqueue_after_commit

MAX_QUERIES = 256
MAX_ANSWER_ROWS = 10_000  # queries x top_k, per kind: the answer is stored and returned whole


def layer_dims(run: Run) -> list[tuple[str, int]]:
    """(layer name, projected size) in manifest order (the run's manifest was validated on upload)."""
    ranks = run.rank_manifests
    return [(layer.name, layer.dim) for layer in ranks[0].layers] if ranks else []


def create_query(
    session: Session, *, job: Job, run: Run, gradients: list[dict[str, list[float]]], top_k: int, storage: Storage
) -> AdhocQuery:
    """Check the vectors against the run's layers, store them, and queue the scoring task."""
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"job {job.id} is {job.status}; ad-hoc queries need a succeeded job")
    if job.results is None or not job.results.save_embeddings:
        raise Conflict(f"job {job.id} did not keep its embeddings")
    if not 1 <= len(gradients) <= MAX_QUERIES:
        raise BadRequest(f"send between 1 and {MAX_QUERIES} gradients, got {len(gradients)}")
    if len(gradients) * top_k > MAX_ANSWER_ROWS:
        raise BadRequest(
            f"{len(gradients)} queries x top_k {top_k} would answer {2 * len(gradients) * top_k} rows; the limit is "
            f"{2 * MAX_ANSWER_ROWS} (helpful and harmful): ask for fewer queries or a smaller top_k"
        )
    dims = layer_dims(run)
    matrix = np.zeros((len(gradients), sum(d for _, d in dims)), dtype=np.float32)
    for q, gradient in enumerate(gradients):
        unknown = sorted(set(gradient) - {name for name, _ in dims})
        if unknown:
            raise BadRequest(f"gradient {q}: unknown layer(s) {unknown}; the run tracks {[n for n, _ in dims]}")
        offset = 0
        for name, dim in dims:
            values = gradient.get(name)
            if values is None:
                raise BadRequest(f"gradient {q}: layer {name!r} is missing (use dvemb.project_model_gradient)")
            if len(values) != dim:
                raise BadRequest(
                    f"gradient {q}: layer {name!r} has {len(values)} values, the run's projection has {dim}"
                )
            matrix[q, offset : offset + dim] = values
            offset += dim
    if not np.isfinite(matrix).all():
        raise BadRequest("gradients hold NaN or infinite values")
    query = AdhocQuery(job_id=job.id, num_queries=len(gradients), top_k=top_k)
    session.add(query)
    session.flush()
    buffer = io.BytesIO()
    np.save(buffer, matrix)
    storage.write_bytes(adhoc_query_key(job.run_id, job.id, query.id), buffer.getvalue())
    enqueue_after_commit(session, ADHOC_QUERY, query.id)
    return query


def get_query(session: Session, *, project_id: int, query_id: int) -> AdhocQuery:
    query = session.get(AdhocQuery, query_id)
    job = session.get(Job, query.job_id) if query is not None else None
    run = session.get(Run, job.run_id) if job is not None else None
    if query is None or run is None or run.project_id != project_id:
        raise NotFound(f"query {query_id} not found")
    return query


def public(query: AdhocQuery) -> dict[str, Any]:
    return {
        "id": query.id,
        "job_id": query.job_id,
        "status": query.status,
        "num_queries": query.num_queries,
        "top_k": query.top_k,
        "result": query.result,
        "error": query.error,
    }
