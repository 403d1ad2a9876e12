"""The hot reads on SQLite, the embedded default's database (made by the migrations): examples ranked by total
influence, paged and filtered, equal a naive ranking in Python; pages past the end keep the count; another
project's token finds nothing. (Issue 25.5's faster statement used LATERAL, which SQLite does not have: `dvemb demo`
answered /examples with 503 and the PostgreSQL suite did not see it.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from server.db.models import ExampleTotal, Job, Run
from server.db.session import make_engine
from server.errors import NotFound, Unauthorized
from server.migrate import upgrade
from server.services import reads
from server.services.auth import create_token, get_or_create_project

EXAMPLES = 57
PHASES = {"boundaries": [1, 3], "ranges": {"early": [0, 0], "basin": [1, 2], "late": [3, 3]}}
SUMMARY = {
    "steps": 4,
    "occurrences": 2 * EXAMPLES,
    "examples": EXAMPLES,
    "arguments": {"top_k": 4},
    "query_sets": {"val": {"num_queries": 1, "query_ids": [0], "phases": PHASES}},
}


@pytest.fixture
def sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, int, list[dict[str, object]]]]:
    """(token, another project's token, job id, the job's example totals) in a fresh SQLite database, which the hot
    reads use within the test (the process's own engines, the in-process API's, are left alone)."""
    url = f"sqlite:///{tmp_path / 'dvemb.db'}"
    upgrade(url)
    engine = make_engine(url)
    monkeypatch.setattr(reads, "get_engine", lambda: engine)
    monkeypatch.setattr(reads, "get_read_engine", lambda: engine)
    rows = [
        {"example_id": f"ex{i:02d}", "total": float((i * 37) % 19 - 9), "occurrences": 2, "label": str(i % 3)}
        for i in range(EXAMPLES)
    ]  # ties in total (19 values over 57 examples): the order of ties is part of what is checked
    with Session(engine) as session:
        project = get_or_create_project(session, name="mine")
        token = create_token(session, project=project, name="t")
        other = create_token(session, project=get_or_create_project(session, name="other"), name="t")
        run = Run(project_id=project.id, name="r", status="ready")
        session.add(run)
        session.flush()
        job = Job(run_id=run.id, status="succeeded", options={}, summary=SUMMARY)
        session.add(job)
        session.flush()
        session.add_all(ExampleTotal(job_id=job.id, query_set="val", source="train", **r) for r in rows)  # type: ignore[arg-type]
        session.commit()
        job_id = job.id
    try:
        yield token, other, job_id, rows
    finally:
        engine.dispose()


def naive(rows: list[dict[str, object]], kind: str, label: str | None) -> list[str]:
    kept = [r for r in rows if label is None or r["label"] == label]
    ordered = sorted(kept, key=lambda r: (r["total"], r["example_id"]), reverse=kind == "helpful")
    return [str(r["example_id"]) for r in ordered]


@pytest.mark.parametrize("kind", ["helpful", "harmful"])
@pytest.mark.parametrize("label", [None, "1"])
def test_ranked_examples_on_sqlite_equal_a_naive_ranking(
    sqlite: tuple[str, str, int, list[dict[str, object]]], kind: str, label: str | None
) -> None:
    token, _, job_id, rows = sqlite
    expected = naive(rows, kind, label)
    got: list[str] = []
    for offset in range(0, len(expected) + 10, 10):  # the last page is past the end
        page, count = reads.ranked_examples(
            token, job_id, query_set="val", kind=kind, label=label, source=None, offset=offset, limit=10
        )
        assert count == len(expected)
        got += [str(r["example_id"]) for r in page]
    assert got == expected


def test_another_projects_token_finds_nothing_on_sqlite(sqlite: tuple[str, str, int, list[dict[str, object]]]) -> None:
    _, other, job_id, _ = sqlite
    with pytest.raises(NotFound):
        reads.ranked_examples(
            other, job_id, query_set="val", kind="helpful", label=None, source=None, offset=0, limit=5
        )
    with pytest.raises(Unauthorized):
        reads.ranked_examples(
            "nope", job_id, query_set="val", kind="helpful", label=None, source=None, offset=0, limit=5
        )
