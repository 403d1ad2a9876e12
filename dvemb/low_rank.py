"""Low-rank factors of a layer's per-coordinate matrices.

Adam's second-moment term multiplies a perturbation coordinate by coordinate by matrices shaped like the
layer's gradient (out_dim, in_dim): ``dv = nu * dgamma`` and ``dtheta += sigma * dv`` (docs/optimizers.md).
For a projected layer too large to keep them whole (``dvemb.optim.LIFTED_SECOND_MOMENT_MAX``) the recorder can
keep the top R singular pairs of each at every step (:func:`low_rank_factors`: ``R (out_dim + in_dim)`` numbers,
never the matrix), from which the engine rebuilds ``sum_r a_r b_r^T``; with R = min(out, in) exactly.
"""

from __future__ import annotations

import torch

__all__ = ["low_rank_factors"]

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
