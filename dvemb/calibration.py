"""Curvature-aware projections: per-layer bases from the top eigenvectors of factor covariances.

A tracked layer's per-example gradient is ``G = sum_l u_l v_l^T`` (out side ``u``: output gradients,
in side ``v``: inputs). Accumulating ``C_out = sum u u^T`` and ``C_in = sum v v^T`` over a few
calibration batches (K-FAC's factors; with curvature rows for ``u`` they are the factors of the
Gauss-Newton matrix) and keeping their top ``k`` eigenvectors gives orthonormal bases ``P_out``,
``P_in`` in which the gradients and the curvature have most of their energy: the recursion then runs
in the top curvature subspace instead of a random one (docs/recorder.md, BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dvemb.projection import LayerProjection

__all__ = ["MAX_FITTED_SIDE", "FactorCovariance", "calibrated_projection", "top_eigenvectors"]

#: A side larger than this keeps its seeded random projection: its covariance alone would be
#: ``8 * dim^2`` bytes (128 MiB at 4096) and its eigendecomposition minutes (a vocabulary of 50k: 20 GB).
MAX_FITTED_SIDE = 4096


@dataclass
class FactorCovariance:
    """Running sums of one layer's factor outer products, float64.

    Attributes:
        out_dim: size of the out side.
        in_dim: size of the in side.
        out_cov: (out_dim, out_dim) weighted sum of ``u u^T``, or None when the side is larger than
            :data:`MAX_FITTED_SIDE` (it keeps its random projection).
        in_cov: (in_dim, in_dim) weighted sum of ``v v^T``, or None likewise.
    """

    out_dim: int
    in_dim: int
    out_cov: torch.Tensor | None = field(init=False)
    in_cov: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        def zeros(dim: int) -> torch.Tensor | None:
            return torch.zeros(dim, dim, dtype=torch.float64) if dim <= MAX_FITTED_SIDE else None

        self.out_cov, self.in_cov = zeros(self.out_dim), zeros(self.in_dim)

    def matrices(self) -> list[torch.Tensor]:
        """The side covariances that are accumulated (for an all-reduce across ranks), out side first."""
        return [m for m in (self.out_cov, self.in_cov) if m is not None]

    def add_gradient(self, out_factors: torch.Tensor, in_factors: torch.Tensor) -> None:
        """Add the per-example gradients ``G = u v^T`` of (B, L, ·) factors: ``sum G G^T`` to the out side
        and ``sum G^T G`` to the in side (cross-position terms of sequences left out).

        ``G G^T = |v|^2 u u^T``: the out side is weighted by the in factor's energy and vice versa, so
        the bases follow where the gradients (or curvature rows) are large, not where inputs merely are.
        """
        self.add("out", out_factors, in_factors.pow(2).sum(-1))
        self.add("in", in_factors, out_factors.pow(2).sum(-1))

    def add(self, side: str, factors: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add (B, L, dim) unprojected factors of one side (``"out"`` or ``"in"``), each row weighted
        by ``weights`` (B, L) when given."""
        cov = self.out_cov if side == "out" else self.in_cov
        if cov is None:
            return
        rows = factors.reshape(-1, factors.shape[-1]).to(torch.float64)
        weighted = rows if weights is None else rows * weights.reshape(-1, 1).to(torch.float64)
        cov += (weighted.T @ rows).cpu()  # on the factors' device, then summed on the CPU

    def add_one_hot(self, side: str, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one-hot factors ``e_i`` given by their (B, L) ``indices`` (negative: no factor, e.g. an
        embedding's padding index), each weighted by ``weights`` (B, L): ``sum w e_i e_i^T`` is diagonal."""
        cov = self.out_cov if side == "out" else self.in_cov
        if cov is None:
            return
        flat, w = indices.reshape(-1), weights.reshape(-1).to(torch.float64)
        keep = flat >= 0
        diagonal = torch.zeros(cov.shape[0], dtype=torch.float64, device=flat.device)
        diagonal.index_add_(0, flat[keep], w[keep])
        cov.diagonal().add_(diagonal.cpu())


def top_eigenvectors(cov: torch.Tensor, k: int) -> torch.Tensor:
    """(dim, k) orthonormal eigenvectors of a symmetric ``cov`` with the largest eigenvalues, largest first.

    Signs are fixed (largest entry of each column positive) so that the same covariance always gives
    the same basis.
    """
    _, vectors = torch.linalg.eigh(cov.double())  # ascending eigenvalues
    top = vectors[:, -k:].flip(1) if k else vectors[:, :0]
    peak = top.abs().argmax(0)
    signs = torch.sign(top[peak, torch.arange(top.shape[1])])
    fixed: torch.Tensor = top * torch.where(signs == 0, torch.ones_like(signs), signs)
    return fixed


def calibrated_projection(
    projection: LayerProjection, cov: FactorCovariance, *, keep_whole_sides: bool = True
) -> LayerProjection:
    """The layer's projection with calibrated bases of the same sizes (``k_out``, ``k_in``).

    Args:
        projection: the layer's current (random) projection, for its sizes.
        cov: the layer's factor covariances (a side without one keeps its seeded projection).
        keep_whole_sides: a side whose ``k`` equals its dimension stays the identity (stored whole);
            ``False`` rotates it into its eigenbasis too (full rank: same dot products, for checks).
    """

    def basis(dim: int, k: int, matrix: torch.Tensor | None) -> torch.Tensor | None:
        if matrix is None or (keep_whole_sides and k == dim):
            return None
        return top_eigenvectors(matrix, k)

    return LayerProjection(
        out_dim=projection.out_dim,
        in_dim=projection.in_dim,
        k_out=projection.k_out,
        k_in=projection.k_in,
        seed_out=projection.seed_out,
        seed_in=projection.seed_in,
        basis_out=basis(projection.out_dim, projection.k_out, cov.out_cov),
        basis_in=basis(projection.in_dim, projection.k_in, cov.in_cov),
    )
