"""What the recorder reads from a PyTorch optimizer: per-layer learning rate and weight decay,
the optimizer type, and whether plain SGD makes the influence estimate exact."""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["DvembWarning", "OptimizerInfo", "describe_optimizer"]


class DvembWarning(UserWarning):
    """A result will be less exact than it could be (for example the SGD proxy for Adam)."""


_DECOUPLED = {"AdamW"}
_HYPERPARAMETERS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "alpha", "amsgrad")


class OptimizerInfo:
    """Reads an optimizer's per-layer hyperparameters at each step.

    Args:
        optimizer: the user's optimizer.
        layer_params: for each tracked layer, its weight parameter (to find its parameter group).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layer_params: list[torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [i for i, p in enumerate(layer_params) if id(p) not in group_of]
        if missing:
            raise ValueError(f"the optimizer does not update tracked layer(s) {missing}")
        self.layer_groups = [group_of[id(p)] for p in layer_params]
        self.type = type(optimizer).__name__
        self.exact_sgd = self._is_plain_sgd()
        self.snapshot: tuple[list[float], list[float]] | None = None
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    def _is_plain_sgd(self) -> bool:
        if type(self.optimizer) is not torch.optim.SGD:
            return False
        return all(g.get("momentum", 0) == 0 and not g.get("nesterov", False) for g in self.optimizer.param_groups)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The rates that optimizer.step() is about to apply, whatever a scheduler does afterwards.
        self.snapshot = self.read()

    def read(self) -> tuple[list[float], list[float]]:
        """(learning rate, weight decay) per tracked layer, as the optimizer holds them now."""
        groups = self.optimizer.param_groups
        lr = [float(groups[g]["lr"]) for g in self.layer_groups]
        weight_decay = [float(groups[g].get("weight_decay", 0.0)) for g in self.layer_groups]
        return lr, weight_decay

    def take_step_values(self) -> tuple[list[float], list[float]]:
        """Values captured when optimizer.step() ran in this step (or the current ones if it did not)."""
        values, self.snapshot = self.snapshot or self.read(), None
        return values

    def describe(self) -> dict[str, Any]:
        """Manifest entry: type, exactness, weight-decay mode and hyperparameters per group."""
        groups = [
            {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in g.items()
                if k in _HYPERPARAMETERS and isinstance(v, (int, float, bool, tuple))
            }
            for g in self.optimizer.param_groups
        ]
        return {
            "type": self.type,
            "exact_sgd": self.exact_sgd,
            "weight_decay_mode": "decoupled" if self.type in _DECOUPLED else "l2",
            "param_groups": groups,
        }

    def state_summary(self) -> dict[str, Any]:
        """Per-group means of the optimizer's state tensors (momentum, Adam moments), for the manifest."""
        summary: list[dict[str, float]] = []
        for group in self.optimizer.param_groups:
            sums: dict[str, list[float]] = {}
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
                        sums.setdefault(key, []).append(float(value.abs().mean()))
            summary.append({f"mean_abs_{k}": sum(v) / len(v) for k, v in sums.items()})
        return {"param_groups": summary}

    def remove(self) -> None:
        """Detach the step hook."""
        self._hook.remove()


def describe_optimizer(info: OptimizerInfo) -> dict[str, Any]:
    """Manifest entry of an optimizer, warning once when influence will use the SGD proxy."""
    entry = info.describe()
    if not info.exact_sgd:
        warnings.warn(
            f"{info.type} (or SGD with momentum) is recorded, but influence is computed with the SGD proxy "
            "(learning rate times gradient, as in the paper); scores are approximate for this optimizer",
            DvembWarning,
            stacklevel=4,
        )
    return entry
