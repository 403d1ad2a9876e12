"""What the recorder runs on a user's batch outside the training loop (calibration, look-ahead, queries): the
model's output tensor and the default per-example loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dvemb.errors import ConfigError

__all__ = ["LossFn", "default_loss", "model_outputs"]

#: A per-example loss: ``(outputs, targets) -> (B,)``.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy: (B, C) with (B,) targets, or (B, L, V) with (B, L) averaged over positions
    (targets of -100 left out, as ``F.cross_entropy`` ignores them). Returns (B,)."""
    if outputs.dim() == 2:
        return F.cross_entropy(outputs, targets, reduction="none")
    per_position = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    valid = (targets != -100).to(per_position.dtype)  # (B, L)
    return (per_position * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def model_outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's output tensor for a batch's inputs: a tensor, or a mapping of keyword arguments (as
    Hugging Face models take them), whose result's ``logits`` are used when it is not a tensor."""
    result = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(result, torch.Tensor):
        return result
    logits = getattr(result, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(
            f"the model returned a {type(result).__name__} without a 'logits' tensor; pass batches whose inputs give "
            "a tensor, or a loss_fn over what the model returns"
        )
    return logits
