"""The training step as a function of the parameters and of every example's weight in the step's loss.

A replay needs the loss of a step written so that it can be evaluated at any parameters and weighted per
example: the user gives

- ``loss_fn(forward, batch) -> (b,)`` per-example losses, where ``forward(*args, **kwargs)`` calls the model at
  the replayed parameters (``torch.func.functional_call``); for a plain loop
  ``lambda forward, batch: F.cross_entropy(forward(batch[0]), batch[1], reduction="none")``;
- ``examples(ids) -> batch``: the batch of those example ids, in that order (a collate function over the data
  set).

The step's loss is ``sum_z w_z l_z / B`` (``loss_reduction="mean"``, ``B`` the step's examples over all its
micro-batches: PyTorch's ``loss / accumulation_steps`` pattern over equal micro-batches) or ``sum_z w_z l_z``
(``"sum"``), with every ``w_z = 1`` in training. With ``micro_batches = m`` the step's ids are split in ``m``
consecutive parts that are evaluated one at a time (memory of one part), as gradient accumulation does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from dvemb.errors import ConfigError

__all__ = ["Examples", "LossFn", "ReplayError", "TrainingStep"]

#: ``loss_fn(forward, batch) -> (b,)`` per-example losses.
LossFn = Callable[[Callable[..., Any], Any], torch.Tensor]
#: ``examples(ids) -> batch`` for the loss function.
Examples = Callable[[list[Any]], Any]


class ReplayError(ConfigError):
    """A run the replay cannot reproduce (random layers, running statistics, a loss of the wrong shape)."""


def check_replayable(model: nn.Module) -> None:
    """Refuse layers whose forward pass is random or mutates state (the replay could not reproduce them).

    Raises:
        ReplayError: a model wrapped for distributed training (DistributedDataParallel: pass ``model.module``;
            FSDP: its parameters are sharded), dropout with ``p > 0`` or batch norm updating running statistics, in
            training mode.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ReplayError(
            "the model is wrapped in DistributedDataParallel: pass model.module (the replay runs on one device)"
        )
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise ReplayError(
                f"layer {name or 'the model'!r} is sharded by FSDP: the replay needs every parameter on one device; "
                "rebuild the model unwrapped and load its initial weights (dvemb.replay.load_initial)"
            )
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ReplayError(
                f"layer {name!r} is dropout with p={module.p} in training mode: its random masks cannot be replayed; "
                "replay a run trained without dropout, or call model.eval() if the run used none"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            raise ReplayError(
                f"layer {name!r} is batch norm updating running statistics in training mode: they are not part of "
                "the replayed state; replay a run without it (or with track_running_stats=False)"
            )


class TrainingStep:
    """Gradients of one step's weighted loss at given parameters.

    Args:
        model: the model (its trained parameters are replaced by the replay's at every call).
        names: the names of the trained parameters, in the replay's order.
        loss_fn, examples: see the module docstring.
        reduction: ``"mean"`` or ``"sum"``.
        micro_batches: parts each step's examples are evaluated in (gradient accumulation).
        autocast: evaluate ``loss_fn`` under ``torch.autocast`` of this dtype (a run trained with mixed precision);
            None: as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        loss_fn: LossFn,
        examples: Examples,
        *,
        reduction: str,
        micro_batches: int = 1,
        autocast: torch.dtype | None = None,
    ) -> None:
        if micro_batches < 1:
            raise ConfigError(f"micro_batches={micro_batches}: use 1 or more")
        self.model, self.names = model, list(names)
        self.loss_fn, self.examples = loss_fn, examples
        self.reduction, self.micro_batches = reduction, micro_batches
        self.autocast = autocast

    def evaluate(self, params: Sequence[torch.Tensor], batch: Any) -> Any:
        """``loss_fn`` of ``batch`` at ``params``, under the run's autocast when it had one."""
        device = params[0].device.type if params else "cpu"
        with torch.autocast(device, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            return self.loss_fn(self.forward_at(params), batch)

    def forward_at(self, params: Sequence[torch.Tensor]) -> Callable[..., Any]:
        """The model as a function of its inputs at ``params``."""
        values = dict(zip(self.names, params, strict=True))
        return lambda *args, **kwargs: functional_call(self.model, values, args, kwargs)

    def parts(self, size: int) -> list[slice]:
        """The consecutive micro-batches of a step of ``size`` examples."""
        m = min(self.micro_batches, size)
        bounds = [size * i // m for i in range(m + 1)]
        return [slice(bounds[i], bounds[i + 1]) for i in range(m)]

    def losses(self, params: Sequence[torch.Tensor], ids: Sequence[Any]) -> torch.Tensor:
        """(b,) per-example losses of ``ids`` at ``params``."""
        out = self.evaluate(params, self.examples(list(ids)))
        if not isinstance(out, torch.Tensor) or out.shape != (len(ids),):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ReplayError(
                f"loss_fn must return one loss per example, shape ({len(ids)},); got {shape} (use reduction='none')"
            )
        return out

    def part_gradient(
        self,
        params: Sequence[torch.Tensor],
        ids: Sequence[Any],
        weights: torch.Tensor,
        total: int,
        *,
        create_graph: bool,
    ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """Gradient of one part's share of the step's loss, ``sum_z w_z l_z / total`` (mean) or ``sum_z w_z l_z``.

        Args:
            params: parameters requiring grad.
            ids: the part's example ids.
            weights: (b,) their weights (a leaf requiring grad for the adjoint).
            total: examples in the whole step.
            create_graph: keep the graph for a second derivative.

        Returns:
            per parameter its gradient (None when it does not take part), and the (b,) unweighted losses.
        """
        losses = self.losses(params, ids)
        loss = (weights * losses).sum()
        if self.reduction == "mean":
            loss = loss / total
        grads = torch.autograd.grad(loss, list(params), allow_unused=True, create_graph=create_graph)
        return list(grads), losses.detach()

    def gradient(
        self, params: Sequence[torch.Tensor], ids: Sequence[Any], weights: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor | None], float]:
        """The step's gradient (no graph kept) and its unweighted loss (mean or sum, as reduced)."""
        leaves = [p.detach().requires_grad_(True) for p in params]
        w = torch.ones(len(ids), dtype=leaves[0].dtype, device=leaves[0].device) if weights is None else weights
        total: list[torch.Tensor | None] = [None] * len(leaves)
        loss_sum = 0.0
        for part in self.parts(len(ids)):
            grads, losses = self.part_gradient(leaves, ids[part], w[part], len(ids), create_graph=False)
            total = [_add(a, b) for a, b in zip(total, grads, strict=True)]
            loss_sum += float(losses.sum())
        return total, loss_sum / len(ids) if self.reduction == "mean" else loss_sum


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
