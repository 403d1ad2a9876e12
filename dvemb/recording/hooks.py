"""The per-layer hooks: what each recorded module's forward pass and output gradient leave in a step.

A forward hook on each recorded module projects its input (the forward factor) as it passes and keeps the
output's gradient edge; a hook on the output tensor projects the output gradient (the backward factor) when the
user's ``loss.backward()`` reaches it, and the adapter combines the two into one (B, d) row per example. Each
forward call is one slot (a micro-batch) of the layer's :class:`Slots`. A layer whose bases are not fitted yet
(``deferred``: the first steps, :mod:`dvemb.held_steps`) keeps both factors unprojected instead.

:meth:`LayerHooks.rows` turns gradients taken at the layers' outputs by another backward pass (curvature rows,
query gradients) into projected rows with the slot's forward factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from dvemb.errors import RecorderError
from dvemb.recording.layer_set import LayerSet
from dvemb.recording.modes import Capture

__all__ = ["LayerHooks", "Slots"]


@dataclass
class Slots:
    """One layer's captures within a step, one slot per forward call (micro-batch)."""

    forward: list[torch.Tensor] = field(default_factory=list)  # (B, L, k_f) each; unprojected when deferred
    grads: list[torch.Tensor | None] = field(default_factory=list)  # (B, d) each; (B, L, out_dim) when deferred
    # Gradient edges of the outputs, for the curvature and query passes. An edge taken at forward time still
    # names the layer's own output after an in-place op (e.g. ReLU(inplace=True)) rebinds the tensor.
    outputs: list[GradientEdge | None] = field(default_factory=list)
    curvature: list[torch.Tensor | None] = field(default_factory=list)  # (B, R, d) each
    # Rows found from the output carry the loss's own weights: rescaled per example when the step ends.
    curvature_weighted: list[bool] = field(default_factory=list)
    outside_backward: int = 0  # forward passes seen outside a backward pass (see activation checkpointing)


class LayerHooks:
    """The forward and output-gradient hooks on the recorded modules, and what they captured this step.

    Args:
        layers: the recorded layers.
        keep_outputs: keep every training forward's output edge (ggn mode: the curvature rows are
            back-propagated to them); query passes always keep them.

    Attributes:
        mode: what is captured now (:class:`~dvemb.recording.modes.Capture`).
        slots: per adapter, the captures of the current step or query batch (empty when off).
        deferred: per adapter, whether its bases wait to be fitted on the first steps (factors kept unprojected).
    """

    def __init__(self, layers: LayerSet, *, keep_outputs: bool) -> None:
        self.layers = layers
        self.mode = Capture.OFF
        self.slots: list[Slots] = []
        self.deferred = [False] * len(layers.adapters)
        self._keep_outputs = keep_outputs
        self.handles: list[RemovableHandle] = [
            a.module.register_forward_hook(partial(self._on_forward, i)) for i, a in enumerate(layers.adapters)
        ]

    def begin(self, mode: Capture) -> None:
        """Start capturing a step or a query batch: every layer's slots empty."""
        self.mode = mode
        self.slots = [Slots() for _ in self.layers.adapters]

    def end(self) -> None:
        """Stop capturing and drop what was captured."""
        self.mode = Capture.OFF
        self.slots = []

    def remove(self) -> None:
        """Remove the hooks from the modules."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # -- the hooks --------------------------------------------------------------------------------

    def _on_forward(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.mode is Capture.OFF or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        slots = self.slots[index]
        if torch._C._current_graph_task_id() == -1:
            slots.outside_backward += 1
        elif slots.outside_backward:
            # Activation checkpointing recomputes this forward inside backward. Non-reentrant checkpointing
            # already ran it with gradients (that pass is the one the gradient reaches): skip the recompute.
            # Reentrant checkpointing ran it without gradients, so the recompute is the pass to record.
            return
        slot = len(slots.forward)
        adapter = self.layers.adapters[index]
        slots.forward.append(adapter.raw_forward(args) if self.deferred[index] else adapter.forward_factor(args))
        slots.grads.append(None)
        slots.curvature.append(None)
        slots.curvature_weighted.append(False)
        keep_output = self.mode is Capture.QUERY or self._keep_outputs
        slots.outputs.append(get_gradient_edge(output) if keep_output else None)
        if self.mode is Capture.TRAIN:
            output.register_hook(partial(self._on_output_grad, index, slot))

    def _on_output_grad(self, index: int, slot: int, grad: torch.Tensor) -> None:
        if self.mode is not Capture.TRAIN:  # a curvature pass's gradient is not the loss's
            return
        slots, adapter = self.slots[index], self.layers.adapters[index]
        if self.deferred[index]:
            rows = adapter.raw_backward(grad)  # (B, L, out_dim): projected when the bases are fitted
        else:
            rows = adapter.combine(slots.forward[slot], adapter.backward_factor(grad))  # (B, d)
        previous = slots.grads[slot]
        slots.grads[slot] = rows if previous is None else previous + rows  # a second backward adds, as autograd does

    # -- rows from gradients at the layers' outputs -----------------------------------------------

    def latest_outputs(self, what: str) -> tuple[list[int], list[GradientEdge]]:
        """The slot of every layer's latest forward pass and its output's gradient edge.

        Raises:
            RecorderError: a layer did not run with gradients since the step began (``what`` names the call).
        """
        slot_of: list[int] = []
        outputs: list[GradientEdge] = []
        for adapter, slots in zip(self.layers.adapters, self.slots, strict=True):
            if not slots.outputs or slots.outputs[-1] is None:
                raise RecorderError(
                    f"{what}: layer {adapter.name!r} was not run with gradients since the last call; call it right "
                    "after the forward pass, once per forward pass, or leave the layer out with layers=[...]"
                )
            slot_of.append(len(slots.outputs) - 1)
            edge = slots.outputs[-1]
            assert edge is not None
            outputs.append(edge)
        return slot_of, outputs

    def rows(self, slot_of: list[int], output_grads: Sequence[torch.Tensor | None], count: int) -> list[torch.Tensor]:
        """(B, R, d) projected rows per layer (curvature rows, or with R = 1 a query's) from the R rows' gradients
        with respect to the layers' outputs ((R, B, ...) each, None where a row does not reach the layer);
        (B, R, L, out_dim) unprojected output gradients for a layer whose bases are not fitted yet."""
        found = []
        for index, grad in enumerate(output_grads):
            slots, adapter = self.slots[index], self.layers.adapters[index]
            forward = slots.forward[slot_of[index]]  # (B, L, k) or, deferred, the raw factor
            batch = forward.shape[0]
            if self.deferred[index]:
                if grad is None:
                    found.append(forward.new_zeros(batch, count, forward.shape[1], adapter.projection.out_dim))
                    continue
                raw = adapter.raw_backward(grad.flatten(0, 1))  # (R*B, L, out_dim)
                found.append(raw.unflatten(0, (count, batch)).transpose(0, 1))
            elif grad is None:
                found.append(forward.new_zeros(batch, count, adapter.projection.dim))
            else:
                backward = adapter.backward_factor(grad.flatten(0, 1))  # (R*B, L, k)
                found.append(adapter.combine_rows(forward, backward.unflatten(0, (count, batch))))
        return found

    def rows_of_one(self, slot_of: list[int], output_grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """(B, d) projected rows per layer from gradients with respect to the layers' outputs ((B, L, out_dim)
        unprojected output gradients for a layer whose bases are not fitted yet): :meth:`rows` of one row."""
        single = [None if grad is None else grad.unsqueeze(0) for grad in output_grads]
        return [rows[:, 0] for rows in self.rows(slot_of, single, 1)]
