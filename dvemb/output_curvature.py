"""Gauss-Newton factor rows found from the model's own output, with no extra line in the training loop.

The recorder's default curvature (``ggn``) needs, for every example, rows ``r`` at the model's output whose
back-propagation gives factors of the Gauss-Newton matrix (:mod:`dvemb.curvature`). A forward hook on the
model finds its output logits (:func:`find_logits`); a hook on that tensor receives the gradient of the
user's loss with respect to it during ``loss.backward()``, while the graph below it is still alive. That
gradient says which loss was used and how it was scaled:

- **softmax cross-entropy**: at every position ``g = c (p - e_y)`` with ``p = softmax(logits)``, ``y`` the
  label and ``c >= 0`` the weight the loss gives the position (``1/B`` for a batch mean, ``1/N`` for a mean
  over the batch's N tokens, ``0`` for an ignored position, times a mixed-precision loss scale). The Hessian
  of the loss with respect to the logits is ``c (diag p - p p^T)`` whatever ``y``, so ``c`` is all the rows
  need: :func:`cross_entropy_weights` recovers it by least squares and checks the fit, and anything else
  (label smoothing, a loss on another tensor, mean squared error) is refused with a message.
- **mean squared error** (asked for with ``curvature_loss="mse"``; its gradient cannot be told from any
  other): the per-example loss is the mean over the output's D values, Hessian ``(2/D) I``.

The rows of cross-entropy carry the loss's own weights ``c``; the recorder rescales them to per-example
rows at the end of the step (times the step's example count for a mean-reduced loss, divided by the loss
scale), exactly as it rescales the recorded gradients, so that they equal the rows of an explicit
``rec.curvature(logits)`` call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from dvemb.curvature import ALL_CLASSES_UP_TO, cross_entropy_factor_rows, rows_per_example

__all__ = ["CROSS_ENTROPY_TOLERANCE", "cross_entropy_weights", "find_logits", "output_factor_rows"]

#: Largest relative misfit ``|g - c (p - e_y)| / |g|`` accepted as softmax cross-entropy, by logits dtype.
CROSS_ENTROPY_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
_HALF_TOLERANCE = 5e-2  # float16 / bfloat16 logits and gradients


def find_logits(output: Any) -> torch.Tensor | None:
    """The logits in a model's forward output: the output itself when it is a tensor, a tuple's or list's
    first element, a mapping's or a ``ModelOutput``'s ``logits``; None when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        found = output.get("logits")
        if isinstance(found, torch.Tensor):
            return found
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def cross_entropy_weights(logits: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The weight ``c`` of every position in a softmax cross-entropy loss, from the loss's gradient.

    Args:
        logits: (B, [L,] V) the model's output logits.
        grad: the gradient of the loss with respect to ``logits``, same shape.

    Returns:
        (B, [L]) float64 weights ``c >= 0`` (0 where the position does not count), and the worst relative
        misfit ``|g - c (p - e_y)| / |g|`` over the positions that count (0.0 when none does).
    """
    z = logits.detach().to(torch.float64)
    g = grad.detach().to(torch.float64)
    probs = torch.softmax(z, dim=-1)  # (B, [L,] V)
    residual_of_label = probs.clone()
    residual_of_label.scatter_add_(-1, g.argmin(-1, keepdim=True), -torch.ones_like(g[..., :1]))  # p - e_y
    norm2 = residual_of_label.pow(2).sum(-1)  # (B, [L])
    weights = (g * residual_of_label).sum(-1) / norm2.clamp_min(1e-300)
    misfit = (g - weights.unsqueeze(-1) * residual_of_label).norm(dim=-1)  # (B, [L])
    g_norm = g.norm(dim=-1)
    scale = float(g_norm.max()) if g_norm.numel() else 0.0
    counted = g_norm > 1e-12 * max(scale, 1e-300)
    relative = torch.where(counted, misfit / g_norm.clamp_min(1e-300), torch.zeros_like(misfit))
    weights = torch.where(counted, weights, torch.zeros_like(weights))
    worst = float(relative.max()) if relative.numel() else 0.0
    if bool((weights < 0).any()):
        worst = max(worst, 1.0)
    return weights.clamp_min(0.0), worst


def tolerance_for(dtype: torch.dtype) -> float:
    """The misfit accepted as softmax cross-entropy for logits of ``dtype``."""
    return CROSS_ENTROPY_TOLERANCE.get(dtype, _HALF_TOLERANCE)


def output_factor_rows(
    logits: torch.Tensor,
    *,
    loss: str,
    weights: torch.Tensor | None,
    samples: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Rows at the output whose back-propagation gives Gauss-Newton factors, stacked.

    Args:
        logits: (B, [L,] V) output logits.
        loss: ``"cross_entropy"`` or ``"mse"``.
        weights: (B, [L]) cross-entropy weights from :func:`cross_entropy_weights` (ignored for mse).
        samples: sampled rows per example (labels for cross-entropy, random sign vectors for mse), or
            None for one row per class (2-D logits with at most :data:`ALL_CLASSES_UP_TO` classes; else 1).
        generator: random generator for the samples (same device as ``logits``).

    Returns:
        (R, *logits.shape) rows in the logits' dtype: for cross-entropy
        :func:`dvemb.curvature.cross_entropy_factor_rows`; for mse ``sqrt(2/D) e_j`` or
        ``sqrt(2 / (D n)) s`` with random signs ``s``.
    """
    if loss == "mse":
        return _mse_rows(logits.detach(), samples, generator).to(logits.dtype)
    assert weights is not None
    return cross_entropy_factor_rows(logits, weights, samples=rows_per_example(samples, logits), generator=generator)


def _mse_rows(z: torch.Tensor, samples: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """(R, *z.shape) factor rows of the per-example mean squared error over the output's D values."""
    per_example = math.prod(z.shape[1:])
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    scale = math.sqrt(2.0 / per_example)
    if samples is None and per_example <= ALL_CLASSES_UP_TO:
        eye = torch.eye(per_example, dtype=work, device=z.device).view(per_example, 1, *z.shape[1:])
        return (eye * scale).expand(per_example, *z.shape).clone()
    count = samples or 1
    signs = torch.randint(0, 2, (count, *z.shape), generator=generator, device=z.device).to(work) * 2 - 1
    return signs * (scale / math.sqrt(count))
