"""Spearman's rank correlation of the comparison page, computed by the database (window functions), against
scipy on PostgreSQL (the service's database) and SQLite (the embedded one): ties, examples only one job
scored, a subset of the examples (the top lists) and the cases where it is undefined."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from scipy.stats import spearmanr
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from server.db.models import Base, ExampleTotal, Job, Project, Run
from server.services.compare import spearman_in_database


@pytest.fixture(params=["postgresql", "sqlite"])
def session(request: pytest.FixtureRequest) -> Iterator[Session]:
    """A session on a database made by the migrations (PostgreSQL) or by the metadata (in-memory SQLite),
    rolled back after the test."""
    if request.param == "postgresql":
        request.getfixturevalue("service_env")
        from server.db.session import get_engine

        engine = get_engine()
    else:
        engine = create_engine("sqlite://")
        Base.metadata.create_all(engine)
    with Session(engine) as session:
        yield session
        session.rollback()


def two_jobs(session: Session, totals: list[np.ndarray], project_name: str = "ranks") -> list[Job]:
    """A job per array of totals, in a new project: example ``i`` has total ``totals[j][i]`` in job ``j``."""
    session.add(project := Project(name=project_name))
    session.flush()
    jobs = []
    for name, values in zip("ab", totals, strict=True):
        session.add(run := Run(project_id=project.id, name=name))
        session.flush()
        session.add(job := Job(run_id=run.id))
        session.flush()
        session.add_all(
            ExampleTotal(job_id=job.id, query_set="val", example_id=str(i), total=float(t), occurrences=1)
            for i, t in enumerate(values)
        )
        jobs.append(job)
    session.flush()
    return jobs


@pytest.mark.parametrize("seed", range(3))
def test_spearman_equals_scipy_with_ties(session: Session, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 9, size=300).astype(np.float64)  # many ties
    b = (a + rng.integers(-3, 4, size=300))[:290]  # b lacks the last 10 examples
    ja, jb = two_jobs(session, [a, b])
    shared, rho = spearman_in_database(session, ja, jb, "val")
    assert shared == 290
    assert rho == pytest.approx(spearmanr(a[:290], b).statistic, abs=1e-12)
    subset = [int(i) for i in rng.choice(300, size=60, replace=False)]  # like the union of the top lists
    kept = sorted(i for i in subset if i < 290)
    shared, rho = spearman_in_database(session, ja, jb, "val", {str(i) for i in subset})
    assert shared == len(kept)
    assert rho == pytest.approx(spearmanr(a[kept], b[kept]).statistic, abs=1e-12)
    _, reversed_rho = spearman_in_database(session, ja, two_jobs(session, [a, -a], "reversed")[1], "val")
    assert reversed_rho == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [
        ([1.0], [2.0], 1),  # one pair
        ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], 3),  # one side constant
        ([1.0, 2.0], [], 0),  # nothing shared
    ],
)
def test_spearman_is_none_where_undefined(session: Session, a: list[float], b: list[float], shared: int) -> None:
    ja, jb = two_jobs(session, [np.array(a), np.array(b)])
    assert spearman_in_database(session, ja, jb, "val") == (shared, None)
    assert spearman_in_database(session, ja, jb, "val", set()) == (0, None)
