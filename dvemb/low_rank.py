"""Low-rank factors of a layer's per-coordinate matrices, and the Kronecker sums they give under projection.

Adam's second-moment term multiplies a perturbation coordinate by coordinate by matrices shaped like the
layer's gradient (out_dim, in_dim): ``dv = nu * dgamma`` and ``dtheta += sigma * dv`` (docs/optimizers.md).
In a layer's Kronecker-projected coordinates (``P = P_out kron P_in``) the map closest to ``diag(vec A)`` is
``P^T diag(vec A) P``, and for ``A = sum_r a_r b_r^T`` it is exactly

    sum_r (P_out^T diag(a_r) P_out) kron (P_in^T diag(b_r) P_in),

R Kronecker products of two small matrices. The recorder keeps the top R singular pairs of ``A`` at every
step (:func:`low_rank_factors`: ``R (out_dim + in_dim)`` numbers, never the matrix); with R = min(out, in)
and orthonormal square bases the projected map is the unprojected one exactly.
"""

from __future__ import annotations

import torch

__all__ = ["kronecker_sum_factors", "low_rank_factors"]

_OVERSAMPLE = 8
_POWER_ITERATIONS = 2


def low_rank_factors(matrix: torch.Tensor, rank: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of a matrix: ``matrix ~ left^T right``.

    Exact (a full SVD) when ``rank >= min(matrix.shape)``; otherwise a randomised range finder with power
    iterations (Halko, Martinsson and Tropp 2011) from a private generator, so that the caller's random
    state, and with it the training being recorded, is untouched.

    Args:
        matrix: (out_dim, in_dim).
        rank: number of singular pairs kept (at least 1).
        seed: seed of the private generator of the randomised range finder.

    Returns:
        (R, out_dim) left factors (singular values included) and (R, in_dim) right factors, R = min(rank,
        out_dim, in_dim), in the matrix's dtype.
    """
    a = matrix.double()
    keep = min(rank, *a.shape)
    if keep == min(a.shape):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        generator = torch.Generator(device=a.device).manual_seed(seed)
        probe = torch.randn(a.shape[1], keep + _OVERSAMPLE, generator=generator, device=a.device, dtype=a.dtype)
        basis, _ = torch.linalg.qr(a @ probe)  # (out, k + p)
        for _ in range(_POWER_ITERATIONS):
            basis, _ = torch.linalg.qr(a @ (a.T @ basis))
        u_small, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
        u = basis @ u_small
    left = (u[:, :keep] * s[:keep]).T  # (R, out)
    return left.to(matrix.dtype).contiguous(), vh[:keep].to(matrix.dtype).contiguous()


def kronecker_sum_factors(
    left: torch.Tensor, right: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected map of ``diag(vec A)``, ``A = sum_r left_r right_r^T``, as R Kronecker factor pairs.

    Args:
        left: (..., R, out_dim) left factors (leading dimensions such as steps are kept).
        right: (..., R, in_dim) right factors.
        p_out: (out_dim, k_out) projection of the out side.
        p_in: (in_dim, k_in) projection of the in side.

    Returns:
        (..., R, k_out, k_out) ``P_out^T diag(left_r) P_out`` and (..., R, k_in, k_in) ``P_in^T diag(right_r)
        P_in``, whose Kronecker products summed over R give the map (row-major flattening, as the log's).
    """
    out_side = torch.einsum("nk,...n,nl->...kl", p_out, left, p_out)
    in_side = torch.einsum("nk,...n,nl->...kl", p_in, right, p_in)
    return out_side, in_side
