"""The first-order map of each optimizer step, as the coefficients the optimizer recursion runs on.

For a perturbation of the training gradient at step ``s`` the linearised optimizer carries a state
``(dtheta, dm)`` (parameters, momentum or Adam's first moment). Every modelled optimizer's step ``k``
is one form (docs/optimizers.md derives each case)::

    dgamma_k  = (w_k H_k + l2_k) dtheta_k + e_k          e: the example's own gradient change
    dm_k      = beta_k dm_{k-1} + tau_k dgamma_k
    dtheta_k+1 = c_k dtheta_k - D_k (a_k dm_k + b_k dgamma_k)

with ``w`` the per-example weight of the loss (1 for a summed loss, 1/B for a mean), ``H_k = sum_h h h^T``
the step's curvature rows and ``D_k`` a diagonal preconditioner (the identity for SGD).

- SGD with momentum ``mu``, dampening ``delta``, L2 weight decay ``lambda``: ``beta = mu``,
  ``tau = 1 - delta`` (``beta = 0, tau = 1`` when the buffer is created), ``c = 1``, ``l2 = lambda``,
  ``a = lr, b = 0``; Nesterov: ``a = lr mu, b = lr``.
- Adam: ``beta = beta1, tau = 1 - beta1, a = lr / (1 - beta1^t), b = 0, c = 1, l2 = lambda``,
  ``D = 1 / (sqrt(v_hat) + eps)``; AdamW the same with ``c = 1 - lr lambda, l2 = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvemb import logformat as fmt
from dvemb.errors import NumericalError
from dvemb.formats import LayerEntry
from dvemb.projection import LayerProjection

__all__ = [
    "COEFFICIENTS",
    "LIFTED",
    "LIFT_STATE_MAX",
    "Preconditioner",
    "StepMaps",
    "kronecker_preconditioner",
    "lift_plan",
    "lift_ratio",
    "lifted_size",
    "reconstruction_gram",
    "step_maps",
]

#: The (G, S) coefficient fields of :class:`StepMaps`, in field order.
COEFFICIENTS = ("weight", "beta", "tau", "decay", "a", "b", "l2", "beta2")


@dataclass
class Preconditioner:
    """The preconditioner ``D`` of one layer (a segment of the group's vector) over a chunk's steps.

    Exactly one of ``diag`` and ``kron`` is set.

    Attributes:
        start: first coordinate of the segment in the vector the recursion runs on.
        diag: (G, S, n) exact diagonal (a layer stored without projection), or None.
        kron: ((G, S, k_out, k_out), (G, S, k_in, k_in)) factors ``A, B`` with ``D ~ A kron B`` in the
            projected coordinates, or None.
        sigma: (G, S, N) ``d theta_{k+1} / d v_k`` (Adam's second-moment term) over the layer's N own
            coordinates, or None when the term is not carried.
        nu: (G, S, N) ``d v_k / d gamma_k = 2 (1 - beta2) gamma_k``, set with ``sigma``.
        lift: for a projected layer whose term is carried in its own coordinates (docs/optimizers.md, section 3),
            its bases ``(P_out (G, n_out, k_out), P_in (G, n_in, k_in))``, which project the term's effect on the
            parameters back; None for a layer stored whole (N = n, the segment's own coordinates).
        precond_own: with ``lift``, (G, S, N) Adam's exact preconditioner ``D`` in the layer's own coordinates:
            the first moment is carried there too, so that its path and the second moment's keep the exact map's
            cancellation (Adam's first steps); ``D^-2 = (sqrt(v_hat) + eps)^2`` is also the covariance under which
            a projected gradient change is taken back to those coordinates (:func:`reconstruction_gram`).
    """

    start: int
    diag: torch.Tensor | None = None
    kron: tuple[torch.Tensor, torch.Tensor] | None = None
    sigma: torch.Tensor | None = None
    nu: torch.Tensor | None = None
    lift: tuple[torch.Tensor, torch.Tensor] | None = None
    precond_own: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Length of the segment."""
        if self.diag is not None:
            return int(self.diag.shape[-1])
        assert self.kron is not None
        return int(self.kron[0].shape[-1] * self.kron[1].shape[-1])

    def to(self, device: torch.device, dtype: torch.dtype) -> Preconditioner:
        """The same preconditioner on another device and dtype."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, dtype)

        def pair(p: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
            return None if p is None else (p[0].to(device, dtype), p[1].to(device, dtype))

        return Preconditioner(
            self.start,
            move(self.diag),
            pair(self.kron),
            move(self.sigma),
            move(self.nu),
            pair(self.lift),
            move(self.precond_own),
        )


#: The manifest's ``layers[].second_moment`` of a layer whose log keeps, per Adam step, the sensitivity to ``v``,
#: the step's gradient and the preconditioner whole: both moments can be carried in its own coordinates.
LIFTED = "lifted-moments"

#: The lifted states of a computation hold at most this many numbers together (512 MiB each for the two moments, in
#: float64, which they run in): a layer past it, in layer order, is left without the term (and the results say so).
LIFT_STATE_MAX = 1 << 26


#: By default (``ComputeArguments.second_moment_lifted=None``) the term is carried only while the lifted states
#: hold at most this many times the numbers of the recursion's own state: their work grows with them (measured,
#: BENCHMARKS.md: the digits MLP's 12.5x cost 3x the computation without them, a small GPT-2's 12x 24x, the LDS
#: bank's GPT-2 at 27x 65x for +0.02 LDS; the first two gained 0.05 and 0.17 Spearman).
LIFT_AUTO_RATIO = 16


def lift_plan(sizes: list[int], state_dims: list[int], own_state: int | None = None) -> list[int]:
    """Which layers' terms a computation carries: each layer's own size (:func:`lifted_size`; 0: not carried),
    kept in layer order while the (own size x state width) states add up to at most :data:`LIFT_STATE_MAX`.

    Args:
        sizes: per layer, :func:`lifted_size` (0 where the log does not carry the term).
        state_dims: per layer, the width D of its recursion's state (the concatenated dimension with
            ``blocks="full"``, the layer's own projected dimension with ``blocks="layer"``).
        own_state: for the default choice, the numbers in the recursion's own state: nothing is carried when the
            lifted states would hold more than :data:`LIFT_AUTO_RATIO` times as many (:func:`lift_ratio`);
            None: carried wherever :data:`LIFT_STATE_MAX` allows (asked for explicitly).
    """
    if own_state is not None and lift_ratio(sizes, state_dims, own_state) > LIFT_AUTO_RATIO:
        return [0] * len(sizes)
    budget, plan = LIFT_STATE_MAX, []
    for size, width in zip(sizes, state_dims, strict=True):
        fits = 0 < size * width <= budget
        budget -= size * width if fits else 0
        plan.append(size if fits else 0)
    return plan


def lift_ratio(sizes: list[int], state_dims: list[int], own_state: int) -> float:
    """Numbers in the lifted states (own size x state width, summed over the layers that offer the term) over
    ``own_state``, the numbers in the recursion's own state (``D^2`` for one full block, the sum of ``d^2`` over
    the layers otherwise); ``sizes`` and ``state_dims`` as :func:`lift_plan`'s."""
    return sum(s * d for s, d in zip(sizes, state_dims, strict=True)) / max(own_state, 1)


def lifted_size(layer: LayerEntry, projection: LayerProjection) -> int:
    """Coordinates over which a projected layer's second-moment term is carried (its own: ``n_out * n_in``),
    or 0 when the log does not carry it for this layer (a layer stored whole carries it exactly, not lifted).

    Args:
        layer: the layer's manifest entry (``second_moment``: :data:`LIFTED` for a log that carries both moments;
            ``"lifted"`` (second moment only, logs of one development day), ``"factors"`` and ``"none"`` do not).
        projection: the layer's projection.
    """
    if projection.is_identity:
        return 0
    size = projection.out_dim * projection.in_dim
    return size if layer.second_moment == LIFTED else 0


@dataclass
class StepMaps:
    """Coefficients of the linearised optimizer step, (G, S) each, for G layers and S steps.

    Attributes:
        weight: per-example weight ``w`` of the loss.
        beta: weight of the previous momentum perturbation.
        tau: weight of the step's gradient perturbation in the momentum.
        decay: ``c``, the decoupled weight-decay factor.
        a: rate of the momentum term.
        b: rate of the gradient term (Nesterov).
        l2: coupled (L2) weight decay.
        beta2: decay of the previous second-moment perturbation (Adam; 0 otherwise).
        preconditioners: per layer segment, or empty for the identity (SGD).
    """

    weight: torch.Tensor
    beta: torch.Tensor
    tau: torch.Tensor
    decay: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    l2: torch.Tensor
    beta2: torch.Tensor
    preconditioners: list[Preconditioner]

    @property
    def second_moment(self) -> bool:
        """True when some segment carries the second-moment term."""
        return any(p.sigma is not None for p in self.preconditioners)


def kronecker_preconditioner(
    v_row: torch.Tensor, v_col: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's preconditioner in a layer's Kronecker-projected coordinates, from Adafactor factors.

    With ``v_hat ~ r c^T / S`` (``r``, ``c`` the row and column sums, ``S`` their total) and gradient
    covariance ``C = diag(v_hat)``, the linear map of projected vectors closest (in mean square) to
    ``P^T D x`` is ``P^T D C P (P^T C P)^-1``; with ``D C = sqrt(v_hat)`` (eps neglected) it factors as
    ``sqrt(S) A kron B``, one small matrix per side. A side that is not projected gets its exact
    Adafactor diagonal ``1 / sqrt(r_i)`` (times the scale).

    Args:
        v_row: (S, out_dim) row sums of the bias-corrected second moment per step.
        v_col: (S, in_dim) column sums.
        p_out: (out_dim, k_out) projection of the out side.
        p_in: (in_dim, k_in) projection of the in side.

    Returns:
        (S, k_out, k_out) ``sqrt(S) A`` and (S, k_in, k_in) ``B``.
    """
    v_row, v_col = v_row.double(), v_col.double()
    total = v_row.sum(1)  # (S,)
    return _side(v_row, p_out.double()) * total.sqrt()[:, None, None], _side(v_col, p_in.double())


def scalar_preconditioner(
    v_row: torch.Tensor, v_col: torch.Tensor, k_out: int, k_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarser choice, for comparison: one number per layer and step, the mean of ``D`` weighted by
    ``v_hat`` (``sum sqrt(v_hat) / sum v_hat`` under the Adafactor factorisation), as ``(s I, I)``.

    Returns:
        (S, k_out, k_out) and (S, k_in, k_in).
    """
    v_row, v_col = v_row.double(), v_col.double()
    total = v_row.sum(1).clamp_min(1e-300)
    value = v_row.sqrt().sum(1) * v_col.sqrt().sum(1) / total**1.5  # (S,)
    eye_out = torch.eye(k_out, dtype=torch.float64).expand(len(value), k_out, k_out)
    eye_in = torch.eye(k_in, dtype=torch.float64).expand(len(value), k_in, k_in)
    return value[:, None, None] * eye_out, eye_in.clone()


def _side(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(S, k, k) ``P^T diag(sqrt v) P (P^T diag(v) P)^-1`` per step, a ridge keeping it defined."""
    num = torch.einsum("nk,sn,nl->skl", p, v.sqrt(), p)
    den = torch.einsum("nk,sn,nl->skl", p, v, p)
    k = p.shape[1]
    scale = den.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)  # (S,)
    den = den + (1e-10 * scale)[:, None, None] * torch.eye(k, dtype=v.dtype)
    # X = num den^-1, from den^T X^T = num^T (den is symmetric).
    solved: torch.Tensor = torch.linalg.solve(den, num.transpose(1, 2))
    return solved.transpose(1, 2)


def step_maps(
    optimizer: dict[str, torch.Tensor],
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    batch_size: torch.Tensor,
    *,
    propagation: str,
    nesterov: bool,
    loss_reduction: str,
    layers: list[tuple[str, LayerProjection]],
    layer_index: list[int],
    first_step: int,
    full: bool,
    second_moment: bool = True,
    projected_preconditioner: str = "kronecker",
    lifted: tuple[int, ...] = (),
) -> StepMaps:
    """The map coefficients of a chunk's steps for a group of layers.

    Args:
        optimizer: the chunk's optimizer tensors (``opt.*``, sliced to its S steps).
        lr: (S, n_layers) learning rates.
        weight_decay: (S, n_layers) weight decay.
        batch_size: (S,) examples per step.
        propagation: ``"momentum"``, ``"adam"`` or ``"adamw"``.
        nesterov: Nesterov momentum (SGD).
        loss_reduction: ``"mean"`` or ``"sum"``.
        layers: (name, projection) of every layer of the group, in the order of its segments.
        layer_index: index of each of them among the log's layers.
        first_step: the chunk's first global step (for error messages).
        full: the layers are concatenated into one vector (``blocks="full"``) instead of stacked.
        second_moment: model how removing the example changes Adam's second moment (exactly for layers
            stored whole; in their own coordinates for the projected layers of ``lifted``).
        lifted: positions (in ``layers``) of the projected layers whose term is carried in their own
            coordinates (:func:`lifted_size`; the recursion holds their state).
        projected_preconditioner: ``"kronecker"`` (:func:`kronecker_preconditioner`) or ``"scalar"``
            (:func:`scalar_preconditioner`) for projected layers.

    Returns:
        The coefficients, with one row per layer of the group.
    """
    idx = layer_index
    lr_g = lr[:, idx].T.double()  # (G, S)
    wd = weight_decay[:, idx].T.double()
    mom = optimizer["opt.momentum"][:, idx].T
    count = optimizer["opt.step"][:, idx].T
    fresh = count <= 1
    weight = (
        1.0 / batch_size.double() if loss_reduction == "mean" else torch.ones_like(batch_size).double()
    ).expand_as(lr_g)
    zeros = torch.zeros_like(lr_g)
    if propagation == "momentum":
        damp = optimizer["opt.dampening"][:, idx].T
        beta = torch.where(fresh, zeros, mom)
        tau = torch.where(fresh, torch.ones_like(lr_g), 1.0 - damp)
        a, b = (lr_g * mom, lr_g) if nesterov else (lr_g, zeros)
        return StepMaps(weight, beta, tau, torch.ones_like(lr_g), a, b, wd, zeros, [])
    if bool((count < 1).any()):
        raise NumericalError(f"Adam step count below 1 near step {first_step}: the log's optimizer state is damaged")
    a = lr_g / (1.0 - mom**count)
    decay, l2 = (1.0 - lr_g * wd, zeros) if propagation == "adamw" else (torch.ones_like(lr_g), wd)
    if bool((decay <= 0).any()):
        raise NumericalError(f"learning rate times weight decay reaches 1 near step {first_step}")
    beta2 = optimizer["opt.beta2"][:, idx].T
    segments = _preconditioners(optimizer, layers, full, projected_preconditioner)
    if second_moment:
        for seg, lr_layer, b2 in _segment_rates(segments, lr_g, beta2, full):
            _add_second_moment(seg, optimizer, layers, lr_layer, b2, full, lifted)
    return StepMaps(weight, mom, 1.0 - mom, decay, a, zeros, l2, beta2, segments)


def _segment_rates(
    segments: list[Preconditioner], lr: torch.Tensor, beta2: torch.Tensor, full: bool
) -> list[tuple[Preconditioner, torch.Tensor, torch.Tensor]]:
    """Each segment with the (G, S) learning rate and beta2 of its layers."""
    if not full:
        return [(segments[0], lr, beta2)]
    return [(seg, lr[i : i + 1], beta2[i : i + 1]) for i, seg in enumerate(segments)]


def _add_second_moment(
    seg: Preconditioner,
    optimizer: dict[str, torch.Tensor],
    layers: list[tuple[str, LayerProjection]],
    lr: torch.Tensor,
    beta2: torch.Tensor,
    full: bool,
    lifted: tuple[int, ...],
) -> None:
    """Attach ``sigma = lr * vsens`` and ``nu = 2 (1 - beta2) gamma`` to a segment: per coordinate for a layer
    stored whole, over the layer's own coordinates with its bases for a lifted projected one."""
    positions = [_segment_layer(seg, layers)] if full else list(range(len(layers)))
    if seg.diag is None:
        if not all(i in lifted for i in positions):
            return
        cpu = torch.device("cpu")
        p_out = [layers[i][1].p_out(dtype=torch.float64, device=cpu) for i in positions]
        p_in = [layers[i][1].p_in(dtype=torch.float64, device=cpu) for i in positions]
        seg.lift = (torch.stack(p_out), torch.stack(p_in))
        # The first moment in the same coordinates, through the exact preconditioner.
        seg.precond_own = torch.stack([_layer_tensor(optimizer, layers[i][0], "precond") for i in positions])
    vsens = torch.stack([_layer_tensor(optimizer, layers[i][0], "vsens") for i in positions])  # (G, S, N)
    batch_grad = torch.stack([_layer_tensor(optimizer, layers[i][0], "batch_grad") for i in positions])
    seg.sigma = lr.unsqueeze(-1) * vsens
    seg.nu = (2.0 * (1.0 - beta2)).unsqueeze(-1) * batch_grad


def reconstruction_gram(cov: torch.Tensor, p_out: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """Per step ``(P^T C P)^-1`` for a layer's Kronecker bases ``P = P_out kron P_in`` and a diagonal ``C``.

    A projected gradient change ``x = P^T g`` is taken back to the layer's own coordinates as its expectation
    under the gradients' covariance ``C``, ``L x = C P (P^T C P)^-1 x``. ``C`` is Adam's own per coordinate,
    ``(sqrt(v_hat) + eps)^2`` (the square of the inverse preconditioner): where the gradients are tiny, so is
    the reconstruction, and Adam's sensitivity to ``v`` there (up to ``~1 / eps^2``) meets a change of the
    same small scale as the exact map's. ``P`` alone spreads ``x`` over every coordinate (seven orders of
    magnitude too large on a GPT-2's rarely used vocabulary rows), and a covariance factored as Adafactor's
    (row sums times column sums) overstates the tiny coordinates in the same way. With square orthonormal
    bases ``L = P`` (the unprojected term, exactly).

    Args:
        cov: (S, n_out * n_in) the diagonal of ``C`` per step, the layer's gradient matrix flattened row-major.
        p_out: (n_out, k_out) the output side's basis.
        p_in: (n_in, k_in) the input side's basis.

    Returns:
        (S, k_out * k_in, k_out * k_in) the inverse Gram matrices (a tiny ridge keeps them defined).
    """
    (n_out, k_out), (n_in, k_in) = p_out.shape, p_in.shape
    steps = cov.shape[0]
    c = cov.double().reshape(steps, n_out, n_in)
    p_out, p_in = p_out.double(), p_in.double()
    # (P^T C P)[(a, b), (e, f)] = sum_i P_out[i, a] P_out[i, e] sum_j C[i, j] P_in[j, b] P_in[j, f]
    inner = torch.matmul((c.unsqueeze(-1) * p_in).transpose(-1, -2), p_in)  # (S, n_out, k_in, k_in)
    outer = (p_out.unsqueeze(-1) * p_out.unsqueeze(1)).reshape(n_out, k_out * k_out)  # (n_out, k_out^2)
    gram = torch.matmul(outer.T, inner.reshape(steps, n_out, k_in * k_in))  # (S, k_out^2, k_in^2)
    d = k_out * k_in
    gram = gram.reshape(steps, k_out, k_out, k_in, k_in).permute(0, 1, 3, 2, 4).reshape(steps, d, d)
    return _definite_inverse(gram)


def _definite_inverse(gram: torch.Tensor) -> torch.Tensor:
    """(S, d, d) inverses of symmetric positive semi-definite matrices, exact where they are numerically definite.

    ``C >= eps^2 > 0``, so the Gram matrix is definite for bases of full column rank, and Cholesky inverts it with
    no ridge (a ridge of 1e-13 of the mean diagonal moved full-rank bases' result by 3e-9: C spans 1e-14 of its
    range). Where Cholesky finds it not definite in floating point (coordinates that never see a gradient next to
    large ones), the inverse is taken over its eigenvalues above 1e-12 of the largest (a pseudo-inverse): the
    directions it drops carry no gradient. (torch's LU inverse failed on some of a GPT-2's batches with "pivots
    given to lu_solve must all be greater or equal to 1".)"""
    factor, info = torch.linalg.cholesky_ex(gram)
    failed = (info != 0).nonzero().flatten()
    if len(failed):
        factor[failed] = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)  # replaced below
    inverse = torch.cholesky_inverse(factor)
    if len(failed):
        values, vectors = torch.linalg.eigh(gram[failed])
        floor = values.amax(-1, keepdim=True).clamp_min(1e-300) * 1e-12
        kept = torch.where(values > floor, 1.0 / values.clamp_min(1e-300), torch.zeros_like(values))
        inverse[failed] = (vectors * kept.unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return inverse


def _layer_tensor(optimizer: dict[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    """(S, N) one of a layer's per-coordinate optimizer tensors per step (a layer stored whole or lifted), float64."""
    return optimizer[fmt.optimizer_layer_key(what, name)].double()


def _segment_layer(seg: Preconditioner, layers: list[tuple[str, LayerProjection]]) -> int:
    """Index of the layer whose segment of the concatenated vector starts at ``seg.start``."""
    start = 0
    for index, (_, projection) in enumerate(layers):
        if start == seg.start:
            return index
        start += projection.dim
    raise ValueError(f"no layer starts at {seg.start}")


def _preconditioners(
    optimizer: dict[str, torch.Tensor], layers: list[tuple[str, LayerProjection]], full: bool, projected: str
) -> list[Preconditioner]:
    """One stacked (G, ...) segment for a group of same-layout layers, or one segment per layer of the
    concatenated vector (``full``, G = 1)."""
    if not full:
        return [_layer_preconditioner(optimizer, layers, 0, projected)]
    segments, start = [], 0
    for layer in layers:
        segments.append(_layer_preconditioner(optimizer, [layer], start, projected))
        start += layer[1].dim
    return segments


def _layer_preconditioner(
    optimizer: dict[str, torch.Tensor], layers: list[tuple[str, LayerProjection]], start: int, projected: str
) -> Preconditioner:
    """(G, ...) preconditioner of G layers of one layout, stacked."""
    if layers[0][1].is_identity:
        diag = torch.stack([optimizer[fmt.optimizer_layer_key("precond", name)].double() for name, _ in layers])
        return Preconditioner(start, diag=diag)
    factors = []
    for name, projection in layers:
        v_row = optimizer[fmt.optimizer_layer_key("v_row", name)]
        v_col = optimizer[fmt.optimizer_layer_key("v_col", name)]
        if projected == "scalar":
            factors.append(scalar_preconditioner(v_row, v_col, projection.k_out, projection.k_in))
            continue
        cpu = torch.device("cpu")
        p_out = projection.p_out(dtype=torch.float64, device=cpu)
        p_in = projection.p_in(dtype=torch.float64, device=cpu)
        factors.append(kronecker_preconditioner(v_row, v_col, p_out, p_in))
    return Preconditioner(start, kron=(torch.stack([f[0] for f in factors]), torch.stack([f[1] for f in factors])))
