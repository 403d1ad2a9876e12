"""One step of the adjoint pass: the queries' sensitivities pulled back through one training step (docs/replay.md §2).

:func:`step_adjoint`: the optimizer's update is pulled back by its written-out transpose
(:meth:`~dvemb.replay.optimizers.FunctionalOptimizer.pull_back`, giving ``u = d J / d g``), then the gradient's graph
(``create_graph=True``; with micro-batches, each micro-batch's in turn, memory of one) is pulled back with ``u``: one
backward pass returns the Hessian-vector product ``H u`` and every example's ``d J / d w_z`` at once.

:class:`Puller` does the vector-Jacobian products for K queries at once (``is_grads_batched``: a vmap over the
backward pass) and falls back to one query at a time where an operation has no batching rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from dvemb.replay.optimizers import FunctionalOptimizer, OptimizerState
from dvemb.replay.training import ReplayError, TrainingStep

__all__ = ["Puller", "step_adjoint"]


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


def step_adjoint(
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
    """Step ``t`` pulled back: the update's written-out transpose, then one Hessian-vector pass per micro-batch.

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
    leaves = [p.detach().requires_grad_(True) for p in params]
    ids = list(ids)
    B = len(ids)
    parts = step.parts(B)
    kept: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None
    if len(parts) == 1:  # one micro-batch: its gradient's graph is the one the Hessian-vector product needs
        w = torch.ones(B, dtype=leaves[0].dtype, device=leaves[0].device, requires_grad=True)
        grads, _ = step.part_gradient(leaves, ids, w, B, create_graph=True)
        kept = (w, grads)
    else:
        grads = step.gradient(leaves, ids)[0]
    a_theta, a_slots, u = optimizer.pull_back(params, [None if g is None else g.detach() for g in grads], opt, lrs, lam)
    K = lam[0].shape[0]
    dw = _zeros((K, B), leaves[0])
    for part in parts:
        if kept is None:
            w = torch.ones(part.stop - part.start, dtype=leaves[0].dtype, device=leaves[0].device, requires_grad=True)
            part_grads, _ = step.part_gradient(leaves, ids[part], w, B, create_graph=True)
        else:
            w, part_grads = kept
        pairs = [(g, c) for g, c in zip(part_grads, u, strict=True) if g is not None and c is not None]
        if not pairs:
            continue
        hvp = pull([g for g, _ in pairs], [*leaves, w], [c for _, c in pairs], t)
        for i, x in enumerate(hvp[:-1]):
            # in place unless the update passed the incoming sensitivity through unchanged (it is the caller's)
            a_theta[i] = a_theta[i].add_(x) if a_theta[i] is not lam[i] else a_theta[i] + x
        dw[:, part] = hvp[-1]
    return [x.detach() for x in (*a_theta, *a_slots)], dw.detach()
