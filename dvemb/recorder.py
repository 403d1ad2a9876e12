"""The recorder: projected per-example gradients from the user's own training loop.

Forward hooks on the tracked modules project each input as it passes; a hook on each module's
output tensor projects the output gradient when the user's ``loss.backward()`` reaches it, and
the two are combined into one projected gradient per example. Nothing is recomputed: the only
extra autograd work is the curvature pass of the ``ggn`` mode (the default; its rows start at the
model's own output, found automatically: :mod:`dvemb.output_curvature`) and the query gradients.

Typical use::

    rec = dvemb.Recorder(model, "runs/exp1")
    rec.calibrate(calibration_batches, optimizer=optimizer, lookahead_steps=total_steps // 10)
    for x, y, ids in loader:
        with rec.step(ids, optimizer):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step(); optimizer.zero_grad()
    rec.record_queries("validation", val_loader)
    rec.close()

:class:`Recorder` checks the options and coordinates the parts, one concern a module in :mod:`dvemb.recording`:
the recorded layers (``layer_set``), the per-layer hooks (``hooks``), the Gauss-Newton rows (``curvature_rows``),
the projection bases (``bases``), step bookkeeping (``steps``), query sets (``queries``) and example metadata
(``metadata``); the string options are the enums of ``modes``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvemb import logformat as fmt
from dvemb.errors import ConfigError, RecorderError
from dvemb.layers import LayerAdapter
from dvemb.recording.bases import DEFAULT_CALIBRATION_STEPS, BasisFitter
from dvemb.recording.bases import HOLD_BUDGET_BYTES as HOLD_BUDGET_BYTES  # re-exported: defined here before the split
from dvemb.recording.batches import LossFn
from dvemb.recording.curvature_rows import ADAM_CURVATURE_SAMPLES as ADAM_CURVATURE_SAMPLES  # re-exported
from dvemb.recording.curvature_rows import CurvatureRows
from dvemb.recording.hooks import LayerHooks
from dvemb.recording.layer_set import DEFAULT_PROJ_DIM, LayerSet, ProjDim, uncompiled
from dvemb.recording.layer_set import UNTRACKED_WARNING_SHARE as UNTRACKED_WARNING_SHARE  # re-exported
from dvemb.recording.metadata import example_records
from dvemb.recording.modes import (
    Capture,
    CurvatureLoss,
    CurvatureMode,
    LossReduction,
    PositionReduction,
    ProjectionMode,
    StorageDtype,
    choose,
)
from dvemb.recording.queries import QueryRecorder
from dvemb.recording.steps import DEFAULT_SECOND_MOMENT_RANK, StepBook, loss_scale_of
from dvemb.writer import LogWriter

__all__ = ["DEFAULT_PROJ_DIM", "Recorder"]


class Recorder:
    """Records projected per-example gradients of a model during training.

    Args:
        model: the model being trained (or its DistributedDataParallel wrapper).
        log_dir: directory of the gradient log to write (must not hold a log unless ``overwrite``).
        proj_dim: projected size per layer: a square int (a budget of numbers: ``k*k`` with random bases,
            split between the sides by their spectra with fitted ones; a layer that fits it is stored whole),
            ``(k_out, k_in)``, ``None`` for no projection, or a dict from layer name (or glob) to one of those.
        layers: ``None`` for every ``nn.Linear`` and ``transformers`` ``Conv1D`` (GPT-2), ``"all"`` for
            every supported layer (also Conv2d and Embedding), or a list of module names or glob
            patterns. A module whose weight is tied to a recorded one (GPT-2's input embedding and LM
            head) is recorded with it as one layer: their per-example gradients are summed, the weight
            counted once.
        curvature: ``"ggn"`` (default: Gauss-Newton factors, rows started at the model's output logits,
            found automatically during ``loss.backward()``, or given with :meth:`curvature`) or
            ``"empirical"`` (the paper: curvature from the gradients themselves; less faithful,
            BENCHMARKS.md, and no extra backward work).
        curvature_samples: rows per example in ggn mode (the most probable classes' rows, then one of a label
            drawn from the others, an unbiased estimate: dvemb.curvature). ``"auto"`` (default): one under Adam and
            AdamW with softmax cross-entropy (it cost no fidelity there and a third of the recording:
            BENCHMARKS.md "Curvature rows: fidelity against cost"), else as ``None``: all classes for (B, C)
            logits with at most 32 classes (sampling cost plain SGD 0.13-0.35 Spearman on the digits MLP) and
            one sample otherwise; an int: that many.
        curvature_loss: the loss at the model's output that ggn mode models when it finds the rows
            itself: ``"cross_entropy"`` (default: softmax cross-entropy, checked against the gradient
            that reaches the output at every step; any weighting, ignored positions and reduction) or
            ``"mse"`` (mean squared error, the per-example loss the mean over the output's values).
        loss_reduction: ``"mean"`` if the step's gradient is the mean of its examples' gradients
            (``F.cross_entropy`` default, also with gradient accumulation over the ids of the
            step), ``"sum"`` if it is their sum. Recorded gradients are always per-example.
        dtype: storage dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"float64"``.
        seed: seed of the projections and of sampled curvature labels.
        shard_size_mb: a shard is written when this many MB of gradients are buffered.
        shard_steps: write a shard every this many steps instead (keeps distributed ranks aligned).
        projection: ``"auto"`` (default: the bases of :meth:`calibrate` when it runs before training, else
            bases the recorder fits itself on the first ``calibration_steps`` steps), ``"calibrated"``
            (:meth:`calibrate` must run first) or ``"random"`` (seeded Gaussian Kronecker projection).
        calibration_steps: with ``projection="auto"`` and no :meth:`calibrate` call, the recorder holds the
            first this many steps unprojected (at most 256 MB of factors in a single process), fits
            curvature-aware bases on them, then projects and writes them (:mod:`dvemb.held_steps`); 0 keeps
            the random projection (with a warning).
        second_moment_rank: under Adam and AdamW, for projected layers over
            ``dvemb.optim.LIFTED_SECOND_MOMENT_MAX`` coordinates, the singular pairs of the second-moment
            sensitivity and of the step's gradient kept per step, so that the engine carries Adam's second-moment
            term for them too (docs/optimizers.md section 3; exact at full rank, up to 65536 coordinates). Smaller
            projected layers always keep it whole. 0 (default): left out for the larger layers.
        rank: this process's rank; defaults to ``torch.distributed`` when initialised, else 0.
        world_size: number of ranks; same default.
        overwrite: replace a log already in ``log_dir``.
    """

    def __init__(
        self,
        model: nn.Module,
        log_dir: str | Path,
        *,
        proj_dim: ProjDim | Mapping[str, ProjDim] = DEFAULT_PROJ_DIM,
        layers: Sequence[str] | str | None = None,
        curvature: str = "ggn",
        curvature_samples: int | str | None = "auto",
        curvature_loss: str = "cross_entropy",
        loss_reduction: str = "mean",
        dtype: str = "float32",
        seed: int = 0,
        shard_size_mb: float = 256.0,
        shard_steps: int | None = None,
        projection: str = "auto",
        calibration_steps: int = DEFAULT_CALIBRATION_STEPS,
        second_moment_rank: int = DEFAULT_SECOND_MOMENT_RANK,
        rank: int | None = None,
        world_size: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.curvature_mode = choose(CurvatureMode, "curvature", curvature)
        self.curvature_loss = choose(CurvatureLoss, "curvature_loss", curvature_loss)
        self.loss_reduction = choose(LossReduction, "loss_reduction", loss_reduction)
        self.projection_mode = choose(ProjectionMode, "projection", projection)
        storage_dtype = choose(StorageDtype, "dtype", dtype)
        _check_counts(curvature_samples, second_moment_rank, calibration_steps, shard_size_mb, shard_steps)
        self.model = model
        self.calibration_steps = calibration_steps
        self.second_moment_rank = second_moment_rank
        self.seed = seed
        self.rank, self.world_size = _distributed_defaults(rank, world_size)
        self._layers = LayerSet(model, layers, proj_dim, seed)
        self.adapters = self._layers.adapters
        #: The layers written to the log: one per weight (a tied partner adds its rows to its owner's).
        self.layers = self._layers.layers
        self.tracked_parameters = self._layers.tracked_parameters
        self.total_parameters = self._layers.total_parameters
        ggn = self.curvature_mode is CurvatureMode.GGN
        self._hooks = LayerHooks(self._layers, keep_outputs=ggn)  # ggn: rows are back-propagated to the outputs
        self._curvature = CurvatureRows(
            model,
            self._hooks,
            mode=self.curvature_mode,
            samples=curvature_samples,
            loss=self.curvature_loss,
            loss_reduction=self.loss_reduction,
            seed=seed,
        )
        self._writer = LogWriter(
            log_dir,
            self._manifest(),
            rank=self.rank,
            dtype=storage_dtype.value,
            shard_bytes=int(shard_size_mb * (1 << 20)),
            shard_steps=shard_steps,
            overwrite=overwrite,
        )
        self._bases = BasisFitter(
            model,
            self._layers,
            self._hooks,
            self._curvature,
            self._writer,
            mode=self.projection_mode,
            calibration_steps=calibration_steps,
            loss_reduction=self.loss_reduction,
            seed=seed,
            world_size=self.world_size,
        )
        self._steps = StepBook(
            self._layers,
            self._hooks,
            self._curvature,
            self._bases,
            self._writer,
            loss_reduction=self.loss_reduction,
            second_moment_rank=second_moment_rank,
        )
        self._queries = QueryRecorder(model, self._layers, self._hooks, self._writer)

    # -- what is recorded -------------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        from dvemb import __version__

        return {
            "world_size": self.world_size,
            "dvemb_version": __version__,
            "torch_version": torch.__version__,
            "model": type(uncompiled(self.model)).__name__,
            "loss_reduction": self.loss_reduction.value,
            "curvature": {
                "mode": self.curvature_mode.value,
                "samples": self._curvature.samples,
                "rows_per_example": None,
                "source": None,
                "loss": None,
            },
            "projection": {"kind": "kronecker-gaussian", "seed": self.seed},
            "projection_files": [],
            "layers": [self._layers.entry(a).to_json() for a in self.layers],
            "tracked_parameters": self.tracked_parameters,
            "tracked_by_kind": self.tracked_by_kind(),
            "total_parameters": self.total_parameters,
            "optimizer": None,
        }

    @property
    def curvature_samples(self) -> int | None:
        """Curvature rows per example asked for (None: every class up to 32, else one); ``"auto"`` is resolved at
        the first ``rec.step``."""
        return self._curvature.samples

    def tracked_by_kind(self) -> dict[str, dict[str, float]]:
        """Per layer kind (``linear``, ``conv1d``, ``conv2d``, ``embedding``): how many layers are recorded,
        their parameters, and their share of the model's trainable parameters (tied weights counted once)."""
        return self._layers.tracked_by_kind()

    @property
    def tracked_fraction(self) -> float:
        """Share of the model's trainable parameters whose gradients are recorded."""
        return self._layers.tracked_fraction

    def untracked_modules(self) -> list[tuple[str, str, int]]:
        """Modules holding trainable parameters that are not recorded: ``(name, type, parameters)``, largest first."""
        return self._layers.untracked_modules()

    def _partners(self, adapter: LayerAdapter) -> list[str]:
        """Names of the modules tied to ``adapter``'s weight and recorded with it (:meth:`LayerSet.partners`)."""
        return self._layers.partners(adapter)

    @property
    def log_dir(self) -> Path:
        """Directory of the log being written."""
        return self._writer.directory

    # -- training steps ---------------------------------------------------------------------------

    @contextmanager
    def step(
        self,
        ids: Any,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float | None = None,
        scaler: Any = None,
    ) -> Iterator[None]:
        """Record one optimizer step.

        Args:
            ids: example ids of every example in the step (all micro-batches, in forward order);
                ints or strings, a list, tensor or array; or ``None`` when they are given during the
                step with :meth:`add_ids` (one call per micro-batch, as integrations do).
            optimizer: the optimizer whose ``step()`` applies the update; its learning rate and
                weight decay are read when ``step()`` runs.
            lr: the learning rate, for hand-written updates without an optimizer.
            scaler: the ``torch.amp.GradScaler`` of a mixed-precision run: recorded gradients are
                divided by the scale of this step, and a step whose update the scaler skipped
                (inf or NaN gradients) is not recorded as an update (its index goes to the
                manifest's ``skipped_steps``).
        """
        id_list = self._steps.open(ids, optimizer, lr, scaler)
        if self._steps.index == 0 and not self._bases.fixed:
            # Both may warn, with a stacklevel that counts this frame: call them from here only.
            self._bases.first_step()
            self._layers.warn_if_untracked()
        loss_scale = loss_scale_of(scaler)
        self._steps.begin(id_list)
        try:
            yield
            self._steps.finish(id_list, lr, loss_scale)
        finally:
            self._steps.end()

    def add_ids(self, ids: Any) -> None:
        """Add the ids of one micro-batch to a step opened with ``rec.step(None, ...)``, in forward order."""
        self._steps.add_ids(ids)

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Record the step's training loss (optional; shown next to the phase plot)."""
        if self._hooks.mode is not Capture.TRAIN:
            raise RecorderError("rec.log_loss() must be called inside rec.step()")
        self._steps.loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def curvature(self, logits: torch.Tensor, *, position_reduction: str = "mean") -> None:
        """Record Gauss-Newton curvature factors for the latest forward pass (ggn mode).

        Call it after the forward pass and before ``loss.backward()`` (or after
        ``loss.backward(retain_graph=True)``), once per forward pass.

        Args:
            logits: (B, C) or (B, L, V) logits of the softmax cross-entropy loss.
            position_reduction: for (B, L, V) logits, whether an example's loss is the ``"mean"``
                or the ``"sum"`` over its positions.
        """
        if self.curvature_mode is not CurvatureMode.GGN:
            raise RecorderError("rec.curvature() is for curvature='ggn'; the empirical mode needs no extra call")
        if self._hooks.mode is not Capture.TRAIN:
            raise RecorderError("rec.curvature() must be called inside rec.step()")
        reduction = choose(PositionReduction, "position_reduction", position_reduction)
        self._curvature.from_logits(logits, reduction)

    def calibrate(
        self,
        batches: Iterable[Sequence[Any]],
        *,
        loss_fn: LossFn | None = None,
        keep_whole_sides: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        lookahead_steps: int = 0,
        scheduler: Any = None,
        lookahead_loss_fn: LossFn | None = None,
    ) -> int:
        """Fit curvature-aware projection bases on a few batches, before training (the first ``rec.step``).

        For every tracked Linear and Conv2d layer, sums the outer products of its inputs and of its
        output gradients over the batches and keeps the top ``k_out`` and ``k_in`` eigenvectors as
        the projection (:mod:`dvemb.calibration`). Output gradients are Gauss-Newton factor rows of the
        softmax cross-entropy by default (all classes up to 32, else ``curvature_samples`` sampled
        labels), or the gradients of ``loss_fn``. Embedding layers keep the random projection. The
        bases go into the log (``projection.safetensors``), so query and test gradients recorded later
        are projected the same way. Parameters and ``.grad`` are not changed. In a distributed run
        every rank must call it; the sums are all-reduced so that all ranks use the same bases.

        Args:
            batches: iterable of ``(inputs, targets, ...)``; 4 to 16 batches are enough (BENCHMARKS.md).
            loss_fn: per-example loss ``(outputs, targets) -> (B,)`` whose gradients define the out side;
                default the Gauss-Newton rows of cross-entropy.
            keep_whole_sides: a side that fits whole stays unprojected; ``False`` rotates it into its
                eigenbasis (full rank: equal results, for checks).
            optimizer: the training optimizer, for ``lookahead_steps``.
            lookahead_steps: first take this many optimizer steps on the calibration batches
                (cross-entropy or ``loss_fn``, reduced as ``loss_reduction`` says), fit the bases at the
                model reached, then restore the parameters, buffers, gradients, optimizer state and random
                state exactly: bases of the early
                training phase, estimated before training (BENCHMARKS.md, "Projection fidelity").
            scheduler: the learning-rate scheduler of the run (anything with ``step()``, ``state_dict()`` and
                ``load_state_dict()``): stepped after every look-ahead step, so that a warm-up is followed, and
                restored with the rest.
            lookahead_loss_fn: per-example loss the look-ahead trains with (default ``loss_fn``, else
                cross-entropy averaged over positions); the bases' factors still follow ``loss_fn``.

        Returns:
            The number of examples used.
        """
        if self.projection_mode is ProjectionMode.RANDOM:
            raise ConfigError("calibrate() needs projection='auto' or 'calibrated'; this recorder uses 'random'")
        if self._bases.fixed or self._steps.index > 0 or self._hooks.mode is not Capture.OFF:
            raise RecorderError("rec.calibrate() must run once, before the first rec.step()")
        if lookahead_steps < 0 or (lookahead_steps and optimizer is None):
            raise ConfigError("lookahead_steps must be >= 0 and needs optimizer=... (the one that trains the model)")
        return self._bases.calibrate(
            list(batches),
            loss_fn=loss_fn,
            keep_whole_sides=keep_whole_sides,
            optimizer=optimizer,
            lookahead_steps=lookahead_steps,
            scheduler=scheduler,
            lookahead_loss_fn=lookahead_loss_fn,
        )

    # -- queries and example metadata -------------------------------------------------------------

    def record_queries(
        self,
        name: str,
        batches: Iterable[Sequence[Any]],
        *,
        loss_fn: LossFn | None = None,
        texts: Sequence[str] | None = None,
        checkpoint: bool = False,
    ) -> int:
        """Record the per-example gradients of a named query set at the current (final) model.

        With ``checkpoint=True`` the set is recorded at an intermediate checkpoint, under the name
        ``{name}.step{N}`` (N: the steps recorded so far), for value dynamics: the engine then
        computes, for each such checkpoint, the influence on it of every occurrence trained before
        it (docs/results.md "Value dynamics"). Call it every few hundred steps with the same query
        batches, and once more without ``checkpoint`` after training for the final model.

        The model is put in eval mode for the pass (and restored after); parameter ``.grad`` is
        not touched. In a distributed run only rank 0 records queries.

        Args:
            name: query-set name, e.g. ``"validation"`` (letters, digits, ``_.-``).
            batches: iterable of ``(inputs, targets, ids)`` or ``(inputs, targets)`` (ids then
                count from 0); ``inputs`` a tensor, or a mapping of keyword arguments for the model
                (a model output with ``logits``, as Hugging Face models return, is reduced to them).
            loss_fn: per-example loss ``(outputs, targets) -> (B,)``; default cross-entropy (averaged
                over positions for (B, L, V) outputs).
            texts: optional text of each query, in order.
            checkpoint: record at the current step as a checkpoint of series ``name`` (see above).

        Returns:
            The number of queries recorded.
        """
        if checkpoint:
            name = f"{name}.step{self._steps.index}"
        if not fmt.QUERY_SET_NAME.match(name):
            raise ConfigError(f"query set name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if self._hooks.mode is not Capture.OFF:
            raise RecorderError("record_queries() cannot run inside rec.step()")
        self._bases.release()  # queries are projected with the bases of the training rows
        if self.rank != 0:
            return 0
        return self._queries.record(name, batches, loss_fn=loss_fn, texts=texts, step=self._steps.index)

    def describe(
        self,
        ids: Any,
        *,
        texts: Sequence[str] | None = None,
        labels: Sequence[int | str] | None = None,
        sources: Sequence[str] | None = None,
        images: Any = None,
    ) -> None:
        """Attach metadata to training examples so the dashboard can show what they are.

        Args:
            ids: the examples' ids.
            texts: text of each example.
            labels: label of each example (int or str).
            sources: where each example comes from (file, dataset, shard).
            images: (N, H, W) or (N, H, W, C) small images, uint8 or floats in [0, 1].
        """
        records = example_records(ids, texts=texts, labels=labels, sources=sources, images=images)
        self._writer.add_examples(records)

    # -- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Write everything buffered, mark the log complete and remove the hooks."""
        self._bases.release()
        self._writer.close(self._steps.closing_updates())
        self._hooks.remove()
        self._curvature.remove()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_counts(
    curvature_samples: int | str | None,
    second_moment_rank: int,
    calibration_steps: int,
    shard_size_mb: float,
    shard_steps: int | None,
) -> None:
    """The constructor's numeric options, each checked with a message that names it and what it takes."""
    if curvature_samples not in (None, "auto") and not (
        isinstance(curvature_samples, numbers.Integral)
        and not isinstance(curvature_samples, bool)
        and curvature_samples >= 1
    ):
        raise ConfigError(f"curvature_samples must be 'auto', None or at least 1, got {curvature_samples!r}")
    if second_moment_rank < 0:
        raise ConfigError(f"second_moment_rank must be 0 (off) or a number of pairs, got {second_moment_rank}")
    if calibration_steps < 0:
        raise ConfigError(f"calibration_steps must be 0 (off) or a number of steps, got {calibration_steps}")
    if shard_size_mb <= 0 or (shard_steps is not None and shard_steps < 1):
        raise ConfigError("shard_size_mb must be positive and shard_steps None or at least 1")


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` and ``world_size``, from ``torch.distributed`` where not given (0 and 1 when not initialised)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size
