"""The curvature rows a ggn step records: Gauss-Newton factors back-propagated from the model's output.

Rows ``r`` at the output (R of them per example, :mod:`dvemb.curvature`, :mod:`dvemb.output_curvature`) are
back-propagated to every recorded layer's output in one batched backward; each layer combines their gradients
with its forward factors into (B, R, d) rows whose outer products sum to the layer's Gauss-Newton matrix.

They start in one of two places:

- **found** (the default): hooks on the model's forward catch its output logits, and when the user's
  ``loss.backward()`` reaches them, the gradient there says which loss it is (softmax cross-entropy is checked;
  its per-example weights are read off it) and starts the rows. Such rows carry the loss's weights and are
  made per-example rows when the step ends (:meth:`CurvatureRows.weigh`).
- **given**: ``rec.curvature(logits)`` after the forward pass (:meth:`CurvatureRows.from_logits`); these win.

When the rows cannot be found, the reason is kept (:attr:`CurvatureRows.problem`) and the step fails with it
only if a layer ends the step without rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from dvemb.curvature import ESTIMATOR, logit_factor_rows, rows_per_example
from dvemb.errors import RecorderError
from dvemb.formats.manifest_builder import ManifestBuilder
from dvemb.output_curvature import cross_entropy_weights, find_logits, output_factor_rows, tolerance_for
from dvemb.recording.hooks import LayerHooks
from dvemb.recording.modes import Capture, CurvatureLoss, CurvatureMode, LossReduction, PositionReduction

__all__ = ["ADAM_CURVATURE_SAMPLES", "CurvatureRows", "estimator_name"]

#: Labels sampled per example for the Gauss-Newton rows under Adam and AdamW (``curvature_samples="auto"``).
ADAM_CURVATURE_SAMPLES = 1


class CurvatureRows:
    """The Gauss-Newton rows of the steps, found at the model's output or given with ``rec.curvature``.

    Args:
        model: the model; in ggn mode its forward is hooked to find the output logits.
        hooks: the layer hooks whose slots receive the rows.
        mode: the curvature mode; only ggn records rows (the empirical mode registers nothing).
        samples: ``curvature_samples`` as the user gave it (``"auto"``, None or an int).
        loss: the loss at the output that found rows model.
        loss_reduction: how the step's gradient relates to its examples' (for :meth:`weigh`).
        seed: the recorder's seed; sampled labels are seeded with it and the step.

    Attributes:
        samples: rows per example asked for (None: all classes up to 32, else one); ``"auto"`` is resolved by
            :meth:`resolve_samples` at the first step.
        problem: why rows could not be found at the output this step, or None.
        sources: where the run's rows came from so far: ``"output"`` (found), ``"manual"`` (given).
        step: the index of the step being recorded (set by :meth:`begin`).
    """

    def __init__(
        self,
        model: nn.Module,
        hooks: LayerHooks,
        *,
        mode: CurvatureMode,
        samples: int | str | None,
        loss: CurvatureLoss,
        loss_reduction: LossReduction,
        seed: int,
    ) -> None:
        self.mode = mode
        self.loss = loss
        self.loss_reduction = loss_reduction
        self.seed = seed
        self._hooks = hooks
        # "auto" is resolved when the optimizer is first seen (rec.step); until then (calibration) all classes.
        self._samples_auto = samples == "auto"
        self.samples: int | None = None if isinstance(samples, str) or samples is None else int(samples)
        self.problem: str | None = None
        self.sources: set[str] = set()
        self.step = 0
        self._slots_before_forward: list[int] | None = None
        self.handles: list[RemovableHandle] = []
        if mode is CurvatureMode.GGN:
            self.handles.append(model.register_forward_pre_hook(self._before_model_forward))
            self.handles.append(model.register_forward_hook(self._on_model_output))

    def begin(self, step: int) -> None:
        """A training step starts: no problem yet; its sampled labels are seeded with ``step``."""
        self.problem = None
        self.step = step

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # -- rows found at the model's output ---------------------------------------------------------

    def _before_model_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._hooks.mode is Capture.TRAIN and torch.is_grad_enabled():
            self._slots_before_forward = [len(s.forward) for s in self._hooks.slots]

    def _on_model_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Hooks the model's output logits so that their gradient, during ``loss.backward()``, starts the rows."""
        before, self._slots_before_forward = self._slots_before_forward, None
        if self._hooks.mode is not Capture.TRAIN or not torch.is_grad_enabled() or before is None:
            return
        logits = find_logits(output)
        if logits is None or not logits.requires_grad:
            self.problem = (
                f"the model returned a {type(output).__name__}, not logits (a tensor, a tuple whose first element "
                "is one, or an output with .logits)"
            )
            return
        all_slots = self._hooks.slots
        slot_of = [len(s.forward) - 1 for s in all_slots]
        adapters = self._hooks.layers.adapters
        missed = [a.name for a, s, n in zip(adapters, all_slots, before, strict=True) if len(s.forward) == n]
        if missed:
            self.problem = (
                f"layer {missed[0]!r} did not run with gradients during the model's forward pass (reentrant "
                "activation checkpointing runs it later, inside backward: use use_reentrant=False)"
            )
            return
        edges = [s.outputs[i] for s, i in zip(all_slots, slot_of, strict=True)]
        source = _cast_source(logits)
        if source is None:
            logits.register_hook(
                partial(self._on_logits_grad, logits.detach(), get_gradient_edge(logits), slot_of, edges)
            )
            return
        # The output is a dtype cast of the logits the loss was computed from (accelerate's autocast wrapper returns
        # float32 copies of a model's bfloat16 / float16 outputs, while the model's own loss used the originals): the
        # rows start where the loss's gradient arrives, at the cast's source, before its node runs.
        on_grad = partial(self._on_logits_grad, logits.detach(), source, slot_of, edges)
        source.node.register_prehook(
            lambda grads: on_grad(grads[source.output_nr]) if grads[source.output_nr] is not None else None
        )

    def _on_logits_grad(
        self,
        logits: torch.Tensor,
        logits_edge: GradientEdge,
        slot_of: list[int],
        edges: list[GradientEdge | None],
        grad: torch.Tensor,
    ) -> None:
        """Computes the slot's curvature rows from the loss's gradient at the logits (explicit rows win)."""
        all_slots = self._hooks.slots
        if self._hooks.mode is not Capture.TRAIN or all(
            s.curvature[i] is not None for s, i in zip(all_slots, slot_of, strict=True)
        ):
            return
        # From a cast's source the gradient may live on another device (a model-parallel run's output moved to the
        # first device): the rows are made where they are back-propagated from.
        logits = logits.to(grad.device)
        weights = None
        if self.loss is CurvatureLoss.CROSS_ENTROPY:
            weights, misfit = cross_entropy_weights(logits, grad)
            # The looser of the two dtypes' tolerances: from a cast's source the gradient is bfloat16 or float16 while
            # the logits seen are their float32 copy (rounding the gradient alone misfits by about 1e-3).
            if misfit > max(tolerance_for(logits.dtype), tolerance_for(grad.dtype)):
                self.problem = (
                    "the gradient that reached the model's output is not softmax cross-entropy's c (p - onehot) "
                    f"(relative misfit {misfit:.2g}; label smoothing, a loss on another tensor, or another loss)"
                )
                return
        rows = output_factor_rows(
            logits, loss=self.loss, weights=weights, samples=self.samples, generator=self._generator(logits.device)
        ).to(grad.dtype)  # (R, *logits.shape), in the dtype of the tensor they are back-propagated from
        weighted = self.loss is CurvatureLoss.CROSS_ENTROPY
        self._store(logits_edge, slot_of, [e for e in edges if e is not None], rows, weighted=weighted)
        self.sources.add("output")

    # -- rows given with rec.curvature(logits) ----------------------------------------------------

    def from_logits(self, logits: torch.Tensor, position_reduction: PositionReduction) -> None:
        """Store the rows of softmax cross-entropy at ``logits`` ((B, C) or (B, L, V)) for every layer's latest
        forward pass (``rec.curvature``)."""
        slot_of, outputs = self._hooks.latest_outputs("rec.curvature()")
        samples = rows_per_example(self.samples, logits)
        generator = self._generator(logits.device)
        rows = torch.stack(
            logit_factor_rows(logits, samples=samples, position_reduction=position_reduction, generator=generator)
        )  # (R, *logits.shape)
        try:
            self._store(get_gradient_edge(logits), slot_of, outputs, rows, weighted=False)
        except RuntimeError as exc:
            if "second time" in str(exc) or "freed" in str(exc):
                raise RecorderError(
                    "rec.curvature() needs the autograd graph: call it before loss.backward(), "
                    "or use loss.backward(retain_graph=True)"
                ) from exc
            raise
        self.sources.add("manual")

    # -- both -------------------------------------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator:
        # One stream per step, the same wherever the rows start: a rerun draws the same labels.
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.step)

    def _store(
        self,
        output: GradientEdge,
        slot_of: list[int],
        edges: Sequence[GradientEdge],
        rows: torch.Tensor,
        *,
        weighted: bool,
    ) -> None:
        """Back-propagate R ``rows`` (R, *output.shape) from ``output`` to the layers' outputs and keep each
        layer's (B, R, d) curvature rows in its slot; ``weighted``: the rows carry the loss's own weights
        (rescaled per example when the step ends)."""
        self._hooks.mode = Capture.CURVATURE  # the training hooks must not take these gradients for the loss's
        try:
            grads = _batched_grads(output, list(edges), rows)
        finally:
            self._hooks.mode = Capture.TRAIN
        for index, layer_rows in enumerate(self._hooks.rows(slot_of, grads, rows.shape[0])):
            self._hooks.slots[index].curvature[slot_of[index]] = layer_rows  # (B, R, d)
            self._hooks.slots[index].curvature_weighted[slot_of[index]] = weighted

    # -- the end of a step ------------------------------------------------------------------------

    def weigh(self, examples: int, loss_scale: float | None) -> None:
        """Rows found from the output carry the loss's weights: make them per-example rows, as the gradients are
        (times the step's example count for a mean-reduced loss, divided by a mixed-precision loss scale)."""
        factor = (examples if self.loss_reduction is LossReduction.MEAN else 1.0) / (loss_scale or 1.0)
        for slots in self._hooks.slots:
            for slot, weighted in enumerate(slots.curvature_weighted):
                rows = slots.curvature[slot]
                if weighted and rows is not None:
                    rows.mul_(math.sqrt(factor))
                    slots.curvature_weighted[slot] = False

    def take_problem(self) -> RecorderError:
        """The error of a step whose rows could not be found at the output (the problem is cleared)."""
        problem, self.problem = self.problem, None
        return RecorderError(
            f"step {self.step}: curvature='ggn' (the default) finds its Gauss-Newton rows at the model's output, "
            f"but {problem}. Fixes: pass curvature_loss='mse' for mean squared error; call rec.curvature(logits) "
            "after the forward pass when the loss is computed on another tensor; or pass curvature='empirical' "
            "(the paper's estimator: no extra backward work, less faithful, BENCHMARKS.md)"
        )

    def resolve_samples(self, propagation: str | None, build: ManifestBuilder) -> None:
        """``curvature_samples="auto"``: one row under Adam and AdamW with cross-entropy (written to the
        manifest before any row is), else all classes. Only the first call decides."""
        if not self._samples_auto or self.mode is not CurvatureMode.GGN or self.loss is not CurvatureLoss.CROSS_ENTROPY:
            return
        self._samples_auto = False
        if propagation in ("adam", "adamw"):
            self.samples = ADAM_CURVATURE_SAMPLES
            build.set_curvature_samples(ADAM_CURVATURE_SAMPLES)

    def describe(self, build: ManifestBuilder, rows_per_example: int) -> None:
        """Write the rows of the first recorded step to the manifest (``curvature.rows_per_example`` and the rest)."""
        build.describe_curvature_rows(
            rows_per_example=rows_per_example,
            estimator=estimator_name(self.loss, self.samples, rows_per_example),
            sources=sorted(self.sources),
            loss=self.loss.value if "output" in self.sources else CurvatureLoss.CROSS_ENTROPY.value,
        )


