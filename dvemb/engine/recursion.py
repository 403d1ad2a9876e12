"""The backward recursion that turns per-example gradients into data value embeddings.

With ``A_t = prod_{k=T-1..t+1} (c_k I - r_k H_k)`` (``r_k`` the per-example rate, ``c_k = 1 - eta_k
lambda_k`` the weight-decay factor, ``H_k = sum_h h h^T`` the step's curvature), the embedding of
a gradient ``g`` used at step ``t`` is ``r_t A_t g``. We keep ``A_t = s_t (I - M_t)`` with a scalar
``s_t = prod_{k>t} c_k`` and one matrix ``M`` (the paper's weighting matrix), updated backwards::

    u      = (I - M) h                      for every curvature row h of step t
    M     += (r_t / c_t) * sum_h u h^T
    s     *= c_t
    emb(g) = r_t * s_{t} * (I - M_t) g      (M_t, s_t: before step t's own update)

Two implementations live here:

- :func:`reference_embeddings`: the per-step loop above, for tests.
- :class:`BlockedRecursion`: K consecutive steps at once, exactly. Rows in ascending step order
  satisfy ``(I + L) U = X (I - M0)^T`` with ``L_ij = rho_j (x_i . x_j)`` for ``step_j > step_i``
  (strictly upper triangular), so one product with ``M``, one triangular system and one rank-n
  update of ``M`` replace K small products. The system is solved by halving the chunk's steps
  (:func:`_solve_later`): matrix products on the off-diagonal blocks only, ``2 n^2 d`` flops instead
  of a full Gram matrix and a triangular solve (``3 n^2 d``, the solve several times slower per
  flop). Layers of equal size are batched (``(G, d, d)``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["LEAF_ROWS", "BlockedRecursion", "Chunk", "reference_embeddings"]

#: Blocks of at most this many rows are solved with a triangular solve; larger ones are halved (GEMMs).
LEAF_ROWS = 16


@dataclass
class Chunk:
    """Rows of consecutive steps for one group of G equally sized layers, rows in ascending step order.

    Attributes:
        grads: (G, n_g, d) gradient rows.
        grad_steps: (n_g,) step of each gradient row.
        curv: (G, n_h, d) curvature rows, or None in empirical mode (then ``curv = grads``).
        curv_steps: (n_h,) step of each curvature row, or None.
        steps: (S,) the chunk's steps, ascending.
        rate: (G, S) per-example rate ``r`` per layer and step.
        decay: (G, S) weight-decay factor ``c`` per layer and step.
    """

    grads: torch.Tensor
    grad_steps: torch.Tensor
    curv: torch.Tensor | None
    curv_steps: torch.Tensor | None
    steps: torch.Tensor
    rate: torch.Tensor
    decay: torch.Tensor


def _step_position(row_steps: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Index of each row's step within ``steps`` (ascending)."""
    return torch.searchsorted(steps, row_steps)


