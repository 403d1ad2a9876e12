"""The recorder's projection bases: fitted by ``rec.calibrate`` before training, or on the run's first steps.

Both ways sum the same factor covariances (:class:`dvemb.calibration.FactorCovariance`: inputs on one side,
output gradients or Gauss-Newton rows' output gradients on the other) and fit the bases with
:func:`dvemb.calibration.calibrated_projection`; the bases go into the log (``projection.safetensors``).

- :meth:`BasisFitter.calibrate`: extra passes over the user's batches before the first step, optionally at the
  model reached after a few look-ahead optimizer steps (everything restored after).
- :meth:`BasisFitter.first_step` / :meth:`BasisFitter.hold` / :meth:`BasisFitter.release`: without
  ``rec.calibrate`` the first ``calibration_steps`` steps are held unprojected (:mod:`dvemb.held_steps`), the
  bases fitted on them, and the held steps projected and written in order.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from dvemb import logformat as fmt
from dvemb.calibration import FactorCovariance, calibrated_projection
from dvemb.curvature import logit_factor_rows, rows_per_example
from dvemb.errors import ConfigError, RecorderError
from dvemb.held_steps import HeldStep
from dvemb.optim import DvembWarning
from dvemb.recording.batches import LossFn, default_loss, model_outputs
from dvemb.recording.curvature_rows import CurvatureRows
from dvemb.recording.hooks import LayerHooks
from dvemb.recording.layer_set import LayerSet
from dvemb.recording.modes import BasisSource, CurvatureMode, LossReduction, ProjectionMode
from dvemb.writer import LogWriter

__all__ = ["DEFAULT_CALIBRATION_STEPS", "HOLD_BUDGET_BYTES", "BasisFitter"]

#: Steps held unprojected while the recorder fits its own bases (no rec.calibrate), and their memory cap.
DEFAULT_CALIBRATION_STEPS = 16
HOLD_BUDGET_BYTES = 256 << 20


class BasisFitter:
    """Fits the projection bases of the recorded layers and writes them to the log.

    Args:
        model: the model being trained.
        layers: the recorded layers (their projections are replaced by the fitted ones).
        hooks: the layer hooks (``deferred`` marks the layers held unprojected).
        curvature: the curvature rows (mode and samples decide which factors calibration sums).
        writer: the log writer (the bases, and the held steps once projected).
        mode: where the bases come from.
        calibration_steps: steps to hold when the recorder fits the bases itself.
        loss_reduction: how the look-ahead reduces its per-example losses.
        seed: the recorder's seed (calibration's sampled labels, and the manifest).
        world_size: ranks of the run; with several, covariances are all-reduced.

    Attributes:
        fixed: the projection can no longer change (calibrated, or the first step began).
        held: the steps held unprojected, in order.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSet,
        hooks: LayerHooks,
        curvature: CurvatureRows,
        writer: LogWriter,
        *,
        mode: ProjectionMode,
        calibration_steps: int,
        loss_reduction: LossReduction,
        seed: int,
        world_size: int,
    ) -> None:
        self.model = model
        self.layers = layers
        self.hooks = hooks
        self.curvature = curvature
        self.writer = writer
        self.mode = mode
        self.calibration_steps = calibration_steps
        self.loss_reduction = loss_reduction
        self.seed = seed
        self.world_size = world_size
        self.fixed = False
        self.held: list[HeldStep] = []
        self.lookahead_steps = 0

    # -- rec.calibrate(batches) -------------------------------------------------------------------

    def calibrate(
        self,
        batches: list[Sequence[Any]],
        *,
        loss_fn: LossFn | None,
        keep_whole_sides: bool,
        optimizer: torch.optim.Optimizer | None,
        lookahead_steps: int,
        scheduler: Any,
        lookahead_loss_fn: LossFn | None,
    ) -> int:
        """Fit the bases on ``batches`` (after ``lookahead_steps`` optimizer steps on them, undone after);
        returns the examples used (``Recorder.calibrate`` checks the arguments and documents them)."""
        self.lookahead_steps = lookahead_steps if batches else 0
        if lookahead_steps and batches:
            with _restored(self.model, optimizer, scheduler):
                train_loss = lookahead_loss_fn or loss_fn
                self._look_ahead(batches, train_loss, optimizer, lookahead_steps, scheduler)  # type: ignore[arg-type]
                return self._calibrate(batches, loss_fn, keep_whole_sides)
        return self._calibrate(batches, loss_fn, keep_whole_sides)

    def _look_ahead(
        self,
        batches: list[Sequence[Any]],
        loss_fn: LossFn | None,
        optimizer: torch.optim.Optimizer,
        steps: int,
        scheduler: Any,
    ) -> None:
        for step in range(steps):
            batch = batches[step % len(batches)]
            with torch.enable_grad():
                outputs = model_outputs(self.model, batch[0])
                per_example = (loss_fn or default_loss)(outputs, batch[1])  # (B,)
                loss = per_example.sum() if self.loss_reduction is LossReduction.SUM else per_example.mean()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                with warnings.catch_warnings():
                    # accelerate re-wraps optimizer.step(), which hides the call from the scheduler's order check
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                    scheduler.step()

    def _calibrate(self, batches: list[Sequence[Any]], loss_fn: LossFn | None, keep_whole_sides: bool) -> int:
        adapters = self.layers.adapters
        # Every weight: with keep_whole_sides=False even a layer stored whole is rotated into its eigenbasis.
        fitted = [True] * len(adapters) if not keep_whole_sides else self.layers.fittable()
        covariances = self.layers.covariances(fitted)
        edges: list[GradientEdge | None] = [None] * len(adapters)
        inputs: list[torch.Tensor | None] = [None] * len(adapters)

        def capture(index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                inputs[index] = adapters[index].raw_forward(args)
                edges[index] = get_gradient_edge(output)

        hooks = [a.module.register_forward_hook(partial(capture, i)) for i, a in enumerate(adapters) if fitted[i]]
        examples = 0
        try:
            for number, batch in enumerate(batches):
                edges[:] = [None] * len(adapters)
                inputs[:] = [None] * len(adapters)
                with torch.enable_grad():
                    outputs = model_outputs(self.model, batch[0])
                    live = [(i, e) for i, e in enumerate(edges) if e is not None]
                    for grads in self._calibration_grads(outputs, batch[1], loss_fn, [e for _, e in live], number):
                        for (index, _), grad in zip(live, grads, strict=True):
                            factors, adapter = inputs[index], adapters[index]
                            if grad is not None and factors is not None:
                                covariance = covariances[self.layers.owner[index]]
                                adapter.add_covariance(covariance, factors, adapter.raw_backward(grad))
                examples += int(batch[1].shape[0])
        finally:
            for hook in hooks:
                hook.remove()
        if not examples:
            raise ConfigError("calibrate() got no batches")
        self._apply(covariances, keep_whole_sides, examples, loss_fn is None, source=BasisSource.BATCHES)
        return examples

    def _calibration_grads(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn | None,
        edges: list[GradientEdge],
        number: int,
    ) -> Iterator[Sequence[torch.Tensor | None]]:
        """Gradients of the layers' outputs for each curvature row (or for the loss)."""
        if loss_fn is not None:
            yield torch.autograd.grad(loss_fn(outputs, targets).sum(), edges, allow_unused=True)
            return
        samples = rows_per_example(self.curvature.samples, outputs)
        # A stream per batch, apart from the steps' (seeded seed * 1_000_003 + step, step >= 0).
        generator = torch.Generator(device=outputs.device).manual_seed(self.seed * 1_000_003 - 1 - number)
        for row in logit_factor_rows(outputs, samples=samples, position_reduction="mean", generator=generator):
            yield torch.autograd.grad(outputs, edges, grad_outputs=row, retain_graph=True, allow_unused=True)

    # -- bases fitted on the first steps ----------------------------------------------------------

    def first_step(self) -> None:
        """The first step begins without ``rec.calibrate``: hold it (and the next ones) unprojected to fit the
        bases on, or warn that the random projection is used. The projection is fixed from here on.

        Called by ``Recorder.step`` itself: the warning's ``stacklevel`` (this method, ``Recorder.step``,
        contextlib's ``__enter__``) points at the user's ``with rec.step(...)`` line.
        """
        if self.mode is ProjectionMode.CALIBRATED:
            raise RecorderError(
                "projection='calibrated': call rec.calibrate(batches) before the first rec.step(), "
                "or pass projection='random'"
            )
        if self.mode is ProjectionMode.AUTO and self.calibration_steps and any(self.layers.fittable()):
            self.hooks.deferred = self.layers.fittable()  # held unprojected until the bases are fitted
        elif self.mode is ProjectionMode.AUTO and any(not a.projection.is_identity for a in self.layers.adapters):
            warnings.warn(
                "recording with the random projection: call rec.calibrate(batches) before training for "
                "curvature-aware bases (much closer to exact retraining at the same size, BENCHMARKS.md), or pass "
                "projection='random' to silence this",
                DvembWarning,
                stacklevel=4,
            )
        self.fixed = True  # the first step fixes the projection: it no longer changes

    def hold(self, step: HeldStep) -> None:
        """Keep a finished step whose deferred layers wait for the bases; fit them once enough steps are held."""
        self.held.append(step)
        if len(self.held) >= self.calibration_steps or self._held_too_large():
            self.release()

    def _held_too_large(self) -> bool:
        # Ranks of a distributed run must fit their bases at the same step: only the step count decides there.
        return self.world_size == 1 and sum(step.nbytes for step in self.held) > HOLD_BUDGET_BYTES

    def release(self) -> None:
        """Fit the bases on the held steps' factors, then project those steps and write them in order."""
        if not self.held:
            return
        adapters = self.layers.adapters
        covariances = self.layers.covariances(self.hooks.deferred)
        examples = 0
        for step in self.held:
            counts = [
                layer.add_to(covariances[self.layers.owner[index]], adapters[index])
                for index, layer in step.layers.items()
            ]
            examples += counts[0]
        ggn = self.curvature.mode is CurvatureMode.GGN
        self._apply(covariances, True, examples, ggn, source=BasisSource.FIRST_STEPS)
        held, self.held = self.held, []
        order = [a.name for a in self.layers.layers]
        for step in held:
            projected = {index: layer.project(adapters[index]) for index, layer in step.layers.items()}
            record = step.record
            record.grads.update(self.layers.merged({i: grads for i, (grads, _) in projected.items()}))
            record.curvature.update(self.layers.merged({i: r for i, (_, r) in projected.items() if r is not None}))
            record.grads = {n: record.grads[n] for n in order}  # the manifest's layer order, as live steps have
            if record.curvature:
                record.curvature = {n: record.curvature[n] for n in order}
            self.writer.accept_step(record)
            self.writer.flush_if_full()
        self.hooks.deferred = [False] * len(adapters)

    # -- both -------------------------------------------------------------------------------------

    def _apply(
        self,
        covariances: Mapping[int, FactorCovariance],
        keep_whole_sides: bool,
        examples: int,
        ggn: bool,
        *,
        source: BasisSource,
    ) -> None:
        """Fit the bases of the weights in ``covariances`` (by owning adapter index; a tied partner takes its
        owner's projection) and write them to the log."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            for index in sorted(covariances):  # every rank must use the same bases
                for matrix in covariances[index].matrices():
                    torch.distributed.all_reduce(matrix)
        tensors: dict[str, torch.Tensor] = {}
        adapters = self.layers.adapters
        for index, cov in covariances.items():
            adapter = adapters[index]
            budget = self.layers.budgets[index] if keep_whole_sides else None  # full-rank checks keep their sizes
            projection = calibrated_projection(
                adapter.projection, cov, keep_whole_sides=keep_whole_sides, budget=budget
            )
            for i, other in enumerate(adapters):
                if self.layers.owner[i] == index:
                    other.set_projection(projection)
            for side, basis in (("out", projection.basis_out), ("in", projection.basis_in)):
                if basis is not None:
                    tensors[fmt.basis_key(side, adapter.name)] = basis
        info = {
            "kind": "calibrated",
            "seed": self.seed,
            "calibration": {
                "examples": examples,
                "factors": "ggn" if ggn else "loss",
                "source": source.value,
                "lookahead_steps": self.lookahead_steps,
                "steps": len(self.held),
            },
        }
        self.writer.build.fit_bases(
            [
                ("calibrated" if a.projection.calibrated else "seeded", a.projection.k_out, a.projection.k_in)
                for a in self.layers.layers
            ]
        )
        self.writer.write_projection(tensors, info)
        self.fixed = True


@contextmanager
def _restored(model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any = None) -> Iterator[None]:
    """Run a block, then put the model's parameters and buffers, the optimizer's and the scheduler's state
    and the random state back exactly as they were (look-ahead calibration trains in place)."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    scheduler_state = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    grads = {id(p): (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            model.load_state_dict(state)
        for p in model.parameters():
            p.grad = grads[id(p)]
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        if scheduler is not None and scheduler_state is not None:
            scheduler.load_state_dict(scheduler_state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
