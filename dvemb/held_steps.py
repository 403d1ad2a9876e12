"""The first steps of a run, held unprojected until the recorder has fitted its projection bases on them.

Without ``rec.calibrate(...)`` the recorder fits curvature-aware bases itself (``calibration_steps``): for the
first steps it keeps each projectable layer's **unprojected factors** (the inputs ``v`` and the output
gradients ``u`` of every micro-batch, and the Gauss-Newton rows' output gradients) instead of projected
rows, sums their covariances as :meth:`Recorder.calibrate` does, fits the bases when enough steps are held
(or at ``close()`` / ``record_queries()``), then projects the held factors with those bases and writes the
held steps in order. Nothing extra runs through the model, so the recorded training is exactly the
unrecorded one; the steps simply reach the log later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dvemb.calibration import FactorCovariance
from dvemb.layers import LayerAdapter
from dvemb.writer import StepRecord

__all__ = ["HeldLayer", "HeldStep"]


@dataclass
class HeldLayer:
    """One layer's unprojected factors in one step, one entry per micro-batch (slot).

    Attributes:
        forward: (B_s, L_s, in_dim) inputs (the bias's constant column included), or (B_s, L_s) tokens of an
            embedding (:meth:`LayerAdapter.raw_forward`).
        grads: (B_s, L_s, ·) output gradients, scaled to per-example gradients.
        curvature: (B_s, R, L_s, ·) output gradients of the Gauss-Newton rows, or None (empirical mode).
    """

    forward: list[torch.Tensor]
    grads: list[torch.Tensor]
    curvature: list[torch.Tensor] | None

    @property
    def nbytes(self) -> int:
        """Memory held, in bytes."""
        tensors = [*self.forward, *self.grads, *(self.curvature or [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def tensors(self) -> list[torch.Tensor]:
        """Every held tensor (for the finiteness check)."""
        return [*self.grads, *(self.curvature or [])]

    def add_to(self, covariance: FactorCovariance, adapter: LayerAdapter) -> int:
        """Add this step's factors to the weight's covariances (the curvature rows in ggn mode, else the
        gradients, as :meth:`Recorder.calibrate` with or without ``loss_fn``); returns the examples added."""
        for slot, inputs in enumerate(self.forward):
            if self.curvature is None:
                adapter.add_covariance(covariance, inputs, self.grads[slot])
                continue
            rows = self.curvature[slot]  # (B_s, R, L_s, ·)
            for r in range(rows.shape[1]):
                adapter.add_covariance(covariance, inputs, rows[:, r])
        return sum(int(f.shape[0]) for f in self.forward)

    def project(self, adapter: LayerAdapter) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, d) projected gradients and (B, R, d) projected curvature rows (or None) with the adapter's
        current (fitted) projection, micro-batches in order."""
        grads, rows = [], []
        for slot, raw_inputs in enumerate(self.forward):
            inputs = adapter.project_forward(raw_inputs)  # (B_s, L_s, k)
            grads.append(adapter.combine(inputs, adapter.project_backward(self.grads[slot])))
            if self.curvature is not None:
                outputs = adapter.project_backward(self.curvature[slot])  # (B_s, R, L_s, k)
                rows.append(adapter.combine_rows(inputs, outputs.transpose(0, 1)))  # (B_s, R, d)
        return torch.cat(grads), (torch.cat(rows) if rows else None)


@dataclass
class HeldStep:
    """A finished step whose projectable layers wait for the bases: the record of the rest, and those layers."""

    record: StepRecord
    layers: dict[int, HeldLayer] = field(default_factory=dict)  # adapter index -> factors

    @property
    def nbytes(self) -> int:
        """Memory held by the unprojected factors, in bytes."""
        return sum(layer.nbytes for layer in self.layers.values())
