"""Low-rank factors of per-coordinate matrices and their Kronecker sums under projection (dvemb.low_rank)."""

from __future__ import annotations

import torch

from dvemb.low_rank import low_rank_factors


def test_full_rank_factors_give_the_matrix_back() -> None:
    matrix = torch.randn(5, 7)
    left, right = low_rank_factors(matrix, 8)
    assert left.shape == (5, 5) and right.shape == (5, 7)
    assert (left.T @ right - matrix).abs().max() < 1e-12


def test_low_rank_factors_are_the_truncated_svd_and_leave_the_random_state_alone() -> None:
    """A matrix with a decaying spectrum: the randomised factors are as good as the truncated SVD, and the
    caller's generator (the training being recorded) draws the same numbers as without the call."""
    u, _ = torch.linalg.qr(torch.randn(60, 40))
    v, _ = torch.linalg.qr(torch.randn(50, 40))
    matrix = u @ torch.diag(0.5 ** torch.arange(40.0)) @ v.T
    state = torch.get_rng_state()
    left, right = low_rank_factors(matrix, 4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    best = torch.linalg.svdvals(matrix)[4:].norm()  # the error of the best rank-4 approximation
    assert (left.T @ right - matrix).norm() <= best * (1 + 1e-6)