class BlockedRecursion:
    """State of the recursion (``M`` and ``s``) for a group of G layers of size d.

    Args:
        groups: number of layers G in the group.
        dim: their common projected size d.
        dtype: accumulation dtype of ``M`` (float32 or float64).
        device: where ``M`` lives.
    """

    def __init__(
        self, groups: int, dim: int, *, dtype: torch.dtype, device: torch.device, leaf_rows: int = LEAF_ROWS
    ) -> None:
        self.leaf_rows = leaf_rows
        # M is kept transposed: every product needs M^T, and a transposed view would be copied each time.
        self.Mt = torch.zeros(groups, dim, dim, dtype=dtype, device=device)  # (G, d, d) = M^T
        self.log_scale = torch.zeros(groups, dtype=torch.float64)  # log s per layer (s can be tiny)

    def process(self, chunk: Chunk, out: torch.Tensor | None = None) -> torch.Tensor:
        """Consume a chunk (all its steps later than any step seen before it) and return embeddings.

        Args:
            chunk: the rows of the chunk's steps.
            out: optional (G, n_g, d) tensor (any strides, e.g. a view of a wider embedding buffer) to
                write the embeddings into.

        Returns:
            (G, n_g, d) embeddings of the chunk's gradient rows, in their input order (``out`` if given).
        """
        dtype, device = self.Mt.dtype, self.Mt.device
        grads = chunk.grads.to(device=device, dtype=dtype)
        empirical = chunk.curv is None
        curv = grads if empirical else chunk.curv.to(device=device, dtype=dtype)  # type: ignore[union-attr]
        curv_steps = chunk.grad_steps if empirical else chunk.curv_steps
        assert curv_steps is not None

        # Steps, rates and scales are tiny arrays: numpy handles them in about a microsecond per operation,
        # where each torch call costs several, and at d = 256 a chunk's matrix products take only ~1 ms.
        steps = chunk.steps.cpu().numpy()
        x_pos = np.searchsorted(steps, curv_steps.cpu().numpy())  # (n_h,) step of each row within the chunk
        g_pos = x_pos if empirical else np.searchsorted(steps, chunk.grad_steps.cpu().numpy())  # (n_g,)
        rate = chunk.rate.cpu().double().numpy()  # (G, S)
        log_decay = np.log(chunk.decay.cpu().double().numpy())  # (G, S)
        rho = rate / np.exp(log_decay)  # (G, S): the rate of the M update in the scaled form
        # s_t for a row of step t: s after this chunk times the decay of this chunk's steps after t.
        after = np.cumsum(log_decay[:, ::-1], axis=1)[:, ::-1] - log_decay  # (G, S): sum over chunk steps > t
        log_s = self.log_scale.numpy()[:, None] + after[:, g_pos]  # (G, n_g)
        scale = torch.from_numpy(rate[:, g_pos] * np.exp(log_s)).to(device=device, dtype=dtype)  # (G, n_g): r_t s_t
        self.log_scale += torch.from_numpy(log_decay.sum(1))
        x_rho = torch.from_numpy(rho[:, x_pos]).to(device=device, dtype=dtype)  # (G, n_h)
        starts = np.searchsorted(x_pos, np.arange(len(steps) + 1)).tolist()  # first row of every step

        # Rows are in ascending step order, so a row interacts only with rows after it: the system is
        # unit upper triangular and needs no reordering. Rows of one step do not interact.
        x = curv  # (G, n_h, d)
        v = torch.baddbmm(x, x, self.Mt, alpha=-1.0)  # (G, n_h, d) = X (I - M0)^T
        u = _solve_later(x, x_rho, v, x_pos, starts, self.leaf_rows)  # (G, n_h, d) in v's storage

        u_grads: torch.Tensor
        if empirical:
            u_grads = u
        else:
            cross = grads @ x.transpose(1, 2)  # (G, n_g, n_h)
            mask = torch.from_numpy(x_pos[None, :] > g_pos[:, None]).to(device)  # (n_g, n_h)
            cross.mul_(x_rho.unsqueeze(1)).mul_(mask)
            u_grads = torch.baddbmm(grads, grads, self.Mt, alpha=-1.0).sub_(cross @ u)

        embeddings = (
            torch.mul(u_grads, scale.unsqueeze(-1), out=out) if out is not None else u_grads * scale.unsqueeze(-1)
        )
        # u is not needed unscaled any more (embeddings hold their own copy): scale it in place for the update.
        self.Mt.baddbmm_(x.transpose(1, 2), u.mul_(x_rho.unsqueeze(-1)))  # M^T += sum_j x_j (rho_j u_j)^T
        return embeddings


