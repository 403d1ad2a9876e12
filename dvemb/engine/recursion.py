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
  (strictly upper triangular), so one Gram matrix, one unit-triangular solve and one rank-n
  update of ``M`` replace K small products. Layers of equal size are batched (``(G, d, d)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockedRecursion", "Chunk", "reference_embeddings"]


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

    def __init__(self, groups: int, dim: int, *, dtype: torch.dtype, device: torch.device) -> None:
        # M is kept transposed: every product needs M^T, and a transposed view would be copied each time.
        self.Mt = torch.zeros(groups, dim, dim, dtype=dtype, device=device)  # (G, d, d) = M^T
        self.log_scale = torch.zeros(groups, dtype=torch.float64)  # log s per layer (s can be tiny)

    def process(self, chunk: Chunk) -> torch.Tensor:
        """Consume a chunk (all its steps later than any step seen before it) and return embeddings.

        Returns:
            (G, n_g, d) embeddings of the chunk's gradient rows, in their input order.
        """
        dtype, device = self.Mt.dtype, self.Mt.device
        grads = chunk.grads.to(device=device, dtype=dtype)
        empirical = chunk.curv is None
        curv = grads if empirical else chunk.curv.to(device=device, dtype=dtype)  # type: ignore[union-attr]
        curv_steps = chunk.grad_steps if empirical else chunk.curv_steps
        assert curv_steps is not None
        rate = chunk.rate.to(device=device, dtype=dtype)  # (G, S)
        decay = chunk.decay.to(device=device, dtype=dtype)  # (G, S)
        rho = rate / decay  # (G, S): the rate of the M update in the scaled form

        # Rows are in ascending step order, so a row interacts only with rows after it: the system is
        # unit upper triangular and needs no reordering. Rows of one step do not interact.
        x = curv  # (G, n_h, d)
        x_step = curv_steps.to(device)  # (n_h,)
        x_rho = rho[:, _step_position(x_step, chunk.steps.to(device))]  # (G, n_h)
        later = x_step.unsqueeze(0) > x_step.unsqueeze(1)  # (n_h, n_h): [i, j] = step_j > step_i

        v = torch.baddbmm(x, x, self.Mt, alpha=-1.0)  # (G, n_h, d) = X (I - M0)^T
        system = torch.bmm(x, x.transpose(1, 2))  # (G, n_h, n_h) Gram matrix, made into I + L in place
        system.mul_(x_rho.unsqueeze(1)).mul_(later)  # L_ij = rho_j <x_i, x_j> for later j
        system.diagonal(dim1=1, dim2=2).add_(1.0)
        u = torch.linalg.solve_triangular(system, v, upper=True, unitriangular=True)  # (G, n_h, d)

        u_grads: torch.Tensor
        if empirical:
            u_grads = u
        else:
            g_step = chunk.grad_steps.to(device)
            cross = grads @ x.transpose(1, 2)  # (G, n_g, n_h)
            mask = x_step.unsqueeze(0) > g_step.unsqueeze(1)  # (n_g, n_h)
            cross.mul_(x_rho.unsqueeze(1)).mul_(mask)
            u_grads = torch.baddbmm(grads, grads, self.Mt, alpha=-1.0).sub_(cross @ u)

        # s_t for a row of step t: s after this chunk times the decay of this chunk's steps after t.
        log_decay = torch.log(chunk.decay.to(torch.float64))  # (G, S)
        after = log_decay.flip(1).cumsum(1).flip(1) - log_decay  # (G, S): sum over chunk steps > t
        g_pos = _step_position(chunk.grad_steps, chunk.steps)
        log_s = self.log_scale.unsqueeze(1) + after[:, g_pos]  # (G, n_g)
        self.log_scale += log_decay.sum(1)
        scale = chunk.rate.to(torch.float64)[:, g_pos] * torch.exp(log_s)  # (G, n_g): r_t s_t
        embeddings = u_grads * scale.to(device=device, dtype=dtype).unsqueeze(-1)
        # u is not needed unscaled any more (embeddings hold their own copy): scale it in place for the update.
        self.Mt.baddbmm_(x.transpose(1, 2), u.mul_(x_rho.unsqueeze(-1)))  # M^T += sum_j x_j (rho_j u_j)^T
        return embeddings


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
