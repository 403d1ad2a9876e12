"""The run-level fields of a manifest that change while a run is recorded, changed only through these methods.

The log writer owns the manifest (a JSON object, written at every shard and at close); the recorder describes
the run through the writer's :class:`ManifestBuilder` instead of writing keys into the dict itself, so that every
key it sets is named once, here, next to docs/format.md's description of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ManifestBuilder"]


class ManifestBuilder:
    """Changes to a manifest being recorded (``data``: the writer's manifest object, changed in place)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    # -- curvature ------------------------------------------------------------------------------------------

    def set_curvature_samples(self, samples: int | None) -> None:
        """The rows per example asked for (``curvature_samples``), once ``"auto"`` is resolved."""
        self.data["curvature"]["samples"] = samples

    @property
    def curvature_described(self) -> bool:
        """Whether the curvature rows of the first recorded step have been described."""
        return self.data["curvature"]["rows_per_example"] is not None

    def describe_curvature_rows(
        self, *, rows_per_example: int, estimator: str, sources: Sequence[str], loss: str
    ) -> None:
        """The curvature rows as the first step recorded them: rows per example, the estimator that made them
        (dvemb.curvature), where they came from (``"output"``: found at the model's output, ``"manual"``:
        ``rec.curvature(...)``) and the loss they model."""
        entry = self.data["curvature"]
        entry["rows_per_example"] = rows_per_example
        entry["estimator"] = estimator
        entry["source"] = "+".join(sorted(sources))
        entry["loss"] = loss

    # -- optimizer ------------------------------------------------------------------------------------------

    @property
    def optimizer(self) -> dict[str, Any] | None:
        """The optimizer's description (a copy), or None before the first step saw it."""
        entry = self.data.get("optimizer")
        return None if entry is None else dict(entry)

    def describe_optimizer(self, entry: dict[str, Any], second_moments: Sequence[str] | None = None) -> None:
        """The optimizer of the run (dvemb.optim.describe_optimizer), and for Adam and AdamW how each tracked layer
        carries its second moment (``second_moments``, one per layer in the manifest's order)."""
        self.data["optimizer"] = entry
        if second_moments is not None:
            for layer, carrier in zip(self.data["layers"], second_moments, strict=True):
                layer["second_moment"] = carrier

    def skip_step(self, iteration: int) -> None:
        """An iteration whose update a mixed-precision scaler skipped (nothing recorded for it)."""
        self.data.setdefault("skipped_steps", []).append(iteration)

    # -- layers ---------------------------------------------------------------------------------------------

    def fit_bases(self, bases: Sequence[tuple[str, int, int]]) -> None:
        """Every tracked layer's basis once fixed: (``"calibrated"`` or ``"seeded"``, k_out, k_in), in order."""
        for layer, (basis, k_out, k_in) in zip(self.data["layers"], bases, strict=True):
            layer["basis"], layer["k_out"], layer["k_in"] = basis, k_out, k_in
