"""Per-example training losses that a replay can be told by name (a replay bundle, docs/replay.md section 4), and
that the Hugging Face integration uses for the Trainer's loss.

- ``"cross_entropy"``: ``(B, C)`` logits and ``(B,)`` labels, one cross-entropy per example;
- ``"causal_lm"``: ``(B, L, V)`` logits and ``(B, L)`` labels (-100 ignored), the summed token cross-entropy of
  each example with the labels shifted by one, divided by the labels counted for it: ``count="shifted"`` counts the
  shifted labels (the model's own mean, and the Trainer's count for a model whose loss shifts them), ``"labels"``
  all labels that are not -100 (the Trainer's ``num_items_in_batch`` for GPT-2 in transformers 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dvemb.errors import ConfigError
from dvemb.layers import widened

__all__ = ["LOSSES", "TOKEN_COUNTS", "per_example_loss"]

LOSSES = ("cross_entropy", "causal_lm")
TOKEN_COUNTS = ("shifted", "labels")


def per_example_loss(kind: str, count: str = "shifted") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(logits, labels) -> (B,)`` per-example losses of ``kind`` (module docstring); a ``"causal_lm"`` loss given
    2-D logits is the cross-entropy (a classifier head on the same model)."""
    if kind not in LOSSES:
        raise ConfigError(f"loss {kind!r} is not one of {', '.join(LOSSES)}")
    if count not in TOKEN_COUNTS:
        raise ConfigError(f"token count {count!r} is not one of {', '.join(TOKEN_COUNTS)}")

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if kind == "cross_entropy" or not (logits.dim() == 3 and labels.dim() == 2):
            return F.cross_entropy(widened(logits), labels, reduction="none")
        shifted_logits, shifted = widened(logits[:, :-1]), labels[:, 1:]
        per_token = F.cross_entropy(
            shifted_logits.flatten(0, 1), shifted.flatten(), reduction="none", ignore_index=-100
        ).view(shifted.shape)
        counted = shifted if count == "shifted" else labels
        return per_token.sum(1) / (counted != -100).sum(1).clamp_min(1).to(per_token.dtype)

    return loss
