"""Output-side curvature factors for the Gauss-Newton (ggn) mode.

For softmax cross-entropy with logits ``z`` and probabilities ``p``, the Hessian with respect to
``z`` is ``diag(p) - p p^T = sum_c p_c (p - e_c)(p - e_c)^T``, and ``p - e_c`` is the gradient of
the loss with label ``c``. Back-propagating the rows below through the network therefore gives
factors ``f`` of the Gauss-Newton matrix, ``GGN = sum f f^T``:

- all classes (classification logits (B, C) with few classes): ``sqrt(p_c) (p - e_c)`` for every c;
- ``n`` rows (any logits): the ``n - 1`` most probable classes' rows exactly, and one row for all the others, a
  label ``y`` drawn from them (``P(y) = p_y / m``, ``m`` their total probability) as ``sqrt(m) (p - e_y)``, whose
  expected outer product is their sum: an unbiased estimate ``E[sum f f^T] = GGN`` (:data:`ESTIMATOR`). With one
  row it is the label sampled from the prediction, ``(p - e_y)``, ``y ~ p``; with more, its noise is only that of
  the least probable classes, where most of the probability sits on a few (BENCHMARKS.md "Curvature rows:
  fidelity against cost" measures it next to as many sampled labels, ``(p - e_y) / sqrt(n)``, the estimator
  before this one, in logs without ``curvature.estimator``). For sequence logits (B, L, V) every position gets its
  own classes and label, and, once classes are kept, every row a random sign of its own at every position: an
  example's factor sums its positions' rows, and the products of two positions' rows must vanish in expectation.

A loss that weights its positions (``c`` per position: ``1/L`` for a per-example mean over positions, the
loss's own weights when they are read off its gradient, :mod:`dvemb.output_curvature`) has Hessian
``c (diag(p) - p p^T)``: the rows are scaled by ``sqrt(c)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ALL_CLASSES_UP_TO", "ESTIMATOR", "cross_entropy_factor_rows", "logit_factor_rows", "rows_per_example"]

#: Classes up to which every class of (B, C) logits gets its own row (the exact GGN); one sample beyond.
ALL_CLASSES_UP_TO = 32
#: The manifest's name of the estimator of sampled rows (``curvature.estimator``): see the module docstring.
ESTIMATOR = "top-classes+label"


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
        samples: rows per position (the most probable classes, and one label drawn from the others), or None
            for one row per class (2-D logits only).
        generator: random generator for the labels and signs (same device as ``logits``).

    Returns:
        (R, *logits.shape) rows in the logits' dtype: ``sqrt(c p_k) (p - e_k)`` for every class k (R = C), or
        ``s_k sqrt(c p_k) (p - e_k)`` for the ``R - 1`` most probable classes k of each position and then
        ``s sqrt(c m) (p - e_y)`` with ``y`` drawn from its other classes, random signs ``s`` once classes are kept
        (R = min(``samples``, V)).
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
    flat = probs.reshape(-1, classes)  # (N, V), N = B*L positions
    kept = min(samples, classes) - 1
    top = flat.topk(kept, dim=-1).indices  # (N, k): each position's most probable classes
    exact = flat.gather(-1, top).T.sqrt().unsqueeze(-1) * (
        flat.unsqueeze(0) - torch.nn.functional.one_hot(top.T, classes).to(work)
    )  # (k, N, V): sqrt(p_k) (p - e_k)
    rest = flat.scatter(-1, top, 0.0)  # (N, V): the probabilities of the classes not kept
    mass = rest.sum(-1, keepdim=True)  # (N, 1)
    drawn = torch.multinomial(rest + (mass <= 0).to(work), 1, generator=generator)  # (N, 1): y ~ rest / mass
    other = mass.sqrt() * (flat - torch.nn.functional.one_hot(drawn[:, 0], classes).to(work))  # (N, V)
    if kept:
        # An example's factor sums its positions' rows: random signs make the products of two positions' rows
        # vanish in expectation (a kept class's row is not random, the rest's is not zero-mean once classes are kept).
        signs = torch.randint(0, 2, (kept + 1, flat.shape[0], 1), generator=generator, device=z.device).to(work) * 2 - 1
        exact, other = exact * signs[:kept], other * signs[kept]
    rows = torch.cat([exact, other.unsqueeze(0)]).reshape(kept + 1, *probs.shape)
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
        samples: rows per example (:func:`cross_entropy_factor_rows`), or None for all classes (2-D logits only).
        position_reduction: ``"mean"`` or ``"sum"``: how a sequence example's loss combines positions.
        generator: random generator for the signs (same device as ``logits``).

    Returns:
        R tensors shaped like ``logits`` (R = C for all classes, else min(``samples``, V)); back-propagating
        each gives one factor row per example.
    """
    positions = 1 if logits.dim() == 2 else math.prod(logits.shape[1:-1])
    weight = 1.0 / positions if position_reduction == "mean" else 1.0
    weights = torch.full(logits.shape[:-1], weight, dtype=torch.float64)
    return list(cross_entropy_factor_rows(logits, weights, samples=samples, generator=generator))
