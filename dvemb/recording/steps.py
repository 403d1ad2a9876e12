"""Step bookkeeping: what one ``rec.step()`` gathers and hands to the log writer.

A step opens with its example ids (or gathers them with ``rec.add_ids``), watches the optimizer (its learning
rates, weight decays and per-step state are read when ``optimizer.step()`` runs, :mod:`dvemb.optim`), and at its
end collects every layer's (B, d) gradient rows and (B, R, d) curvature rows from the hooks' slots, checks them,
scales them to per-example rows and hands one :class:`~dvemb.writer.StepRecord` to the writer, or to the
:class:`~dvemb.recording.bases.BasisFitter` while the first steps are held for their bases. A step whose update a
mixed-precision scaler skipped is counted (``skipped_steps``) but not recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dvemb import logformat as fmt
from dvemb.errors import ConfigError, RecorderError
from dvemb.held_steps import HeldLayer, HeldStep
from dvemb.layers import LayerAdapter
from dvemb.optim import OptimizerInfo, TrackedParameters, describe_optimizer
from dvemb.recording.bases import BasisFitter
from dvemb.recording.curvature_rows import CurvatureRows
from dvemb.recording.hooks import LayerHooks, Slots
from dvemb.recording.ids import as_id_list, check_unique
from dvemb.recording.layer_set import LayerSet
from dvemb.recording.modes import Capture, CurvatureMode, LossReduction
from dvemb.writer import LogWriter, StepRecord

__all__ = ["DEFAULT_SECOND_MOMENT_RANK", "StepBook", "loss_scale_of"]

#: Singular pairs per Adam step for the second-moment term of projected layers over
#: dvemb.optim.LIFTED_SECOND_MOMENT_MAX coordinates (smaller ones keep it whole). Off by default: the engine's
#: state for such a layer is (n_out * n_in, D), and it is rebuilt only up to 65536 coordinates.
DEFAULT_SECOND_MOMENT_RANK = 0


class StepBook:
    """The steps of a run: their ids, learning rates, losses and rows, handed to the writer in order.

    Args:
        layers: the recorded layers.
        hooks: the layer hooks whose slots a step collects.
        curvature: the curvature rows (ggn mode).
        bases: the basis fitter (holds the first steps while it fits).
        writer: the log writer.
        loss_reduction: how a step's gradient relates to its examples' gradients.
        second_moment_rank: Adam's second-moment pairs kept per step for large projected layers.

    Attributes:
        index: steps recorded so far, the index of the next one (skipped updates not counted).
        iteration: ``rec.step()`` blocks that ended, skipped updates included.
        loss: the training loss given with ``rec.log_loss`` in this step, or None.
        optimizer: the watched optimizer, or None before the first step with one.
    """

    def __init__(
        self,
        layers: LayerSet,
        hooks: LayerHooks,
        curvature: CurvatureRows,
        bases: BasisFitter,
        writer: LogWriter,
        *,
        loss_reduction: LossReduction,
        second_moment_rank: int,
    ) -> None:
        self.layers = layers
        self.hooks = hooks
        self.curvature = curvature
        self.bases = bases
        self.writer = writer
        self.loss_reduction = loss_reduction
        self.second_moment_rank = second_moment_rank
        self.index = 0
        self.iteration = 0
        self.loss: float | None = None
        self.optimizer: OptimizerInfo | None = None
        self._pending_ids: list[Any] | None = None

    # -- opening and closing a step ---------------------------------------------------------------

    def open(
        self, ids: Any, optimizer: torch.optim.Optimizer | None, lr: float | None, scaler: Any
    ) -> list[int] | list[str] | None:
        """Check a step's arguments and watch its optimizer; returns its ids (None: given by ``add_ids``)."""
        if self.hooks.mode is not Capture.OFF:
            raise RecorderError("rec.step() cannot be nested or used inside record_queries()")
        if optimizer is None and lr is None:
            raise ConfigError("rec.step() needs the optimizer (or lr=... for a hand-written update)")
        if scaler is not None and optimizer is None:
            raise ConfigError("rec.step(scaler=...) needs the optimizer that the scaler steps")
        id_list = None if ids is None else as_id_list(ids)
        if id_list is not None and not id_list:
            raise ConfigError("rec.step() got no example ids")
        if id_list is not None:
            check_unique(id_list, self.index)
        if optimizer is not None:
            self._watch(optimizer)
        self.curvature.resolve_samples(None, self.writer.build)  # a hand-written update (lr=...): every class
        return id_list

    def begin(self, id_list: list[int] | list[str] | None) -> None:
        """The step's block starts: capture the training pass."""
        self.hooks.begin(Capture.TRAIN)
        self.curvature.begin(self.index)
        self.loss = None
        self._pending_ids = [] if id_list is None else None

    def end(self) -> None:
        """The step's block ends (recorded or failed): stop capturing."""
        self.hooks.end()
        self._pending_ids = None

    def add_ids(self, ids: Any) -> None:
        """Add one micro-batch's ids to a step opened without them."""
        if self.hooks.mode is Capture.OFF or self._pending_ids is None:
            raise RecorderError("rec.add_ids() is for a step opened with rec.step(None, optimizer)")
        self._pending_ids.extend(as_id_list(ids))

    def _take_pending_ids(self) -> list[int] | list[str]:
        ids = self._pending_ids or []
        if not ids:
            raise RecorderError(f"step {self.index} was opened with rec.step(None, ...) but rec.add_ids() gave no ids")
        fmt.encode_ids(ids)  # one type for the whole step
        check_unique(ids, self.index)
        return ids

    def closing_updates(self) -> dict[str, Any]:
        """The manifest's fields at close (steps, the optimizer's final state); stops watching the optimizer."""
        updates: dict[str, Any] = {"num_steps": self.index}
        if self.optimizer is not None:
            optimizer_entry = self.writer.build.optimizer or {}
            optimizer_entry["final_state"] = self.optimizer.state_summary()
            updates["optimizer"] = optimizer_entry
            self.optimizer.remove()
        return updates

    # -- the optimizer ----------------------------------------------------------------------------

    def _watch(self, optimizer: torch.optim.Optimizer) -> None:
        if self.optimizer is not None and self.optimizer.optimizer is optimizer:
            return
        if self.optimizer is not None:
            self.optimizer.remove()
        try:
            self.optimizer = OptimizerInfo(optimizer, self.layers.tracked(), second_moment_rank=self.second_moment_rank)
        except ValueError as exc:
            raise ConfigError(f"{exc}; pass the optimizer that trains the model") from None
        build = self.writer.build
        if build.optimizer is None:
            entry = describe_optimizer(self.optimizer)
            self.curvature.resolve_samples(self.optimizer.propagation, build)
            carriers = None
            if self.optimizer.propagation in ("adam", "adamw"):
                entry["second_moment_rank"] = self.second_moment_rank
                carriers = [_second_moment_carrier(t, self.second_moment_rank) for t in self.optimizer.tracked]
            build.describe_optimizer(entry, carriers)

    def _step_values(self, lr: float | None) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
        """Per logged layer the step's learning rate and weight decay, and the optimizer's per-step tensors."""
        if self.optimizer is None or lr is not None:
            return [float(lr or 0.0)] * len(self.layers.layers), [0.0] * len(self.layers.layers), {}
        try:
            lrs, decays, state = self.optimizer.take_step_values()
        except RuntimeError as exc:
            raise RecorderError(f"step {self.index}: {exc}; call optimizer.step() inside rec.step()") from None
        return lrs, decays, self._optimizer_tensors(state)

    def _optimizer_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The optimizer's per-step tensors under their shard names (per-layer ones named by layer)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            parts = key.split(".")
            if len(parts) == 3:  # opt.<what>.<layer index>
                out[fmt.optimizer_layer_key(parts[1], self.layers.layers[int(parts[2])].name)] = value
            else:
                out[key] = value
        return out

    # -- the end of a step ------------------------------------------------------------------------

    def finish(self, id_list: list[int] | list[str] | None, lr: float | None, loss_scale: float | None) -> None:
        """The step's block ended without an error: record it (or count it as skipped)."""
        ids = id_list if id_list is not None else self._take_pending_ids()
        self.iteration += 1
        if loss_scale is not None and self.optimizer is not None and not self.optimizer.stepped():
            # The scaler found inf/NaN and skipped optimizer.step(): no update happened, nothing to attribute.
            self.writer.build.skip_step(self.iteration - 1)
            self.optimizer.take_step_values(require_step=False)
            return
        pairs = list(zip(self.layers.adapters, self.hooks.slots, strict=True))
        ggn = self.curvature.mode is CurvatureMode.GGN
        deferred = self.hooks.deferred
        live = {i: (a, s) for i, (a, s) in enumerate(pairs) if not deferred[i]}
        grads = self.layers.merged({i: self._collect(a, s.grads, "gradient", ids) for i, (a, s) in live.items()})
        for index, (adapter, slots) in enumerate(pairs):
            if deferred[index]:
                self._collect(adapter, slots.grads, "gradient", ids)  # the same checks, before any other error
        curvature: dict[str, torch.Tensor] = {}
        if ggn:
            if self.curvature.problem is not None and any(None in s.curvature for s in self.hooks.slots):
                self._fail(self.curvature.take_problem())
            self.curvature.weigh(len(ids), loss_scale)
            rows = {i: self._collect(a, s.curvature, "curvature", ids) for i, (a, s) in live.items()}
            curvature = self.layers.merged(rows)
        held = {i: self._held_layer(a, s, ids, ggn) for i, (a, s) in enumerate(pairs) if deferred[i]}
        # The backward ran on the scaled loss; a mean-reduced step's gradient is the mean of its examples'.
        factor = (len(ids) if self.loss_reduction is LossReduction.MEAN else 1.0) / (loss_scale or 1.0)
        if factor != 1.0:
            for rows_of_layer in [*grads.values(), *(t for layer in held.values() for t in layer.grads)]:
                rows_of_layer.mul_(factor)
        self._check_finite(grads, curvature, [t for layer in held.values() for t in layer.tensors()])
        lrs, decays, optimizer_state = self._step_values(lr)
        if ggn and not self.writer.build.curvature_described:
            held_rows = [layer.curvature[0] for layer in held.values() if layer.curvature]
            per_example = int((next(iter(curvature.values())) if curvature else held_rows[0]).shape[1])
            self.curvature.describe(self.writer.build, per_example)
        record = StepRecord(self.index, ids, lrs, decays, self.loss, grads, curvature, optimizer_state)
        if held:
            self.index += 1
            self.bases.hold(HeldStep(record, held))
            return
        self.writer.accept_step(record)
        self.index += 1  # recorded: a write error below concerns the disk, and the step is retried with the next shard
        self.writer.flush_if_full()

    def _collect(
        self, adapter: LayerAdapter, parts: list[torch.Tensor | None], what: str, ids: Sequence[Any]
    ) -> torch.Tensor:
        """A layer's rows of the step, its slots concatenated: (B, d) gradients or (B, R, d) curvature rows."""
        if not parts:
            raise RecorderError(
                f"layer {adapter.name!r} was not run with gradients in step {self.index}; run the forward pass inside "
                "rec.step(), or leave the layer out with layers=[...]"
            )
        if any(p is None for p in parts):
            hint = (
                "call loss.backward() inside rec.step()"
                if what == "gradient"
                else "the model's output did not reach the loss: call rec.curvature(logits) after every forward "
                "pass, or pass curvature='empirical'"
            )
            raise RecorderError(f"no {what} reached layer {adapter.name!r} in step {self.index}; {hint}")
        rows = torch.cat([p for p in parts if p is not None])
        if rows.shape[0] != len(ids):
            raise RecorderError(
                f"layer {adapter.name!r} saw {rows.shape[0]} examples in step {self.index} "
                f"but {len(ids)} ids were given; "
                "pass the ids of every micro-batch of the step, in order (a layer called twice per forward pass, or "
                "one whose input has no per-example batch dimension such as a position embedding fed (1, L) "
                "positions, cannot be tracked: leave it out with layers=[...])"
            )
        return rows

    def _held_layer(self, adapter: LayerAdapter, slots: Slots, ids: Sequence[Any], ggn: bool) -> HeldLayer:
        """A deferred layer's unprojected factors of the step, checked as :meth:`_collect` checks rows."""
        if ggn:
            self._collect(adapter, slots.curvature, "curvature", ids)
        curvature = [c for c in slots.curvature if c is not None] if ggn else None
        return HeldLayer(list(slots.forward), [g for g in slots.grads if g is not None], curvature)

    def _check_finite(
        self, grads: dict[str, torch.Tensor], curvature: dict[str, torch.Tensor], held: Sequence[torch.Tensor] = ()
    ) -> None:
        tensors = [*grads.values(), *curvature.values(), *held]
        # One synchronisation per step: the largest magnitude of each tensor is finite iff the tensor is.
        peaks = torch.stack([t.abs().amax() for t in tensors])
        if bool(torch.isfinite(peaks).all()):
            return
        named = [*grads.items(), *curvature.items(), *(("a layer whose bases are being fitted", t) for t in held)]
        bad = next(name for name, t in named if not bool(torch.isfinite(t).all()))
        self.bases.release()
        self._fail(
            RecorderError(
                f"non-finite gradient in layer {bad!r} at step {self.index} (learning rate too large, or "
                f"float16 overflow?); the log keeps steps 0 to {self.index - 1}"
            )
        )

    def _fail(self, error: RecorderError) -> None:
        """Write what the log holds so far, then fail the step."""
        self.writer.flush()
        raise error


def loss_scale_of(scaler: Any) -> float | None:
    """The loss scale of an enabled ``GradScaler`` for this step (before its ``update()``), else None."""
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def _second_moment_carrier(tracked: TrackedParameters, rank: int) -> str:
    """How the log carries a layer's Adam second-moment term (docs/format.md, ``layers[].second_moment``)."""
    if tracked.whole:
        return "whole"
    if tracked.lifted:
        return "lifted-moments"  # vsens, the step's gradient and the preconditioner, whole
    return "factors" if rank else "none"
