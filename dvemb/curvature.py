"""Output-side curvature factors for the Gauss-Newton (ggn) mode.

For softmax cross-entropy with logits ``z`` and probabilities ``p``, the Hessian with respect to
``z`` is ``diag(p) - p p^T = sum_c p_c (p - e_c)(p - e_c)^T``, and ``p - e_c`` is the gradient of
the loss with label ``c``. Back-propagating the rows below through the network therefore gives
factors ``f`` of the Gauss-Newton matrix, ``GGN = sum f f^T``:

- all classes (classification logits (B, C) with few classes): ``sqrt(p_c) (p - e_c)`` for every c;
- sampled labels ``y ~ p`` (any logits, one row per sample): ``(p - e_y) / sqrt(n)``, an unbiased
  estimate ``E[f f^T] = GGN``. For sequence logits (B, L, V) labels are drawn at every position
  independently (cross terms vanish in expectation).

A loss that weights its positions (``c`` per position: ``1/L`` for a per-example mean over positions, the
loss's own weights when they are read off its gradient, :mod:`dvemb.output_curvature`) has Hessian
``c (diag(p) - p p^T)``: the rows are scaled by ``sqrt(c)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ALL_CLASSES_UP_TO", "cross_entropy_factor_rows", "logit_factor_rows", "rows_per_example"]

#: Classes up to which every class of (B, C) logits gets its own row (the exact GGN); one sample beyond.
ALL_CLASSES_UP_TO = 32


def rows_per_example(samples: int | None, logits: torch.Tensor) -> int | None:
    """The ``samples`` to use for these logits: as asked, or None (all classes) only for (B, C) logits with at
    most :data:`ALL_CLASSES_UP_TO` classes, else one sampled label."""
    if samples is None and (logits.dim() != 2 or logits.shape[-1] > ALL_CLASSES_UP_TO):
        return 1
    return samples


def cross_entropy_factor_rows(
    logits: torch.Tensor, weights: torch.Tensor, *, samples: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Rows at the logits whose back-propagation gives Gauss-Newton factors of a weighted cross-entropy.

    Args:
        logits: (B, [L,] V) logits.
        weights: (B, [L]) weight ``c >= 0`` of every position in the loss.
        samples: sampled labels per position, or None for one row per class (2-D logits only).
        generator: random generator for the sampled labels (same device as ``logits``).

    Returns:
        (R, *logits.shape) rows in the logits' dtype: ``sqrt(c p_k) (p - e_k)`` for every class k (R = C), or
        ``sqrt(c / n) (p - e_y)`` with ``y ~ p`` (R = n = ``samples``).
    """
    z = logits.detach()
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    probs = torch.softmax(z.to(work), dim=-1)  # (B, [L,] V)
    root = weights.to(device=z.device, dtype=work).sqrt().unsqueeze(-1)  # (B, [L,] 1)
    classes = probs.shape[-1]
    if samples is None:
        if z.dim() != 2:
            raise ValueError("all-class curvature factors need (B, C) logits; set curvature_samples for sequences")
        eye = torch.eye(classes, dtype=work, device=z.device)
        rows = probs.sqrt().T.unsqueeze(-1) * (probs.unsqueeze(0) - eye.view(classes, 1, classes))  # (C, B, C)
        return (rows * root.unsqueeze(0)).to(z.dtype)
    flat = probs.reshape(-1, classes)  # (B*L, V)
    drawn = torch.multinomial(flat, samples, replacement=True, generator=generator)  # (B*L, n)
    one_hot = torch.nn.functional.one_hot(drawn.T, classes).to(work)  # (n, B*L, V)
    rows = (flat.unsqueeze(0) - one_hot).reshape(samples, *probs.shape) / math.sqrt(samples)
    return (rows * root.unsqueeze(0)).to(z.dtype)


def logit_factor_rows(
    logits: torch.Tensor,
    *,
    samples: int | None,
    position_reduction: str,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Gradients with respect to the logits whose back-propagation gives GGN factors of the per-example loss.

    Args:
        logits: (B, C) or (B, L, V) logits of the per-example softmax cross-entropy loss.
        samples: number of sampled labels per example, or None for all classes (2-D logits only).
        position_reduction: ``"mean"`` or ``"sum"``: how a sequence example's loss combines positions.
        generator: random generator for the sampled labels (same device as ``logits``).

    Returns:
        R tensors shaped like ``logits`` (R = C for all classes, else ``samples``); back-propagating
        each gives one factor row per example.
    """
    positions = 1 if logits.dim() == 2 else math.prod(logits.shape[1:-1])
    weight = 1.0 / positions if position_reduction == "mean" else 1.0
    weights = torch.full(logits.shape[:-1], weight, dtype=torch.float64)
    return list(cross_entropy_factor_rows(logits, weights, samples=samples, generator=generator))
