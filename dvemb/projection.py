"""Seeded Kronecker projection of per-example weight gradients.

A tracked layer's per-example weight gradient is a sum of outer products
``G = sum_l u_l v_l^T`` with ``u_l`` in the layer's *out* space and ``v_l`` in its *in* space
(for ``nn.Linear``: ``u`` = output gradient, ``v`` = input activation with a trailing 1 for the bias).
It is projected to ``P_out^T G P_in = sum_l (P_out^T u_l)(P_in^T v_l)^T`` without ever building ``G``.

``P_out`` (out_dim, k_out) and ``P_in`` (in_dim, k_in) are Gaussian with variance ``1/k``, drawn
from a CPU generator seeded from the manifest, so anyone holding the manifest can rebuild them
bit for bit on any device. A side whose ``k`` equals its dimension is the identity (no projection),
which keeps small models exact.

A *calibrated* projection (:mod:`dvemb.calibration`) carries explicit bases instead: orthonormal
columns spanning the top eigenvectors of the layer's activation and output-gradient covariances,
stored in the log's ``projection.safetensors``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

__all__ = ["LayerProjection", "projection_matrix"]


@lru_cache(maxsize=256)
def _cpu_matrix(dim: int, k: int, seed: int) -> torch.Tensor:
    """(dim, k) float64 Gaussian matrix, or the identity when ``k == dim``."""
    if k == dim:
        return torch.eye(dim, dtype=torch.float64)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, k, generator=generator, dtype=torch.float64) / math.sqrt(k)


def projection_matrix(dim: int, k: int, seed: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The seeded projection matrix of one side of a layer.

    Args:
        dim: size of the space projected from.
        k: projected size (``k == dim`` gives the identity).
        seed: generator seed, as stored in the manifest.
        dtype: dtype of the returned matrix (drawn in float64, then cast).
        device: device of the returned matrix.

    Returns:
        (dim, k) matrix.
    """
    return _cpu_matrix(dim, k, seed).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class LayerProjection:
    """Projection of one layer's weight-gradient matrix (out_dim, in_dim) to (k_out, k_in).

    Attributes:
        out_dim: rows of the gradient matrix (output features; vocabulary size for an embedding).
        in_dim: columns of the gradient matrix (input features, plus one for a bias).
        k_out: projected rows.
        k_in: projected columns.
        seed_out: seed of ``P_out``.
        seed_in: seed of ``P_in``.
        basis_out: (out_dim, k_out) float64 explicit ``P_out`` of a calibrated projection, or None.
        basis_in: (in_dim, k_in) float64 explicit ``P_in``, or None.
    """

    out_dim: int
    in_dim: int
    k_out: int
    k_in: int
    seed_out: int
    seed_in: int
    basis_out: torch.Tensor | None = field(default=None, compare=False, repr=False)
    basis_in: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def calibrated(self) -> bool:
        """True when the bases are explicit (calibrated) rather than seeded Gaussian."""
        return self.basis_out is not None or self.basis_in is not None

    def side_is_identity(self, side: str) -> bool:
        """True when ``side`` (``"out"`` or ``"in"``) is stored whole, in its own coordinates."""
        if side == "out":
            return self.basis_out is None and self.k_out == self.out_dim
        return self.basis_in is None and self.k_in == self.in_dim

    @property
    def dim(self) -> int:
        """Length of one flattened projected gradient, ``k_out * k_in``."""
        return self.k_out * self.k_in

    @property
    def is_identity(self) -> bool:
        """True when nothing is projected (the gradient is stored whole, in its own coordinates)."""
        return self.side_is_identity("out") and self.side_is_identity("in")

    def p_out(self, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(out_dim, k_out) projection of the out side."""
        if self.basis_out is not None:
            return self.basis_out.to(device=device, dtype=dtype)
        return projection_matrix(self.out_dim, self.k_out, self.seed_out, dtype=dtype, device=device)

    def p_in(self, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(in_dim, k_in) projection of the in side."""
        if self.basis_in is not None:
            return self.basis_in.to(device=device, dtype=dtype)
        return projection_matrix(self.in_dim, self.k_in, self.seed_in, dtype=dtype, device=device)

    def project_matrix(self, gradient: torch.Tensor) -> torch.Tensor:
        """Project full weight-gradient matrices, as a client does with a test gradient.

        Args:
            gradient: (..., out_dim, in_dim) gradients laid out as the layer's weight matrix,
                with the bias gradient as the last column when the layer has a bias.

        Returns:
            (..., k_out * k_in) flattened projected gradients, in the order the log stores them.
        """
        if gradient.shape[-2:] != (self.out_dim, self.in_dim):
            raise ValueError(
                f"gradient has trailing shape {tuple(gradient.shape[-2:])}, expected ({self.out_dim}, {self.in_dim})"
            )
        p_out = self.p_out(dtype=gradient.dtype, device=gradient.device)
        p_in = self.p_in(dtype=gradient.dtype, device=gradient.device)
        projected = p_out.T @ gradient @ p_in  # (..., k_out, k_in)
        return projected.flatten(-2)
