"""The backward recursion of momentum, Adam and AdamW: data value embeddings of the exact linearised optimizer.

With the step map of :mod:`dvemb.engine.optimizer_maps`, ``dtheta_T = R^theta_k dtheta_k + R^m_k dm_{k-1}``
for the state entering step k. Going backwards from ``R^theta_T = I, R^m_T = 0``::

    W   = R^m_{k+1} - a_k R^theta_{k+1} D_k
    V   = tau_k W - b_k R^theta_{k+1} D_k
    emb = -w_k V g                                   every example gradient g of step k
    R^theta_k = c_k R^theta_{k+1} + l2_k V + w_k sum_h (V h) h^T
    R^m_k     = beta_k W

``emb`` is the change of the final parameters when the example is removed from its step, so
``query_gradient . emb`` is the loss change on removal (positive: the example helped), as for SGD.
For plain SGD (``beta = b = 0, tau = 1, D = I``) this is the paper's recursion with
``R^theta = s (I - M)``. Unlike the SGD recursion it cannot be blocked over steps (``D_k`` changes
every step and multiplies the whole of ``R^theta``), so it runs step by step, layers batched.

Both matrices are kept transposed (``Theta = R^theta^T``, ``Mom = R^m^T``), so rows multiply them directly,
and with a common scale factored out per layer (``log_scale``): weight decay shrinks ``R`` by
``prod c_k``, which would underflow over a long run.
"""

from __future__ import annotations

import torch

from dvemb.engine.optimizer_maps import COEFFICIENTS, Preconditioner, StepMaps, reconstruction_gram
from dvemb.engine.recursion import Chunk

__all__ = ["OptimizerRecursion", "apply_preconditioner_t"]


def apply_preconditioner_t(theta: torch.Tensor, segments: list[Preconditioner], step: int) -> torch.Tensor:
    """``D_k^T Theta`` for the step at position ``step`` of the chunk (``D`` acts on Theta's rows).

    Args:
        theta: (G, d, d) ``R^theta^T``.
        segments: the layers' preconditioners (empty: the identity).
        step: position of the step within the chunk.

    Returns:
        (G, d, d): ``theta`` itself for the identity (not to be written to), else a new tensor.
    """
    if not segments:
        return theta
    whole = len(segments) == 1 and segments[0].size == theta.shape[1]
    out = theta if whole else torch.empty_like(theta)  # one segment: the result is returned, not copied
    for seg in segments:
        rows = theta[:, seg.start : seg.start + seg.size]  # (G, n, d)
        if seg.diag is not None:
            scaled = rows * seg.diag[:, step, :, None]
            if whole:
                return scaled
            out[:, seg.start : seg.start + seg.size] = scaled
            continue
        assert seg.kron is not None
        a, b = seg.kron[0][:, step], seg.kron[1][:, step]  # (G, ko, ko), (G, ki, ki)
        g, ko, ki, d = rows.shape[0], a.shape[-1], b.shape[-1], rows.shape[-1]
        # (A kron B)^T x = vec(A^T X B) for each column x of Theta viewed as a (ko, ki) matrix X.
        x = rows.reshape(g, ko, ki * d)
        x = torch.bmm(a.transpose(1, 2), x).reshape(g, ko, ki, d)  # contract the out side
        x = torch.matmul(b.transpose(1, 2).unsqueeze(1), x)  # contract the in side: (G, ko, ki, d)
        if whole:
            return x.reshape(g, ko * ki, d)
        out[:, seg.start : seg.start + seg.size] = x.reshape(g, ko * ki, d)
    return out