def estimator_name(loss: CurvatureLoss, samples: int | None, rows: int) -> str:
    """The manifest's ``curvature.estimator``: ``"classes"`` (every class's row, the exact Gauss-Newton factors),
    ``"outputs"`` (every output value's row of mean squared error), :data:`dvemb.curvature.ESTIMATOR`
    (cross-entropy rows sampled), ``"signs"`` (mean squared error, sampled)."""
    if samples is None and rows > 1:
        return "classes" if loss is CurvatureLoss.CROSS_ENTROPY else "outputs"
    return ESTIMATOR if loss is CurvatureLoss.CROSS_ENTROPY else "signs"


def _batched_grads(output: GradientEdge, inputs: list[GradientEdge], rows: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients of ``output`` with respect to ``inputs`` for each of the R ``rows`` (R, *output.shape),
    stacked per input: (R, *input.shape), None for an input no row reaches. One vectorised backward when
    every operation supports it, else one backward per row."""
    if rows.shape[0] == 1:  # one row: a plain backward (vmap's batching has a cost of its own)
        grads = torch.autograd.grad(output, inputs, grad_outputs=rows[0], retain_graph=True, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's "no batching rule, slower fallback" notices
            return list(
                torch.autograd.grad(
                    output, inputs, grad_outputs=rows, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            )
    except RuntimeError as exc:
        if "second time" in str(exc) or "freed" in str(exc):
            raise
    per_row = [
        torch.autograd.grad(output, inputs, grad_outputs=row, retain_graph=True, allow_unused=True) for row in rows
    ]
    return [None if grads[0] is None else torch.stack(list(grads)) for grads in zip(*per_row, strict=True)]


def _cast_source(tensor: torch.Tensor) -> GradientEdge | None:
    """Where ``tensor``'s gradient goes when ``tensor`` is only a dtype cast of another (``x.float()``, the float32
    copies accelerate's mixed precision returns): the first gradient edge that is not a cast; None when ``tensor``
    is no cast."""
    node, found = tensor.grad_fn, None
    while node is not None and type(node).__name__ == "ToCopyBackward0" and len(node.next_functions) == 1:
        parent, output_nr = node.next_functions[0]
        if parent is None:
            break
        found, node = GradientEdge(parent, output_nr), parent
    return found