def _solve_later(
    x: torch.Tensor, rho: torch.Tensor, v: torch.Tensor, step_of: np.ndarray, starts: list[int], leaf: int
) -> torch.Tensor:
    """Solve ``(I + L) U = V`` in place, halving the chunk's steps down to blocks of at most ``leaf`` rows.

    ``L_ij = rho_j <x_i, x_j>`` when row j's step is later than row i's. The later half of the steps
    does not depend on the earlier one: it is solved first, then the earlier half's right-hand side
    loses ``L_AB U_B`` (one Gram block and one product, both matrix multiplications) and is solved in
    turn. Only pairs of rows in different halves are multiplied (half the full Gram matrix), and the
    unit-triangular solve, several times slower per flop than a matrix product on a CPU, runs only
    on the small blocks.

    Args:
        x: (G, n, d) curvature rows, ascending steps.
        rho: (G, n) each row's ``r / c``.
        v: (G, n, d) right-hand side ``X (I - M0)^T``, overwritten with ``U``.
        step_of: (n,) position of each row's step in the chunk.
        starts: first row of each step of the rows to solve, then the row after the last one.
        leaf: blocks of at most this many rows are solved directly.

    Returns:
        ``v``.
    """
    first, stop = starts[0], starts[-1]
    if len(starts) <= 2:
        return v  # rows of one step do not interact
    if stop - first <= leaf:
        m = stop - first
        xs, steps = x.narrow(1, first, m), step_of[first:stop]
        later = torch.from_numpy(steps[None, :] > steps[:, None]).to(x.device)  # (m, m): [i, j] = step_j > step_i
        system = torch.bmm(xs, xs.transpose(1, 2)).mul_(rho.narrow(1, first, m).unsqueeze(1)).mul_(later)  # L
        system.diagonal(dim1=1, dim2=2).add_(1.0)
        block = v.narrow(1, first, m)
        block.copy_(torch.linalg.solve_triangular(system, block, upper=True, unitriangular=True))
        return v
    # Split at the step boundary nearest the middle row.
    middle = (first + stop) // 2
    k = bisect.bisect_left(starts, middle, 1, len(starts) - 2)
    if k > 1 and middle - starts[k - 1] < starts[k] - middle:
        k -= 1
    split = starts[k]
    _solve_later(x, rho, v, step_of, starts[k:], leaf)  # the later steps first: they depend on nothing here
    x_b = x.narrow(1, split, stop - split)
    coupling = torch.bmm(x.narrow(1, first, split - first), x_b.transpose(1, 2))  # (G, n_a, n_b)
    coupling.mul_(rho.narrow(1, split, stop - split).unsqueeze(1))  # L_AB
    v.narrow(1, first, split - first).baddbmm_(coupling, v.narrow(1, split, stop - split), alpha=-1.0)
    return _solve_later(x, rho, v, step_of, starts[: k + 1], leaf)


def reference_embeddings(
    grads: list[torch.Tensor],
    curv: list[torch.Tensor] | None,
    rate: list[float],
    decay: list[float],
) -> list[torch.Tensor]:
    """Naive per-step backward recursion (one layer or the full concatenated vector), in float64.

    Args:
        grads: per step t, (B_t, d) gradient rows.
        curv: per step, (n_t, d) curvature rows, or None for the empirical mode (curv = grads).
        rate: per step, the per-example rate r_t.
        decay: per step, the weight-decay factor c_t.

    Returns:
        per step, (B_t, d) embeddings ``r_t s_t (I - M_t) g``.
    """
    dim = grads[0].shape[1]
    M = torch.zeros(dim, dim, dtype=torch.float64)
    scale = 1.0
    out: list[torch.Tensor] = [torch.empty(0)] * len(grads)
    for t in range(len(grads) - 1, -1, -1):
        g = grads[t].double()
        h = g if curv is None else curv[t].double()
        out[t] = rate[t] * scale * (g - g @ M.T)
        c_rows = (rate[t] / decay[t]) * (h - h @ M.T)
        M = M + c_rows.T @ h
        scale *= decay[t]
    return out