class OptimizerRecursion:
    """State ``(R^theta, R^m)`` of the optimizer recursion for a group of G layers of size d.

    Args:
        groups: number of layers G in the group.
        dim: their common projected size d.
        dtype: accumulation dtype (float32 or float64).
        device: where the state lives.
    """

    def __init__(
        self,
        groups: int,
        dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        lifted: dict[int, int] | None = None,
    ) -> None:
        # A group that carries lifted moments runs in float64 whatever ``dtype`` (its maps arrive in the state's
        # dtype): their sensitivities reach 1/eps^2 where a coordinate never sees a gradient, the two moments' terms
        # are large and cancel in Adam's first steps, and the reconstruction's two factors are each far from
        # bounded (C spans 1e-14 of its range). In float32 a small MLP's embeddings came out 1e16 where 2e-3 was
        # right; the lifted part's work dominates such a group's time anyway.
        dtype = torch.float64 if lifted else dtype
        self.theta = torch.eye(dim, dtype=dtype, device=device).repeat(groups, 1, 1)  # (G, d, d) R^theta^T
        self.mom = torch.zeros(groups, dim, dim, dtype=dtype, device=device)  # (G, d, d) R^m^T
        self.vmom = torch.zeros(groups, dim, dim, dtype=dtype, device=device)  # (G, d, d) R^v^T (Adam's v term)
        # R^v^T of the lifted segments, over their layers' own N coordinates: (G, N, d) per segment start.
        self.lifted = {
            start: torch.zeros(groups, size, dim, dtype=dtype, device=device) for start, size in (lifted or {}).items()
        }
        self.lifted_mom = {start: torch.zeros_like(state) for start, state in self.lifted.items()}  # R^m^T, the same
        self.log_scale = torch.zeros(groups, dtype=torch.float64)  # R = exp(log_scale) * stored

    def process(self, chunk: Chunk, maps: StepMaps) -> torch.Tensor:
        """Consume a chunk (steps later than any seen before it), newest step first.

        Args:
            chunk: the rows (``rate`` and ``decay`` are not used: ``maps`` holds the coefficients).
            maps: (G, S) coefficients and the preconditioners of the chunk's steps.

        Returns:
            (G, n_g, d) embeddings of the chunk's gradient rows, in their input order.
        """
        dtype, device = self.theta.dtype, self.theta.device
        grads = chunk.grads.to(device=device, dtype=dtype)
        curv = grads if chunk.curv is None else chunk.curv.to(device=device, dtype=dtype)
        curv_steps = chunk.grad_steps if chunk.curv is None else chunk.curv_steps
        assert curv_steps is not None
        g_bounds = torch.searchsorted(chunk.grad_steps, chunk.steps, right=True).tolist()
        h_bounds = torch.searchsorted(curv_steps, chunk.steps, right=True).tolist()
        g_starts = torch.searchsorted(chunk.grad_steps, chunk.steps).tolist()
        h_starts = torch.searchsorted(curv_steps, chunk.steps).tolist()
        coef = {k: getattr(maps, k).to(device=device, dtype=dtype) for k in COEFFICIENTS}
        segments = [p.to(device, dtype) for p in maps.preconditioners]
        second_moment = maps.second_moment
        out = torch.empty_like(grads)
        # Terms that are zero for every layer of a step are skipped (plain momentum has no b, l2 or decay).
        has_b = (maps.b != 0).any(0).tolist()
        has_decay = (maps.decay != 1).any(0).tolist()
        has_l2 = (maps.l2 != 0).any(0).tolist()
        for j in range(len(chunk.steps) - 1, -1, -1):
            c = {k: v[:, j].view(-1, 1, 1) for k, v in coef.items()}  # (G, 1, 1) each
            d_theta = apply_preconditioner_t(self.theta, segments, j)  # (G, d, d) (R^theta D)^T
            w_t = torch.addcmul(self.mom, d_theta, c["a"], value=-1.0)  # (G, d, d) W^T
            # V^T = tau W^T (- b (R^theta D)^T + diag(nu) Y^T); without those terms V is not built: tau scales rows.
            v_t, v_scale = w_t, c["tau"]
            if has_b[j] or second_moment:
                v_t, v_scale = w_t * c["tau"], torch.ones_like(c["tau"])
                if has_b[j]:
                    v_t.addcmul_(d_theta, c["b"], value=-1.0)
                if second_moment:
                    self._lifted_moments(v_t, w_t, segments, j, c)
                    self._second_moment(v_t, segments, j, c["beta2"])
            g = grads[:, g_starts[j] : g_bounds[j]]  # (G, B, d)
            out[:, g_starts[j] : g_bounds[j]] = torch.bmm(g, v_t).mul_(-c["weight"] * v_scale)
            h = curv[:, h_starts[j] : h_bounds[j]]  # (G, n, d)
            if has_decay[j]:
                self.theta.mul_(c["decay"])
            if has_l2[j]:
                self.theta.addcmul_(v_t, c["l2"] * v_scale)
            self.theta.baddbmm_(h.transpose(1, 2), torch.bmm(h, v_t).mul_(c["weight"] * v_scale))
            self.mom = w_t.mul_(c["beta"])
        scale = torch.exp(self.log_scale).to(device=device, dtype=dtype).view(-1, 1, 1)
        out.mul_(scale)
        self._renormalise()
        return out

    def _lifted_moments(
        self,
        v_t: torch.Tensor,
        w_t: torch.Tensor,
        segments: list[Preconditioner],
        step: int,
        c: dict[str, torch.Tensor],
    ) -> None:
        """Both Adam moments of a lifted layer, over its own N coordinates with the exact preconditioner ``D``::

            X    = P Theta                               (N, d): the segment's rows of R^theta^T, lifted once
            W^T  = R^m'^T - a diag(D) X                  R^m' of the later steps
            Y^T  = R^v'^T + diag(sigma) X                R^v' of the later steps
            V^T  = L_k^T (tau W^T + diag(nu) Y^T)         (the segment's rows of ``v_t``, replaced)
            R^m^T = beta W^T,  R^v^T = beta2 Y^T

        instead of the projected ``W`` (whose rows of the segment are zeroed in ``w_t``, so the projected momentum
        state keeps none of them). ``L_k`` is the step's reconstruction of a projected gradient change in the
        layer's coordinates (the removal's change of ``v`` is not confined to the bases' span; docs/optimizers.md
        section 3); both moments go through it in one product, as they are summed. The first moment is carried
        here too because in Adam's bias-corrected first steps the two paths are large and cancel in the exact map,
        and they do only if both see the same ``D``."""
        for seg in segments:
            if seg.lift is None or seg.precond_own is None:
                continue
            assert seg.sigma is not None
            assert seg.nu is not None
            rows = slice(seg.start, seg.start + seg.size)
            lifted_theta = _lift_rows(seg.lift, self.theta[:, rows])  # (G, N, d)
            mom, vmom = self.lifted_mom[seg.start], self.lifted[seg.start]
            mom.addcmul_(seg.precond_own[:, step, :, None] * c["a"], lifted_theta, value=-1.0)
            vmom.addcmul_(seg.sigma[:, step, :, None], lifted_theta)
            both = torch.addcmul(mom * c["tau"], seg.nu[:, step, :, None], vmom, out=lifted_theta)
            v_t[:, rows] = _reconstruction_t(seg, step, both)
            w_t[:, rows] = 0.0
            mom.mul_(c["beta"])
            vmom.mul_(c["beta2"])

    def _second_moment(self, v_t: torch.Tensor, segments: list[Preconditioner], step: int, beta2: torch.Tensor) -> None:
        """Adam's second-moment term of one step, per layer stored whole (lifted layers: :meth:`_lifted_moments`)::

        Y^T  = R^v'^T + diag(sigma) Theta        (R^v' of the later steps)
        V^T += diag(nu) Y^T                       (in place on ``v_t``)
        R^v^T = beta2 Y^T
        """
        for seg in segments:
            if seg.sigma is None or seg.lift is not None:
                continue
            assert seg.nu is not None
            rows = slice(seg.start, seg.start + seg.size)
            sigma, nu = seg.sigma[:, step, :, None], seg.nu[:, step, :, None]
            y = self.vmom[:, rows] + sigma * self.theta[:, rows]
            v_t[:, rows] += nu * y
            self.vmom[:, rows] = y.mul_(beta2)

    def _renormalise(self) -> None:
        """Move the state's magnitude into ``log_scale`` so that it neither underflows nor overflows."""
        state = (self.theta, self.mom, self.vmom, *self.lifted.values(), *self.lifted_mom.values())
        peak = torch.stack([t.abs().amax((1, 2)) for t in state]).amax(0).double().cpu()
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        for t in state:
            t.div_(peak.to(t).view(-1, 1, 1))
        self.log_scale += torch.log(peak)


