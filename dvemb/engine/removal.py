"""What removing an occurrence from its step means, and the exact map between the two definitions.

The recursion computes every occurrence's embedding for the removal ``-g_z / B`` (``"weight"``: the
example's weight in the step's loss becomes 0, the others keep theirs; the paper's sum-loss definition).
Dropping an example from a mean-reduced batch instead replaces the batch mean by the others' mean, a
gradient change of ``-(g_z - g_B) / (B - 1)`` (``"batch"``: what leaving it out of the data does, and
what exact retraining measures). Embeddings and scores are linear in that change, so the second follows
from the first per step: ``x'_z = B / (B - 1) * (x_z - mean_{z' in step} x_z')``. A step of one example
keeps its values (removing it removes the step's whole gradient either way).

A step's mean score under ``"batch"`` is 0 by construction, so the per-step curves and the phases (the
influence of each step's data as a whole) are computed from the ``"weight"`` scores; the scores of
occurrences, their totals, tops and stored embeddings follow the chosen removal.
"""

from __future__ import annotations

import torch

from dvemb.reader import GradientLog

__all__ = ["REMOVALS", "centre_steps", "resolve_removal"]

#: What removing an occurrence means (``ComputeArguments.removal``).
REMOVALS = ("auto", "batch", "weight")


def resolve_removal(requested: str, log: GradientLog) -> str:
    """``"batch"`` or ``"weight"``: ``requested``, or for ``"auto"`` ``"batch"`` when the log's loss is the
    batch mean and ``"weight"`` when it is summed (removing a summed term renormalises nothing)."""
    if requested != "auto":
        return requested
    return "batch" if log.loss_reduction == "mean" else "weight"


def centre_steps(values: torch.Tensor, position: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-occurrence values under ``"weight"`` removal -> the same under ``"batch"`` removal.

    Args:
        values: (n, k) embeddings or scores of whole steps.
        position: (n,) int64 step of each row, 0 to ``steps - 1``.
        steps: number of steps.

    Returns:
        (n, k) ``B/(B-1) (x - step mean)`` (a step of one row unchanged), a new tensor.
    """
    counts = torch.bincount(position, minlength=steps).to(values.dtype)  # (S,)
    sums = values.new_zeros(steps, values.shape[1]).index_add_(0, position, values)
    several = counts > 1
    mean = torch.where(several[:, None], sums / counts.clamp(min=1)[:, None], torch.zeros_like(sums))
    factor = torch.where(several, counts / (counts - 1).clamp(min=1), torch.ones_like(counts))
    return (values - mean[position]) * factor[position, None]
