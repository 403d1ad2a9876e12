"""What FastAPI's response-model validation would add to the hot reads (issue 26.4: typed responses, or a measured
reason not to): the CPU of validating and serialising a page of ``/top`` and ``/examples`` against their declared
models (``TopPublic``, ``ExamplesPublic``), FastAPI's own ``serialize_response`` as a route with a
``response_model`` runs it, against the ``JSONResponse`` the routes return, in one process, interleaved.

Run from the repository root: ``.venv/bin/python -m bench.response_validation`` (writes the BENCHMARKS.md section
"Response validation on the hot reads"; ``--no-write`` prints it only). The API CPU a request costs end to end is in
"Request path" and "Request path: /examples" (bench/request_path_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from fastapi.routing import serialize_response
from fastapi.utils import create_model_field
from starlette.responses import JSONResponse

from bench.harness import measured_commit, provenance, replace_section
from server.api.schemas import ExamplesPublic, TopPublic

SECTION = "Response validation on the hot reads"
ROWS = 20  # a page as the dashboard asks for it


def _pages() -> dict[str, tuple[type, dict[str, Any]]]:
    top = [
        {
            "rank": i,
            "score": 0.0123456789 * (i + 1),
            "step": 10 * i,
            "epoch": 0,
            "phase": "late",
            "example_id": str(100_000 + i),
            "label": "7",
            "source": None,
        }
        for i in range(ROWS)
    ]
    approximations = [{"kind": "curvature-sampled", "label": "1 curvature row per example", "detail": "x" * 200}]
    examples = [
        {"example_id": str(100_000 + i), "total": 0.123456789 * i, "occurrences": 3, "label": "7", "source": None}
        for i in range(ROWS)
    ]
    return {
        "/top": (
            TopPublic,
            {
                "query_set": "val",
                "query": 2,
                "kind": "harmful",
                "propagation": "AdamW",
                "approximations": approximations,
                "chosen": None,
                "data": top,
                "count": 20_200,
            },
        ),
        "/examples": (ExamplesPublic, {"data": examples, "count": 100_000}),
    }


def _per_call(fn: Any, calls: int) -> float:
    started = time.process_time()
    fn(calls)
    return (time.process_time() - started) / calls


def measure(model: type, payload: dict[str, Any], calls: int, rounds: int) -> dict[str, float]:
    """CPU seconds per response: as the routes answer (``JSONResponse``) and through FastAPI's validation."""
    field = create_model_field(name="response", type_=model, mode="serialization")

    def plain(n: int) -> None:
        for _ in range(n):
            JSONResponse(payload)

    def validated(n: int) -> None:
        async def go() -> None:
            for _ in range(n):
                JSONResponse(await serialize_response(field=field, response_content=payload, is_coroutine=False))

        asyncio.run(go())

    plains, typed = [], []
    for _ in range(rounds):
        plains.append(_per_call(plain, calls))
        typed.append(_per_call(validated, calls))
    return {"json_response_ms": statistics.median(plains) * 1e3, "validated_ms": statistics.median(typed) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.time()
    results = {path: measure(model, payload, args.calls, args.rounds) for path, (model, payload) in _pages().items()}
    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `.venv/bin/python -m bench.response_validation` {provenance(commit=measured_commit())}, "
        f"{time.time() - started:.0f} s: CPU per response of a page of {ROWS} rows, median of {args.rounds} "
        f"interleaved rounds of {args.calls}. 'as answered': the `JSONResponse` the hot routes return; 'validated': "
        "FastAPI's `serialize_response` against the route's declared model (what a route returning the dict with "
        "its `response_model` runs, thread-pool hop included), then the `JSONResponse`.",
        "",
        "| endpoint | as answered, ms | validated, ms | added by validation, ms |",
        "|---|---:|---:|---:|",
    ]
    for path, r in results.items():
        added = r["validated_ms"] - r["json_response_ms"]
        lines.append(f"| `{path}` | {r['json_response_ms']:.3f} | {r['validated_ms']:.3f} | {added:.3f} |")
    lines += [
        "",
        "Reading: the hot reads answer with a `JSONResponse` and keep their `response_model` for the schema (a client "
        "is generated from it); `tests/service/test_hot_read_contracts.py` validates their answers against those "
        "models, so the contract holds without paying the validation per request. Set against the API CPU per "
        "request measured in 'Request path' and 'Request path: /examples', the added time is what validating every "
        "answer would cost.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
