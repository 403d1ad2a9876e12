"""Scoring posted test gradients (ad-hoc queries) against a job's stored embeddings."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from dvemb.engine import load_results
from dvemb.engine.scoring import RunningTopK
from dvemb.formats import EMBEDDINGS, EXAMPLES, OCCURRENCES, SUMMARY
from server.db.models import AdhocQuery, Job
from server.db.session import session_factory
from server.db.states import QueryStatus, transition
from server.storage import adhoc_query_key, get_storage, results_key

__all__ = ["run_adhoc_query"]


def run_adhoc_query(query_id: int, chunk_rows: int = 65536) -> None:
    """Score posted test gradients against a job's stored embeddings; keep the top-k of each."""
    storage = get_storage()
    with session_factory()() as session:
        query = session.get(AdhocQuery, query_id)
        if query is None or query.status != QueryStatus.QUEUED:
            return
        job = session.get(Job, query.job_id)
        assert job is not None
        try:
            vectors = np.load(io.BytesIO(storage.read_bytes(adhoc_query_key(job.run_id, job.id, query.id))))  # (Q, D)
            embeddings = np.load(storage.local_file(results_key(job.run_id, job.id, EMBEDDINGS)), mmap_mode="r")
            # The occurrence table and ids (local copies on a bucket; the scores files are not needed).
            with storage.local_copy(results_key(job.run_id, job.id), keep=_TABLES.__contains__) as out:
                results = load_results(out)
        except OSError as exc:
            missing = f"the job's embeddings or the query's vectors are missing: {storage.public_message(str(exc))}"
            transition(session, query, QueryStatus.FAILED, error=missing)
            session.commit()
            return
        helpful = RunningTopK(vectors.shape[0], query.top_k, largest=True)
        harmful = RunningTopK(vectors.shape[0], query.top_k, largest=False)
        queries = torch.from_numpy(vectors)  # (Q, D)
        for start in range(0, embeddings.shape[0], chunk_rows):
            block = torch.from_numpy(np.ascontiguousarray(embeddings[start : start + chunk_rows])).float()
            scores = block @ queries.T  # (n, Q): positive = the occurrence helped this test example
            rows = torch.arange(start, start + block.shape[0])
            helpful.update(scores, rows)
            harmful.update(scores, rows)
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


_TABLES = frozenset({SUMMARY, OCCURRENCES, EXAMPLES})  # what load_results reads at once


def _occurrence(results: Any, row: int, score: float) -> dict[str, Any]:
    return {
        "score": score,
        "row": row,
        "step": int(results.row_step[row]),
        "epoch": int(results.epoch[row]),
        "example_id": str(results.example_ids[int(results.example_index[row])]),
    }
