"""Spearman's rank correlation of the comparison page against scipy, ties and edge cases included."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from server.services.compare import average_ranks, spearman


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_spearman_equal_scipy_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 7, size=200).astype(np.float64)  # many ties
    b = a + rng.normal(size=200)
    assert np.array_equal(average_ranks(a), rankdata(a))
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(b, -b) == pytest.approx(-1.0)


def test_spearman_is_none_where_undefined() -> None:
    assert spearman(np.array([1.0]), np.array([2.0])) is None
    assert spearman(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])) is None


def test_spearman_in_the_database_equals_scipy_with_ties() -> None:
    """The database's rank correlation (window functions, on SQLite here; PostgreSQL in test_compare_export.py)
    over the examples both jobs scored, with many tied totals and examples only one job has."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from server.db.models import Base, ExampleTotal, Job, Project, Run
    from server.services.compare import spearman_in_database

    rng = np.random.default_rng(7)
    a_totals = rng.integers(0, 9, size=300).astype(np.float64)
    b_totals = a_totals + rng.integers(-3, 4, size=300)
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(project := Project(name="p"))
        session.flush()
        jobs = []
        for name, totals, ids in (("a", a_totals, range(300)), ("b", b_totals, range(290))):  # b lacks the last 10
            session.add(run := Run(project_id=project.id, name=name))
            session.flush()
            session.add(job := Job(run_id=run.id))
            session.flush()
            session.add_all(
                ExampleTotal(job_id=job.id, query_set="val", example_id=str(i), total=float(totals[i]), occurrences=1)
                for i in ids
            )
            jobs.append(job)
        session.flush()
        shared, rho = spearman_in_database(session, jobs[0], jobs[1], "val")
    assert shared == 290
    assert rho == pytest.approx(spearmanr(a_totals[:290], b_totals[:290]).statistic, abs=1e-12)