def _lift_rows(bases: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``P X`` for a segment's rows X (G, k_out * k_in, d): (G, n_out * n_in, d), with ``P = P_out kron P_in``
    and the bases ``P_out`` (G, n_out, k_out), ``P_in`` (G, n_in, k_in). The side whose order costs fewer flops
    goes first (bases like 92 x 2 are common: the wrong order is k_out / k_in times the work)."""
    p_out, p_in = bases
    g, (no, ko), (ni, ki), d = rows.shape[0], p_out.shape[1:], p_in.shape[1:], rows.shape[-1]
    if ki * (no * ko + no * ni) <= ko * (ki * ni + no * ni):
        x = torch.bmm(p_out, rows.reshape(g, ko, ki * d)).reshape(g, no, ki, d)  # (G, n_out, k_in, d)
        return torch.matmul(p_in.unsqueeze(1), x).reshape(g, -1, d)  # (G, n_out, n_in, d)
    x = torch.matmul(p_in.unsqueeze(1), rows.reshape(g, ko, ki, d))  # (G, k_out, n_in, d)
    return torch.bmm(p_out, x.reshape(g, ko, ni * d)).reshape(g, -1, d)


def _reconstruction_t(seg: Preconditioner, step: int, rows: torch.Tensor) -> torch.Tensor:
    """``L_k^T Z = (P^T C P)^-1 P^T C Z`` for rows Z (G, N, d) in a lifted layer's own coordinates (overwritten):
    (G, k, d),
    with ``L_k`` the step's map of a projected gradient change back to those coordinates
    (:func:`dvemb.engine.optimizer_maps.reconstruction_gram`)."""
    assert seg.lift is not None
    assert seg.precond_own is not None
    cov = seg.precond_own[:, step].reciprocal().square()  # (G, N) C = (sqrt(v_hat) + eps)^2
    # Formed step by step: a chunk's (S, d, d) Gram inverses at once reached gigabytes for d = 1024 and steps of one
    # example.
    gram = torch.stack(
        [reconstruction_gram(cov[g : g + 1], seg.lift[0][g], seg.lift[1][g])[0] for g in range(cov.shape[0])]
    ).to(rows.dtype)  # (G, k, k) this step's (P^T C P)^-1
    return torch.bmm(gram, _project_rows(seg.lift, rows.mul_(cov[:, :, None])))


def _project_rows(bases: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``P^T Z`` for rows Z (G, n_out * n_in, d) in a layer's own coordinates: (G, k_out * k_in, d), the cheaper
    side first."""
    p_out, p_in = bases
    g, (no, ko), (ni, ki), d = rows.shape[0], p_out.shape[1:], p_in.shape[1:], rows.shape[-1]
    if ko * (no * ni + ki * ni) <= ki * (no * ni + ko * no):
        x = torch.bmm(p_out.transpose(1, 2), rows.reshape(g, no, ni * d)).reshape(g, ko, ni, d)
        return torch.matmul(p_in.transpose(1, 2).unsqueeze(1), x).reshape(g, -1, d)  # (G, k_out, k_in, d)
    x = torch.matmul(p_in.transpose(1, 2).unsqueeze(1), rows.reshape(g, no, ni, d))  # (G, n_out, k_in, d)
    return torch.bmm(p_out.transpose(1, 2), x.reshape(g, no, ki * d)).reshape(g, -1, d)
