"""The hot reads (issue 26.4): ``/top``, ``/examples`` and ``/curve`` answer with a prebuilt ``JSONResponse``
(one SQL statement each; bench/request_path_bench.py measured FastAPI's response validation as a large share of
their time), so FastAPI never checks them against their declared response models. This checks them instead, on a
real job over PostgreSQL: every answer validates against its model and carries exactly the model's fields, so a
client generated from the OpenAPI schema reads what the API sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter
from service_harness import Api, record_log

from dvemb.client import upload_log
from server.api.schemas import ExampleRank, ExamplesPublic, TopPublic, TopRow


def _exactly(model: type[BaseModel], answer: dict[str, Any]) -> None:
    model.model_validate(answer, strict=False)
    assert set(answer) == set(model.model_fields), (model.__name__, set(answer) ^ set(model.model_fields))


def test_the_hot_reads_match_their_declared_models(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "log", steps=8, batch=6)
    result = upload_log(log, server=api.url, token=token, run_name="contracts", analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded"
    query_set = "val"  # record_log's query set
    seen_rows = 0
    for params in (
        {"query_set": query_set, "kind": "helpful"},
        {"query_set": query_set, "kind": "harmful", "query": 0},
        {"query_set": query_set, "kind": "helpful", "phase": "late", "limit": 3},
    ):
        answer = api.get(f"/jobs/{job['id']}/top", params=params).json()
        _exactly(TopPublic, answer)
        for row in answer["data"]:
            _exactly(TopRow, row)
        seen_rows += len(answer["data"])
    assert seen_rows > 0
    examples = api.get(f"/jobs/{job['id']}/examples", params={"query_set": query_set, "limit": 5}).json()
    _exactly(ExamplesPublic, examples)
    assert examples["data"]
    for row in examples["data"]:
        _exactly(ExampleRank, row)
    curve = api.get(f"/jobs/{job['id']}/curve", params={"query_set": query_set, "points": 4}).json()
    TypeAdapter(dict[str, list[float | None]]).validate_python(curve)
    assert curve and all(len(values) == len(next(iter(curve.values()))) for values in curve.values())
