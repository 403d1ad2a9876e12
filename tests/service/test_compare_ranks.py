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
