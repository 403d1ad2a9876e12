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

__all__ = [
    "MAX_FITTED_SIDE",
    "FactorCovariance",
    "best_split",
    "calibrated_projection",
    "captured",
    "top_eigenvectors",
]

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


def _eigen(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (dim,) and eigenvectors (dim, dim) of a symmetric ``cov``, largest first, signs fixed
    (largest entry of each column positive) so that the same covariance always gives the same basis."""
    values, vectors = torch.linalg.eigh(cov.double())  # ascending eigenvalues
    values, vectors = values.flip(0), vectors.flip(1)
    peak = vectors.abs().argmax(0)
    signs = torch.sign(vectors[peak, torch.arange(vectors.shape[1])])
    return values, vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def top_eigenvectors(cov: torch.Tensor, k: int) -> torch.Tensor:
    """(dim, k) orthonormal eigenvectors of a symmetric ``cov`` with the largest eigenvalues, largest first."""
    return _eigen(cov)[1][:, :k]


def captured(values: torch.Tensor | None, dim: int) -> torch.Tensor:
    """(dim + 1,) share of a side's energy kept by its top ``k`` eigenvectors, for k = 0..dim; a side without a
    covariance (random projection) or without energy keeps ``k / dim`` of it on average."""
    if values is None or float(values.clamp(min=0).sum()) <= 0:
        return torch.arange(dim + 1, dtype=torch.float64) / dim
    kept = torch.cat([values.new_zeros(1), values.clamp(min=0).cumsum(0)])
    return kept / kept[-1]


def best_split(out_share: torch.Tensor, in_share: torch.Tensor, budget: int) -> tuple[int, int]:
    """The ``(k_out, k_in)`` with ``k_out * k_in <= budget`` keeping the most of the layer's Gauss-Newton (or
    gradient) energy under its Kronecker-factored model, ``share_out(k_out) * share_in(k_in)``.

    Args:
        out_share, in_share: (dim + 1,) from :func:`captured`.
        budget: numbers per projected gradient.
    """
    out_dim, in_dim = len(out_share) - 1, len(in_share) - 1
    best, split = -1.0, (1, 1)
    for k_out in range(1, min(out_dim, budget) + 1):
        k_in = min(in_dim, budget // k_out)
        kept = float(out_share[k_out] * in_share[k_in])
        if kept > best + 1e-12:
            best, split = kept, (k_out, k_in)
    return split


def calibrated_projection(
    projection: LayerProjection,
    cov: FactorCovariance,
    *,
    keep_whole_sides: bool = True,
    budget: int | None = None,
) -> LayerProjection:
    """The layer's projection with calibrated bases.

    Args:
        projection: the layer's current (random) projection, for its sizes.
        cov: the layer's factor covariances (a side without one keeps its seeded projection).
        keep_whole_sides: a side whose ``k`` equals its dimension stays the identity (stored whole);
            ``False`` rotates it into its eigenbasis too (full rank: same dot products, for checks).
        budget: when given, ``(k_out, k_in)`` are chosen anew with ``k_out * k_in <= budget`` by
            :func:`best_split` (a vocabulary side whose curvature spreads over many directions gets more of the
            budget than a narrow hidden side); otherwise the projection's own sizes are kept.
    """
    out_eigen = _eigen(cov.out_cov) if cov.out_cov is not None else None
    in_eigen = _eigen(cov.in_cov) if cov.in_cov is not None else None
    k_out, k_in = projection.k_out, projection.k_in
    if budget is not None:
        k_out, k_in = best_split(
            captured(out_eigen[0] if out_eigen else None, projection.out_dim),
            captured(in_eigen[0] if in_eigen else None, projection.in_dim),
            budget,
        )

    def basis(dim: int, k: int, eigen: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        if eigen is None or (keep_whole_sides and k == dim):
            return None
        return eigen[1][:, :k].contiguous()

    return LayerProjection(
        out_dim=projection.out_dim,
        in_dim=projection.in_dim,
        k_out=k_out,
        k_in=k_in,
        seed_out=projection.seed_out,
        seed_in=projection.seed_in,
        basis_out=basis(projection.out_dim, k_out, out_eigen),
        basis_in=basis(projection.in_dim, k_in, in_eigen),
    )
