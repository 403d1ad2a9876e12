"""Output-side curvature factors for the Gauss-Newton (ggn) mode.

For softmax cross-entropy with logits ``z`` and probabilities ``p``, the Hessian with respect to
``z`` is ``diag(p) - p p^T = sum_c p_c (p - e_c)(p - e_c)^T``, and ``p - e_c`` is the gradient of
the loss with label ``c``. Back-propagating the rows below through the network therefore gives
factors ``f`` of the Gauss-Newton matrix, ``GGN = sum f f^T``:

- all classes (classification logits (B, C) with few classes): ``sqrt(p_c) (p - e_c)`` for every c;
- sampled labels ``y ~ p`` (any logits, one row per sample): ``(p - e_y) / sqrt(n)``, an unbiased
  estimate ``E[f f^T] = GGN``. For sequence logits (B, L, V) labels are drawn at every position
  independently (cross terms vanish in expectation); with the per-example loss averaged over
  positions the rows are further scaled by ``1/sqrt(L)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["logit_factor_rows"]


def logit_factor_rows(
    logits: torch.Tensor,
    *,
    samples: int | None,
    position_reduction: str,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Gradients with respect to the logits whose back-propagation gives GGN factors.

    Args:
        logits: (B, C) or (B, L, V) logits of the per-example softmax cross-entropy loss.
        samples: number of sampled labels per example, or None for all classes (2-D logits only).
        position_reduction: ``"mean"`` or ``"sum"``: how a sequence example's loss combines positions.
        generator: random generator for the sampled labels (same device as ``logits``).

    Returns:
        R tensors shaped like ``logits`` (R = C for all classes, else ``samples``); back-propagating
        each gives one factor row per example.
    """
    z = logits.detach()
    probs = torch.softmax(z.to(torch.float64 if z.dtype == torch.float64 else torch.float32), dim=-1)  # (B, [L,] V)
    num_classes = probs.shape[-1]
    if samples is None:
        if z.dim() != 2:
            raise ValueError("all-class curvature factors need (B, C) logits; set curvature_samples for sequences")
        eye = torch.eye(num_classes, dtype=probs.dtype, device=probs.device)
        rows = [(probs.sqrt()[:, c : c + 1] * (probs - eye[c])).to(z.dtype) for c in range(num_classes)]  # (B, C) each
        return rows
    positions = 1 if z.dim() == 2 else math.prod(z.shape[1:-1])
    scale = 1.0 / math.sqrt(samples * (positions if position_reduction == "mean" else 1))
    flat = probs.reshape(-1, num_classes)  # (B*L, V)
    drawn = torch.multinomial(flat, samples, replacement=True, generator=generator)  # (B*L, samples)
    rows = []
    for s in range(samples):
        one_hot = torch.nn.functional.one_hot(drawn[:, s], num_classes).to(probs.dtype)  # (B*L, V)
        rows.append(((flat - one_hot) * scale).reshape(probs.shape).to(z.dtype))
    return rows
