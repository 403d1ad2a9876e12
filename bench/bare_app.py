"""The peer of bench.request_path_bench: a bare FastAPI endpoint serving a fixed JSON body (the real top-k
answer, captured once and read from ``BARE_JSON``), through the same kind of sync handler and JSONResponse,
with no authentication, no database and no validation beyond the query string: the framework's floor."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

BODY: dict[str, Any] = json.loads(Path(os.environ["BARE_JSON"]).read_text())
app = FastAPI()


@app.get("/api/v1/jobs/{job_id}/top")
def top(job_id: int, query_set: str, kind: str = "helpful", query: int | None = None, limit: int = 20) -> JSONResponse:
    return JSONResponse(BODY)


@app.get("/api/v1/jobs/{job_id}/examples")
def examples(job_id: int, query_set: str, kind: str = "helpful", offset: int = 0, limit: int = 20) -> JSONResponse:
    return JSONResponse(BODY)
