"""One step of the adjoint pass: the queries' sensitivities pulled back through one training step (docs/replay.md §2).

Two ways, same numbers:

- :func:`fused_step_adjoint` (one micro-batch): the optimizer's update is built on top of the gradient's own graph
  (``create_graph=True``), and one backward pass per query through both returns the update's transpose, the
  Hessian-vector product ``H u`` and every example's ``d J / d w_z`` at once;
- :func:`split_step_adjoint` (several micro-batches): the update is pulled back first (giving ``u = d J / d g``),
  then each micro-batch's gradient graph is rebuilt and pulled back with ``u`` (memory of one micro-batch).

:class:`Puller` does the vector-Jacobian products for K queries at once (``is_grads_batched``: a vmap over the
backward pass) and falls back to one query at a time where an operation has no batching rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from dvemb.replay.optimizers import FunctionalOptimizer, OptimizerState
from dvemb.replay.training import ReplayError, TrainingStep

__all__ = ["Puller", "fused_step_adjoint", "split_step_adjoint"]


class Puller:
    """Vector-Jacobian products of K cotangents, batched while that works."""

    def __init__(self) -> None:
        self.batched = True

    def __call__(
        self,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        cotangents: Sequence[torch.Tensor],
        t: int,
    ) -> list[torch.Tensor]:
        """``(d outputs / d inputs)^T cotangent`` for each of K cotangents.

        Args:
            outputs: tensors of a graph over ``inputs``.
            inputs: leaves.
            cotangents: per output (K, *shape).
            t: the step (for the error message).

        Returns:
            per input (K, *shape) (zeros where an input does not reach the outputs).
        """
        K = cotangents[0].shape[0]
        try:
            if self.batched and K > 1:
                try:
                    with warnings.catch_warnings():  # vmap's "no batching rule, slow fallback" notice
                        warnings.simplefilter("ignore")
                        pulled = torch.autograd.grad(
                            list(outputs),
                            list(inputs),
                            list(cotangents),
                            retain_graph=True,
                            allow_unused=True,
                            is_grads_batched=True,
                        )
                    return [_zeros((K, *x.shape), x) if d is None else d for x, d in zip(inputs, pulled, strict=True)]
                except RuntimeError:
                    self.batched = False  # an operation vmap cannot batch: one query at a time from now on
            rows = [
                torch.autograd.grad(
                    list(outputs), list(inputs), [c[k] for c in cotangents], retain_graph=True, allow_unused=True
                )
                for k in range(K)
            ]
        except RuntimeError as error:
            raise ReplayError(
                f"step {t}: the Hessian-vector product failed ({error}); a layer without double backward (some fused "
                "attention or normalisation kernels) cannot be replayed: use its plain implementation "
                "(e.g. attn_implementation='eager')"
            ) from error
        return [
            torch.stack([torch.zeros_like(x) if r[i] is None else r[i] for r in rows]) for i, x in enumerate(inputs)
        ]


def _zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _leaves(params: Sequence[torch.Tensor], opt: OptimizerState) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [p.detach().requires_grad_(True) for p in params], [s.detach().requires_grad_(True) for s in opt.flat()]


def fused_step_adjoint(
    step: TrainingStep,
    optimizer: FunctionalOptimizer,
    params: Sequence[torch.Tensor],
    opt: OptimizerState,
    ids: Sequence[object],
    lrs: Sequence[float],
    lam: Sequence[torch.Tensor],
    pull: Puller,
    t: int,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step ``t`` pulled back in one backward pass per query (a step of one micro-batch).

    Args:
        step, optimizer: the training step and the update.
        params, opt: the state entering the step.
        ids: the step's example ids.
        lrs: the groups' rates at the step.
        lam: per parameter then per optimizer slot, (K, *shape) ``d J / d`` the state after the step.
        pull: the vector-Jacobian products.
        t: the step.

    Returns:
        the same sensitivities for the state entering the step, and (K, B) ``d J / d w_z``.
    """
    leaves, slots = _leaves(params, opt)
    w = torch.ones(len(ids), dtype=leaves[0].dtype, device=leaves[0].device, requires_grad=True)
    grads, _ = step.part_gradient(leaves, ids, w, len(ids), create_graph=True)
    new_params, new_opt = optimizer.step(leaves, grads, opt.with_flat(slots), lrs)
    pulled = pull([*new_params, *new_opt.flat()], [*leaves, *slots, w], lam, t)
    return [x.detach() for x in pulled[:-1]], pulled[-1].detach()


def split_step_adjoint(
    step: TrainingStep,
    optimizer: FunctionalOptimizer,
    params: Sequence[torch.Tensor],
    opt: OptimizerState,
    ids: Sequence[object],
    lrs: Sequence[float],
    lam: Sequence[torch.Tensor],
    pull: Puller,
    t: int,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`fused_step_adjoint` for a step of several micro-batches, one micro-batch's graph at a time."""
    leaves, slots = _leaves(params, opt)
    ids = list(ids)
    B = len(ids)
    grads = step.gradient(leaves, ids)[0]
    g_leaves = [None if g is None else g.detach().requires_grad_(True) for g in grads]
    present = [i for i, g in enumerate(g_leaves) if g is not None]
    new_params, new_opt = optimizer.step(leaves, g_leaves, opt.with_flat(slots), lrs)
    pulled = pull([*new_params, *new_opt.flat()], [*leaves, *slots, *(g for g in g_leaves if g is not None)], lam, t)
    P, S = len(leaves), len(slots)
    out = pulled[: P + S]  # the update's own transpose; H u is added below
    u = dict(zip(present, pulled[P + S :], strict=True))  # d J / d g_t
    K = lam[0].shape[0]
    dw = _zeros((K, B), leaves[0])
    for part in step.parts(B):
        w = torch.ones(part.stop - part.start, dtype=leaves[0].dtype, device=leaves[0].device, requires_grad=True)
        part_grads, _ = step.part_gradient(leaves, ids[part], w, B, create_graph=True)
        used = [i for i in present if part_grads[i] is not None]
        outs = [g for i in used if (g := part_grads[i]) is not None]
        second = pull(outs, [*leaves, w], [u[i] for i in used], t)
        for i in range(P):
            out[i] = out[i] + second[i]
        dw[:, part] = second[-1]
    return [x.detach() for x in out], dw.detach()
