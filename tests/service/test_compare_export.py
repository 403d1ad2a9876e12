"""Comparing two real runs through the API (checked against a naive reference built from each job's full
/examples list and scipy's Spearman), and the CSV / Parquet exports, whose rows equal the JSON endpoints'."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr
from service_harness import Api, make_token, record_log
from sqlalchemy import event
from sqlalchemy.engine import Engine

from dvemb.client import upload_log


def analysed(api: Api, token: str, tmp_path: Path, name: str, *, seed: int = 0, steps: int = 20) -> int:
    """The id of the succeeded job of a new run of a real log."""
    log = record_log(tmp_path / name, steps=steps, batch=8, shard_steps=10, seed=seed)
    result = upload_log(log, server=api.url, token=token, run_name=name, analyze=True)
    job = api.wait_job(result["job"]["id"])
    assert job["status"] == "succeeded", job
    return int(job["id"])


def all_examples(api: Api, job_id: int, kind: str = "helpful") -> list[dict[str, Any]]:
    got = api.get(f"/jobs/{job_id}/examples", params={"query_set": "val", "kind": kind, "limit": 1000}).json()
    assert got["count"] == len(got["data"])
    return list(got["data"])


def csv_rows(body: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body.decode())))


def parquet_rows(body: bytes) -> list[dict[str, Any]]:
    return list(pq.read_table(io.BytesIO(body)).to_pylist())


def test_two_runs_compared_equal_a_naive_reference(api: Api, token: str, tmp_path: Path) -> None:
    a, b = analysed(api, token, tmp_path, "seed-0", seed=0), analysed(api, token, tmp_path, "seed-1", seed=1, steps=30)
    listed = api.get("/compare/jobs").json()
    assert {j["job_id"] for j in listed["data"]} == {a, b} and listed["data"][0]["run_name"] == "seed-1"

    top, differ = 15, 7
    params = {"jobs": f"{a},{b}", "query_set": "val", "top": top, "differ": differ, "smooth": 1}
    found = api.get("/compare", params=params).json()
    assert [r["job_id"] for r in found["runs"]] == [a, b]
    assert [r["steps"] for r in found["runs"]] == [20, 30]
    (pair,) = found["pairs"]

    totals_a = {r["example_id"]: r["total"] for r in all_examples(api, a)}
    totals_b = {r["example_id"]: r["total"] for r in all_examples(api, b)}
    shared = sorted(set(totals_a) & set(totals_b))
    assert pair["shared_examples"] == len(shared) == 160  # the same example ids (0..159) in both runs
    for kind in ("helpful", "harmful"):
        top_a = [r["example_id"] for r in all_examples(api, a, kind)[:top]]
        top_b = [r["example_id"] for r in all_examples(api, b, kind)[:top]]
        assert pair["overlap"][kind]["shared"] == len(set(top_a) & set(top_b))
        assert pair["overlap"][kind]["share"] == pytest.approx(len(set(top_a) & set(top_b)) / top)
    rho = spearmanr([totals_a[e] for e in shared], [totals_b[e] for e in shared]).statistic
    assert pair["spearman_all"] == pytest.approx(rho, abs=1e-12)
    union = {
        r["example_id"] for job in (a, b) for kind in ("helpful", "harmful") for r in all_examples(api, job, kind)[:top]
    }
    both = sorted(union & set(shared))  # the top examples of either run that both runs saw
    rho_top = spearmanr([totals_a[e] for e in both], [totals_b[e] for e in both]).statistic
    assert pair["top_union_shared"] == len(both)
    assert pair["spearman_top"] == pytest.approx(rho_top, abs=1e-12)
    naive = sorted(shared, key=lambda e: (-abs(totals_b[e] - totals_a[e]), e))[:differ]
    assert [d["example_id"] for d in pair["differences"]] == naive
    assert [d["difference"] for d in pair["differences"]] == [totals_b[e] - totals_a[e] for e in naive]

    curves = found["figures"]["curves"]["data"]
    assert [len(t["x"]) for t in curves] == [20, 30]  # one point per step of each run
    assert curves[0]["x"][-1] == pytest.approx(95.0) and curves[1]["x"][-1] == pytest.approx(100 * 29 / 30)
    shares = found["figures"]["shares"]["data"]
    assert [t["y"] for t in shares] == [
        [r["phases"]["share_abs_per_lr"][p] for p in ("early", "basin", "late")] for r in found["runs"]
    ]

    # the comparison's tables as files: the same numbers
    diff = csv_rows(api.get("/compare/export/differences", params={**params, "format": "csv"}).content)
    assert [(r["example_id"], float(r["difference"])) for r in diff] == [
        (d["example_id"], d["difference"]) for d in pair["differences"]
    ]
    overlap = parquet_rows(api.get("/compare/export/overlap", params={**params, "format": "parquet"}).content)
    assert [(r["kind"], r["shared"], r["spearman_all"]) for r in overlap] == [
        (k, pair["overlap"][k]["shared"], pair["spearman_all"]) for k in ("helpful", "harmful")
    ]
    curve_rows = csv_rows(api.get("/compare/export/curves", params={**params, "format": "csv"}).content)
    assert len(curve_rows) == 50 and {int(r["job_id"]) for r in curve_rows} == {a, b}
    phases = parquet_rows(api.get("/compare/export/phases", params={**params, "format": "parquet"}).content)
    assert [(r["job_id"], r["phase"]) for r in phases] == [(j, p) for j in (a, b) for p in ("early", "basin", "late")]


def test_comparisons_refuse_bad_jobs_in_words(api: Api, token: str, tmp_path: Path) -> None:
    a = analysed(api, token, tmp_path, "only")
    for jobs, status, words in (
        (f"{a}", 400, "compare 2 to 8"),
        (f"{a},{a}", 400, "distinct"),
        ("1,x", 400, "job ids separated by commas"),
        (f"{a},{a + 1}", 404, "not found"),
    ):
        got = api.get("/compare", params={"jobs": jobs, "query_set": "val"})
        assert got.status_code == status and words in got.json()["detail"], got.json()
        assert set(got.json()) == {"error", "detail"}
    assert api.get("/compare", params={"jobs": f"{a},{a}", "query_set": "nope"}).status_code == 400
    other = Api(api.url, make_token("another-project"))
    try:
        assert other.get("/compare/jobs").json()["count"] == 0  # one project's jobs only
        assert other.get(f"/jobs/{a}/export/top", params={"query_set": "val"}).status_code == 404
        # The examples export authenticates in its one read: another project's job is not found there either.
        assert other.get(f"/jobs/{a}/export/examples", params={"query_set": "val"}).status_code == 404
        assert api.get(f"/jobs/{a}/export/examples", params={"query_set": "nope"}).status_code == 404
    finally:
        other.client.close()


def test_exports_have_the_api_rows(api: Api, token: str, tmp_path: Path) -> None:
    job = analysed(api, token, tmp_path, "export")
    filters = {"query_set": "val", "kind": "harmful", "phase": "late", "query": 2}
    pages, offset = [], 0
    while True:  # every page of the table the dashboard shows 10 rows at a time
        page = api.get(f"/jobs/{job}/top", params={**filters, "limit": 10, "offset": offset}).json()
        pages += page["data"]
        offset += 10
        if offset >= page["count"]:
            break
    assert len(pages) == page["count"] > 10
    as_csv = csv_rows(api.get(f"/jobs/{job}/export/top", params={**filters, "format": "csv"}).content)
    as_parquet = parquet_rows(api.get(f"/jobs/{job}/export/top", params={**filters, "format": "parquet"}).content)
    assert as_parquet == pages
    assert [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in pages] == as_csv
    assert [float(r["score"]) for r in as_csv] == [r["score"] for r in pages]  # every digit of a float

    ranked = all_examples(api, job, "harmful")
    got = parquet_rows(
        api.get(
            f"/jobs/{job}/export/examples", params={"query_set": "val", "kind": "harmful", "format": "parquet"}
        ).content
    )
    assert got == [{"rank": i, **r} for i, r in enumerate(ranked)]

    curve = api.get(f"/jobs/{job}/curve", params={"query_set": "val", "points": 20}).json()
    exported = parquet_rows(
        api.get(f"/jobs/{job}/export/curve", params={"query_set": "val", "format": "parquet", "smooth": 5}).content
    )
    assert [r["step"] for r in exported] == curve["step"] == list(range(20))  # full resolution: every step
    assert [r["mean_per_lr"] for r in exported] == curve["mean_per_lr"]
    figure = api.get(f"/jobs/{job}/figures/phase", params={"query_set": "val", "smooth": 5, "points": 20}).json()
    assert [r["smoothed"] for r in exported] == figure["data"][1]["y"]  # the plotted smoothed line
    phases = csv_rows(api.get(f"/jobs/{job}/export/phases", params={"query_set": "val"}).content)
    shown = api.get(f"/jobs/{job}/phases", params={"query_set": "val"}).json()
    assert [(r["phase"], float(r["share_abs_per_lr"])) for r in phases] == list(shown["share_abs_per_lr"].items())
    chosen = api.get(f"/jobs/{job}/selection", params={"query_set": "val", "share": 0.8, "windows": 2}).json()
    sel = parquet_rows(
        api.get(
            f"/jobs/{job}/export/selection",
            params={"query_set": "val", "share": 0.8, "windows": 2, "format": "parquet"},
        ).content
    )
    assert [(r["first_step"], r["last_step"], r["share_of_influence"]) for r in sel] == [
        (w["first"], w["last"], chosen[key]["share_of_influence"])
        for key in ("fewest_steps", "early_late", "early_only")
        for w in chosen[key]["windows"]
    ]
    example = ranked[0]["example_id"]
    history = api.get(f"/jobs/{job}/examples/{example}", params={"query_set": "val"}).json()["history"]
    got = parquet_rows(
        api.get(
            f"/jobs/{job}/export/example/{example}", params={"query_set": "val", "query": 3, "format": "parquet"}
        ).content
    )
    assert got == [
        {"step": h["step"], "epoch": h["epoch"], "phase": h["phase"], "influence": h["per_query"][3]} for h in history
    ]
    out_of_range = api.get(f"/jobs/{job}/export/example/{example}", params={"query_set": "val", "query": 6})
    assert out_of_range.status_code == 400 and "0–5" in out_of_range.json()["detail"]
    refused = api.get(f"/jobs/{job}/export/top", params={"query_set": "val", "format": "xlsx"})
    assert refused.status_code == 422 and "format" in refused.json()["detail"]


def test_api_docs_and_favicon_are_served_without_a_cdn(api: Api) -> None:
    docs = api.client.get(f"{api.url}/api/v1/docs")
    assert docs.status_code == 200 and "/static/swagger-ui/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text
    for path in ("/static/swagger-ui/swagger-ui-bundle.js", "/static/swagger-ui/swagger-ui.css", "/favicon.ico"):
        assert api.client.get(f"{api.url}{path}").status_code == 200, path


@contextmanager
def _token_lookups() -> Iterator[list[str]]:
    """The SQL statements that read the API tokens while the block runs (the API serves from this process)."""
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "api_tokens" in statement:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", note)


def test_an_export_authenticates_its_caller_once(api: Api, token: str, tmp_path: Path) -> None:
    """/export/top and /export/examples read the token once per request (the read's own statement, or the window's
    lookup), and a wrong token is still refused."""
    job = analysed(api, token, tmp_path, "export-auth")
    window = api.post(f"/jobs/{job}/windows", json={"query_set": "val", "step_min": 0, "step_max": 3})
    assert window.status_code == 200, window.text
    requests = {
        "top": (f"/jobs/{job}/export/top", {"query_set": "val", "kind": "helpful"}),
        "window": (
            f"/jobs/{job}/export/top",
            {"query_set": "val", "kind": "helpful", "window_id": window.json()["id"]},
        ),
        "examples": (f"/jobs/{job}/export/examples", {"query_set": "val", "kind": "helpful"}),
    }
    for name, (path, params) in requests.items():
        with _token_lookups() as seen:
            response = api.get(path, params=params)
        assert response.status_code == 200, (name, response.text)
        assert len(seen) == 1, (name, seen)
        stranger = api.client.get(path, params=params, headers={"Authorization": "Bearer nope"})
        assert stranger.status_code == 401, (name, stranger.text)
