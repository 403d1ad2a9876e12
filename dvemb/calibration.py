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

__all__ = ["FactorCovariance", "calibrated_projection", "top_eigenvectors"]


@dataclass
class FactorCovariance:
    """Running sums of one layer's factor outer products, float64.

    Attributes:
        out_dim: size of the out side.
        in_dim: size of the in side.
        out_cov: (out_dim, out_dim) weighted sum of ``u u^T``.
        in_cov: (in_dim, in_dim) weighted sum of ``v v^T``.
    """

    out_dim: int
    in_dim: int
    out_cov: torch.Tensor = field(init=False)
    in_cov: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.out_cov = torch.zeros(self.out_dim, self.out_dim, dtype=torch.float64)
        self.in_cov = torch.zeros(self.in_dim, self.in_dim, dtype=torch.float64)

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
        rows = factors.reshape(-1, factors.shape[-1]).to(torch.float64)
        weighted = rows if weights is None else rows * weights.reshape(-1, 1).to(torch.float64)
        gram = (weighted.T @ rows).cpu()  # on the factors' device, then summed on the CPU
        cov = self.out_cov if side == "out" else self.in_cov
        cov += gram


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
        cov: the layer's factor covariances.
        keep_whole_sides: a side whose ``k`` equals its dimension stays the identity (stored whole);
            ``False`` rotates it into its eigenbasis too (full rank: same dot products, for checks).
    """

    def basis(dim: int, k: int, matrix: torch.Tensor) -> torch.Tensor | None:
        return None if keep_whole_sides and k == dim else top_eigenvectors(matrix, k)

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
