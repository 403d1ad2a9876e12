"""Scoring posted test gradients (ad-hoc queries) against a job's stored embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dvemb.engine import load_results
from dvemb.engine.scoring import RunningTopK
from dvemb.formats import EMBEDDINGS
from server.db.models import AdhocQuery, Job
from server.db.session import session_factory
from server.db.states import QueryStatus, transition
from server.settings import get_settings
from server.storage import adhoc_query_path, results_dir

__all__ = ["run_adhoc_query"]


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
            vectors = torch.from_numpy(np.load(adhoc_query_path(storage, job.run_id, job.id, query.id)))  # (Q, D)
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
