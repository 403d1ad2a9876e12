"""The leave-1%-out bank's scoring (bench/lds_bank.py): the LDS against a naive per-query Spearman."""

from __future__ import annotations

import numpy as np

from bench.lds_bank import QUICK, bootstrap_interval, lds_per_query, subset_predictions, subsets_of


def _naive_spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of average ranks, written out the long way."""

    def ranks(values: list[float]) -> list[float]:
        out = []
        for v in values:
            below = sum(1 for w in values if w < v)
            equal = sum(1 for w in values if w == v)
            out.append(below + (equal - 1) / 2)
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb)


def test_lds_matches_a_naive_spearman_with_ties() -> None:
    rng = np.random.default_rng(0)
    predicted = rng.normal(size=(30, 5))
    actual = predicted + rng.normal(scale=2.0, size=(30, 5))
    predicted[:6, 1] = 0.5  # ties
    actual[3:9, 2] = -1.0
    expected = [_naive_spearman(predicted[:, q].tolist(), actual[:, q].tolist()) for q in range(5)]
    np.testing.assert_allclose(lds_per_query(predicted, actual), expected, atol=1e-12)


def test_a_linear_ground_truth_scores_one_and_shuffled_predictions_about_zero() -> None:
    rng = np.random.default_rng(1)
    n, q = 400, 50
    scores = rng.normal(size=(n, q))  # (N, Q) per-example effects
    subsets = [sorted(rng.choice(n, size=4, replace=False).tolist()) for _ in range(200)]
    actual = subset_predictions(scores, subsets)  # the truth is exactly additive
    assert np.allclose(lds_per_query(subset_predictions(scores, subsets), actual), 1.0)
    shuffled = scores[rng.permutation(n)]
    lds = lds_per_query(subset_predictions(shuffled, subsets), actual)
    assert abs(lds.mean()) < 0.05
    low, high = bootstrap_interval(lds)
    assert low <= lds.mean() <= high


def test_constant_predictions_score_zero_and_subsets_are_stable() -> None:
    actual = np.arange(12.0).reshape(6, 2)
    assert np.all(lds_per_query(np.ones((6, 2)), actual) == 0.0)
    assert subsets_of(QUICK, 3) == subsets_of(QUICK, 5)[:3]  # adding subsets keeps the earlier ones
    assert all(len(s) == QUICK.removed == len(set(s)) for s in subsets_of(QUICK, 5))
