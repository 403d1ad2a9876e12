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
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from dvemb import logformat as fmt
from dvemb.calibration import FactorCovariance, calibrated_projection
from dvemb.curvature import ESTIMATOR, logit_factor_rows, rows_per_example
from dvemb.errors import ConfigError, RecorderError
from dvemb.formats import LayerEntry, check_ids, repeated_in_step, unsafe_character
from dvemb.held_steps import HeldLayer, HeldStep
from dvemb.layers import LayerAdapter, adapter_type, is_default_layer, make_adapter
from dvemb.optim import DvembWarning, OptimizerInfo, TrackedParameters, describe_optimizer
from dvemb.output_curvature import cross_entropy_weights, find_logits, output_factor_rows, tolerance_for
from dvemb.projection import LayerProjection
from dvemb.writer import LogWriter, StepRecord

__all__ = ["DEFAULT_PROJ_DIM", "Recorder"]

#: Default projected size per layer (16 x 16); see BENCHMARKS.md for the overhead it costs.
DEFAULT_PROJ_DIM = 256
ProjDim = int | tuple[int, int] | None
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_MAX_IMAGE_PIXELS = 128 * 128 * 4
#: Below this share of trainable parameters tracked, the first step warns (Recorder.untracked_modules).
UNTRACKED_WARNING_SHARE = 0.8
#: Steps held unprojected while the recorder fits its own bases (no rec.calibrate), and their memory cap.
DEFAULT_CALIBRATION_STEPS = 16
#: Singular pairs per Adam step for the second-moment term of projected layers over
#: dvemb.optim.LIFTED_SECOND_MOMENT_MAX coordinates (smaller ones keep it whole). Off by default: the engine's
#: state for such a layer is (n_out * n_in, D), and it is rebuilt only up to 65536 coordinates.
DEFAULT_SECOND_MOMENT_RANK = 0
HOLD_BUDGET_BYTES = 256 << 20


@dataclass
class _Slots:
    """One layer's captures within a step, one slot per forward call (micro-batch)."""

    forward: list[torch.Tensor] = field(default_factory=list)  # (B, L, k_f) each
    grads: list[torch.Tensor | None] = field(default_factory=list)  # (B, d) each
    # Gradient edges of the outputs, for the curvature and query passes. An edge taken at forward time still
    # names the layer's own output after an in-place op (e.g. ReLU(inplace=True)) rebinds the tensor.
    outputs: list[GradientEdge | None] = field(default_factory=list)
    curvature: list[torch.Tensor | None] = field(default_factory=list)  # (B, R, d) each
    # Rows found from the output carry the loss's own weights: rescaled per example when the step ends.
    curvature_weighted: list[bool] = field(default_factory=list)
    outside_backward: int = 0  # forward passes seen outside a backward pass (see activation checkpointing)


def _resolve_proj_dim(spec: ProjDim, out_dim: int, in_dim: int, name: str) -> tuple[int, int]:
    if spec is None:
        return out_dim, in_dim
    if isinstance(spec, int) and not isinstance(spec, bool):
        side = math.isqrt(spec)
        if spec <= 0 or side * side != spec:
            raise ConfigError(f"proj_dim={spec} for layer {name!r} is not a positive square; pass (k_out, k_in)")
        if out_dim * in_dim <= spec:  # the whole gradient fits the budget: nothing to project
            return out_dim, in_dim
        k_out, k_in = side, side
    elif isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(k, int) and k > 0 for k in spec):
        k_out, k_in = spec
    else:
        raise ConfigError(f"proj_dim for layer {name!r} must be None, a square int or (k_out, k_in); got {spec!r}")
    # Projecting a side to more dimensions than it has only adds noise: keep such a side whole.
    return min(k_out, out_dim), min(k_in, in_dim)


def _default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy: (B, C) with (B,) targets, or (B, L, V) with (B, L) averaged over positions."""
    if outputs.dim() == 2:
        return F.cross_entropy(outputs, targets, reduction="none")
    per_position = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    valid = (targets != -100).to(per_position.dtype)
    return (per_position * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def _as_id_list(ids: Any) -> list[int] | list[str]:
    if isinstance(ids, torch.Tensor | np.ndarray):
        if ids.dtype.is_floating_point if isinstance(ids, torch.Tensor) else ids.dtype.kind == "f":
            raise ConfigError("example ids must be integers or strings, not floats")
        return [int(i) for i in ids.tolist()]
    out = [i.item() if isinstance(i, np.generic) else i for i in ids]
    fmt.encode_ids(out)  # raises a ConfigError on mixed types
    return out


#: Labels sampled per example for the Gauss-Newton rows under Adam and AdamW (``curvature_samples="auto"``).
ADAM_CURVATURE_SAMPLES = 1


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
        _check_choice("curvature", curvature, ("empirical", "ggn"))
        _check_choice("curvature_loss", curvature_loss, ("cross_entropy", "mse"))
        _check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        _check_choice("projection", projection, ("auto", "calibrated", "random"))
        _check_choice("dtype", dtype, tuple(fmt.STORAGE_DTYPES))
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
        self.model = model
        self.projection_mode = projection
        self.calibration_steps = calibration_steps
        self.second_moment_rank = second_moment_rank
        self._projection_fixed = False
        self._held: list[HeldStep] = []
        self.curvature_mode = curvature
        # "auto" is resolved when the optimizer is first seen (rec.step); until then (calibration) all classes.
        self._samples_auto = curvature_samples == "auto"
        self.curvature_samples: int | None = (
            None
            if isinstance(curvature_samples, str)
            else (None if curvature_samples is None else int(curvature_samples))
        )
        self.curvature_loss = curvature_loss
        self._curvature_problem: str | None = None  # why rows could not be found from the output this step
        self._curvature_sources: set[str] = set()
        self._slots_before_forward: list[int] | None = None
        self.loss_reduction = loss_reduction
        self.seed = seed
        self.rank, self.world_size = _distributed_defaults(rank, world_size)
        self.adapters, self._owner = self._make_adapters(layers, proj_dim)
        # An int proj_dim is a budget of numbers per layer: fitted bases split it between the sides by their spectra.
        self._budgets = [_budget(_proj_spec_for(a.name, proj_dim)) for a in self.adapters]
        #: The layers written to the log: one per weight (a tied partner adds its rows to its owner's).
        self.layers = [a for i, a in enumerate(self.adapters) if self._owner[i] == i]
        self._deferred = [False] * len(self.adapters)  # layers whose rows wait for the bases (held steps)
        self.tracked_parameters = sum(a.parameter_count() for a in self.layers)
        self.total_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._mode = "off"
        self._slots: list[_Slots] = []
        self._step = 0
        self._loss: float | None = None
        self._pending_ids: list[Any] | None = None
        self._iteration = 0  # rec.step() calls that ended, skipped ones included
        self._optimizer: OptimizerInfo | None = None
        self._hooks = [
            a.module.register_forward_hook(partial(self._on_forward, i)) for i, a in enumerate(self.adapters)
        ]
        if curvature == "ggn":
            self._hooks.append(model.register_forward_pre_hook(self._before_model_forward))
            self._hooks.append(model.register_forward_hook(self._on_model_output))
        self._writer = LogWriter(
            log_dir,
            self._manifest(),
            rank=self.rank,
            dtype=dtype,
            shard_bytes=int(shard_size_mb * (1 << 20)),
            shard_steps=shard_steps,
            overwrite=overwrite,
        )

    # -- set-up -----------------------------------------------------------------------------------

    def _make_adapters(self, layers: Sequence[str] | str | None, proj_dim: Any) -> tuple[list[LayerAdapter], list[int]]:
        """The adapters of the recorded modules, and for each the index of the adapter that owns its weight."""
        named = [(n, m) for n, m in _uncompiled(self.model).named_modules() if n]
        chosen = _chosen_modules(named, layers)
        for name, module in chosen:
            if adapter_type(module) is None:
                make_adapter(name, module, LayerProjection(1, 1, 1, 1, 0, 0))  # raises the ConfigError naming it
        chosen = _with_tied_partners(named, [(n, m) for n, m in chosen if _trainable(m)])
        if not chosen:
            raise ConfigError(
                "no trainable layer to record; pass layers=[...] with names of Linear, Conv1D, Conv2d or Embedding "
                "modules"
            )
        adapters: list[LayerAdapter] = []
        owner: list[int] = []
        owner_of_weight: dict[int, int] = {}
        for name, module in chosen:
            found = adapter_type(module)
            assert found is not None
            shape = found.gradient_shape(module)
            first = owner_of_weight.setdefault(id(module.weight), len(adapters))
            if first != len(adapters):  # tied: same weight, same coordinates, so the rows can be summed
                partner = adapters[first]
                if shape != (partner.projection.out_dim, partner.projection.in_dim):
                    raise ConfigError(
                        f"layers {partner.name!r} and {name!r} share a weight but their gradients have shapes "
                        f"{(partner.projection.out_dim, partner.projection.in_dim)} and {shape} (a bias on one of "
                        "them?); leave one of them out with layers=[...]"
                    )
                adapters.append(make_adapter(name, module, partner.projection))
                owner.append(first)
                continue
            k_out, k_in = _resolve_proj_dim(_proj_spec_for(name, proj_dim), shape[0], shape[1], name)
            base = self.seed * 100_003 + 2 * len(owner_of_weight) - 2
            projection = LayerProjection(shape[0], shape[1], k_out, k_in, seed_out=base, seed_in=base + 1)
            adapters.append(make_adapter(name, module, projection))
            owner.append(first)
        return adapters, owner

    def _manifest(self) -> dict[str, Any]:
        from dvemb import __version__

        return {
            "world_size": self.world_size,
            "dvemb_version": __version__,
            "torch_version": torch.__version__,
            "model": type(_uncompiled(self.model)).__name__,
            "loss_reduction": self.loss_reduction,
            "curvature": {
                "mode": self.curvature_mode,
                "samples": self.curvature_samples,
                "rows_per_example": None,
                "source": None,
                "loss": None,
            },
            "projection": {"kind": "kronecker-gaussian", "seed": self.seed},
            "projection_files": [],
            "layers": [self._layer_entry(a).to_json() for a in self.layers],
            "tracked_parameters": self.tracked_parameters,
            "tracked_by_kind": self.tracked_by_kind(),
            "total_parameters": self.total_parameters,
            "optimizer": None,
        }

    def _layer_entry(self, adapter: LayerAdapter) -> LayerEntry:
        p = adapter.projection
        return LayerEntry(
            name=adapter.name,
            kind=adapter.kind,
            out_dim=p.out_dim,
            in_dim=p.in_dim,
            k_out=p.k_out,
            k_in=p.k_in,
            seed_out=p.seed_out,
            seed_in=p.seed_in,
            has_bias=getattr(adapter.module, "bias", None) is not None,
            basis="calibrated" if p.calibrated else "seeded",
            parameters=adapter.parameter_count(),
            tied=tuple(self._partners(adapter)),
        )

    def _partners(self, adapter: LayerAdapter) -> list[str]:
        """Names of the modules tied to ``adapter``'s weight and recorded with it."""
        owner = self.adapters.index(adapter)
        return [a.name for i, a in enumerate(self.adapters) if self._owner[i] == owner and i != owner]

    def tracked_by_kind(self) -> dict[str, dict[str, float]]:
        """Per layer kind (``linear``, ``conv1d``, ``conv2d``, ``embedding``): how many layers are recorded,
        their parameters, and their share of the model's trainable parameters (tied weights counted once)."""
        out: dict[str, dict[str, float]] = {}
        for adapter in self.layers:
            entry = out.setdefault(adapter.kind, {"layers": 0, "parameters": 0, "share": 0.0})
            entry["layers"] += 1
            entry["parameters"] += adapter.parameter_count()
            entry["share"] = entry["parameters"] / max(self.total_parameters, 1)
        return out

    @property
    def tracked_fraction(self) -> float:
        """Share of the model's trainable parameters whose gradients are recorded."""
        return self.tracked_parameters / max(self.total_parameters, 1)

    @property
    def log_dir(self) -> Path:
        """Directory of the log being written."""
        return self._writer.directory

    # -- hooks ------------------------------------------------------------------------------------

    def _on_forward(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._mode == "off" or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        slots = self._slots[index]
        if torch._C._current_graph_task_id() == -1:
            slots.outside_backward += 1
        elif slots.outside_backward:
            # Activation checkpointing recomputes this forward inside backward. Non-reentrant checkpointing
            # already ran it with gradients (that pass is the one the gradient reaches): skip the recompute.
            # Reentrant checkpointing ran it without gradients, so the recompute is the pass to record.
            return
        slot = len(slots.forward)
        adapter = self.adapters[index]
        slots.forward.append(adapter.raw_forward(args) if self._deferred[index] else adapter.forward_factor(args))
        slots.grads.append(None)
        slots.curvature.append(None)
        slots.curvature_weighted.append(False)
        keep_output = self._mode == "query" or self.curvature_mode == "ggn"
        slots.outputs.append(get_gradient_edge(output) if keep_output else None)
        if self._mode == "train":
            output.register_hook(partial(self._on_output_grad, index, slot))

    def _on_output_grad(self, index: int, slot: int, grad: torch.Tensor) -> None:
        if self._mode != "train":
            return
        slots, adapter = self._slots[index], self.adapters[index]
        if self._deferred[index]:
            rows = adapter.raw_backward(grad)  # (B, L, out_dim): projected when the bases are fitted
        else:
            rows = adapter.combine(slots.forward[slot], adapter.backward_factor(grad))  # (B, d)
        previous = slots.grads[slot]
        slots.grads[slot] = rows if previous is None else previous + rows  # a second backward adds, as autograd does

    def _rows_from_output_grads(
        self, slot_of: list[int], output_grads: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """(B, d) projected rows per layer from gradients with respect to the layers' outputs ((B, L, out_dim)
        unprojected output gradients for a layer whose bases are not fitted yet): :meth:`_curvature_rows` of one row."""
        single = [None if grad is None else grad.unsqueeze(0) for grad in output_grads]
        return [rows[:, 0] for rows in self._curvature_rows(slot_of, single, 1)]

    def _latest_outputs(self, what: str) -> tuple[list[int], list[GradientEdge]]:
        slot_of: list[int] = []
        outputs: list[GradientEdge] = []
        for adapter, slots in zip(self.adapters, self._slots, strict=True):
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

    # -- Gauss-Newton rows from the model's output (ggn mode) -------------------------------------

    def _before_model_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._mode == "train" and torch.is_grad_enabled():
            self._slots_before_forward = [len(s.forward) for s in self._slots]

    def _on_model_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Hooks the model's output logits so that their gradient, during ``loss.backward()``, starts the rows."""
        before, self._slots_before_forward = self._slots_before_forward, None
        if self._mode != "train" or not torch.is_grad_enabled() or before is None:
            return
        logits = find_logits(output)
        if logits is None or not logits.requires_grad:
            self._curvature_problem = (
                f"the model returned a {type(output).__name__}, not logits (a tensor, a tuple whose first element "
                "is one, or an output with .logits)"
            )
            return
        slot_of = [len(s.forward) - 1 for s in self._slots]
        missed = [a.name for a, s, n in zip(self.adapters, self._slots, before, strict=True) if len(s.forward) == n]
        if missed:
            self._curvature_problem = (
                f"layer {missed[0]!r} did not run with gradients during the model's forward pass (reentrant "
                "activation checkpointing runs it later, inside backward: use use_reentrant=False)"
            )
            return
        edges = [s.outputs[i] for s, i in zip(self._slots, slot_of, strict=True)]
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
        if self._mode != "train" or all(s.curvature[i] is not None for s, i in zip(self._slots, slot_of, strict=True)):
            return
        # From a cast's source the gradient may live on another device (a model-parallel run's output moved to the
        # first device): the rows are made where they are back-propagated from.
        logits = logits.to(grad.device)
        weights = None
        if self.curvature_loss == "cross_entropy":
            weights, misfit = cross_entropy_weights(logits, grad)
            # The looser of the two dtypes' tolerances: from a cast's source the gradient is bfloat16 or float16 while
            # the logits seen are their float32 copy (rounding the gradient alone misfits by about 1e-3).
            if misfit > max(tolerance_for(logits.dtype), tolerance_for(grad.dtype)):
                self._curvature_problem = (
                    "the gradient that reached the model's output is not softmax cross-entropy's c (p - onehot) "
                    f"(relative misfit {misfit:.2g}; label smoothing, a loss on another tensor, or another loss)"
                )
                return
        generator = torch.Generator(device=logits.device).manual_seed(self.seed * 1_000_003 + self._step)
        rows = output_factor_rows(
            logits, loss=self.curvature_loss, weights=weights, samples=self.curvature_samples, generator=generator
        ).to(grad.dtype)  # (R, *logits.shape), in the dtype of the tensor they are back-propagated from
        weighted = self.curvature_loss == "cross_entropy"
        self._store_curvature(logits_edge, slot_of, [e for e in edges if e is not None], rows, weighted=weighted)
        self._curvature_sources.add("output")

    def _weigh_output_rows(self, examples: int, loss_scale: float | None) -> None:
        """Rows found from the output carry the loss's weights: make them per-example rows, as the gradients are
        (times the step's example count for a mean-reduced loss, divided by a mixed-precision loss scale)."""
        factor = (examples if self.loss_reduction == "mean" else 1.0) / (loss_scale or 1.0)
        for slots in self._slots:
            for slot, weighted in enumerate(slots.curvature_weighted):
                rows = slots.curvature[slot]
                if weighted and rows is not None:
                    rows.mul_(math.sqrt(factor))
                    slots.curvature_weighted[slot] = False

    def _raise_curvature_problem(self) -> None:
        problem, self._curvature_problem = self._curvature_problem, None
        self._writer.flush()
        raise RecorderError(
            f"step {self._step}: curvature='ggn' (the default) finds its Gauss-Newton rows at the model's output, "
            f"but {problem}. Fixes: pass curvature_loss='mse' for mean squared error; call rec.curvature(logits) "
            "after the forward pass when the loss is computed on another tensor; or pass curvature='empirical' "
            "(the paper's estimator: no extra backward work, less faithful, BENCHMARKS.md)"
        )

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
        if self._mode != "off":
            raise RecorderError("rec.step() cannot be nested or used inside record_queries()")
        if optimizer is None and lr is None:
            raise ConfigError("rec.step() needs the optimizer (or lr=... for a hand-written update)")
        if scaler is not None and optimizer is None:
            raise ConfigError("rec.step(scaler=...) needs the optimizer that the scaler steps")
        id_list = None if ids is None else _as_id_list(ids)
        if id_list is not None and not id_list:
            raise ConfigError("rec.step() got no example ids")
        if id_list is not None:
            self._check_unique(id_list)
        if optimizer is not None:
            self._watch(optimizer)
        self._resolve_samples(None)  # a hand-written update (lr=...): every class, fixed for the whole log
        if self._step == 0 and not self._projection_fixed:
            self._first_step_without_calibration()
            self._warn_if_untracked()
        loss_scale = _loss_scale(scaler)
        self._begin("train")
        self._pending_ids = [] if id_list is None else None
        try:
            yield
            self._finish_step(id_list if id_list is not None else self._take_pending_ids(), lr, loss_scale)
        finally:
            self._end()

    def add_ids(self, ids: Any) -> None:
        """Add the ids of one micro-batch to a step opened with ``rec.step(None, ...)``, in forward order."""
        if self._mode == "off" or self._pending_ids is None:
            raise RecorderError("rec.add_ids() is for a step opened with rec.step(None, optimizer)")
        self._pending_ids.extend(_as_id_list(ids))

    def _take_pending_ids(self) -> list[int] | list[str]:
        ids = self._pending_ids or []
        if not ids:
            raise RecorderError(f"step {self._step} was opened with rec.step(None, ...) but rec.add_ids() gave no ids")
        fmt.encode_ids(ids)  # one type for the whole step
        self._check_unique(ids)
        return ids

    def _check_unique(self, ids: Sequence[Any]) -> None:
        """A step's rows are its distinct examples: the reader refuses a log with an id twice in one step."""
        seen: set[Any] = set()
        for twice in ids:
            if twice not in seen:
                seen.add(twice)
                continue
            raise RecorderError(repeated_in_step(twice, self._step))

    def _first_step_without_calibration(self) -> None:
        if self.projection_mode == "calibrated":
            raise RecorderError(
                "projection='calibrated': call rec.calibrate(batches) before the first rec.step(), "
                "or pass projection='random'"
            )
        if self.projection_mode == "auto" and self.calibration_steps and any(self._fittable()):
            self._deferred = self._fittable()  # held unprojected until the bases are fitted on the first steps
        elif self.projection_mode == "auto" and any(not a.projection.is_identity for a in self.adapters):
            warnings.warn(
                "recording with the random projection: call rec.calibrate(batches) before training for "
                "curvature-aware bases (much closer to exact retraining at the same size, BENCHMARKS.md), or pass "
                "projection='random' to silence this",
                DvembWarning,
                stacklevel=4,
            )
        self._projection_fixed = True  # the first step fixes the projection: it no longer changes

    def _fittable(self) -> list[bool]:
        """Per adapter: its weight is projected, so its bases are fitted (every supported kind; a tied weight's
        modules, GPT-2's embedding and LM head, share one basis fitted on both paths' factors)."""
        return [not self.adapters[self._owner[i]].projection.is_identity for i in range(len(self.adapters))]

    def _covariances(self, fitted: Sequence[bool]) -> dict[int, FactorCovariance]:
        """Empty factor covariances of the fitted weights, by the index of the adapter that owns the weight."""
        owners = sorted({self._owner[i] for i, fit in enumerate(fitted) if fit})
        shapes = {i: (self.adapters[i].projection.out_dim, self.adapters[i].projection.in_dim) for i in owners}
        return {i: FactorCovariance(*shape) for i, shape in shapes.items()}

    def untracked_modules(self) -> list[tuple[str, str, int]]:
        """Modules holding trainable parameters that are not recorded: ``(name, type, parameters)``, largest first."""
        recorded = {id(a.module) for a in self.adapters}
        found = []
        for name, module in _uncompiled(self.model).named_modules():
            count = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
            if count and id(module) not in recorded:
                found.append((name or "(the model itself)", type(module).__name__, count))
        return sorted(found, key=lambda item: -item[2])

    def _warn_if_untracked(self) -> None:
        """Below 80% of the trainable parameters tracked, scores miss most of the model: say so, and what helps."""
        if self.tracked_fraction >= UNTRACKED_WARNING_SHARE:
            return
        largest = self.untracked_modules()[:3]
        named = ", ".join(f"{name} ({kind}, {count:,} parameters)" for name, kind, count in largest)
        modules = dict(_uncompiled(self.model).named_modules())
        supported = [name for name, _, _ in largest if name in modules and adapter_type(modules[name]) is not None]
        fix = (
            f"layers='all' (or layers=[...] naming {supported[0]!r}) records the supported ones"
            if supported
            else "dvemb records Linear, Conv1D, Conv2d and Embedding layers; the others cannot be tracked yet"
        )
        warnings.warn(
            f"only {self.tracked_fraction:.1%} of the model's trainable parameters are tracked: influence scores "
            f"see those layers only. Largest untracked: {named}. {fix}",
            DvembWarning,
            stacklevel=4,
        )

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
        if self.projection_mode == "random":
            raise ConfigError("calibrate() needs projection='auto' or 'calibrated'; this recorder uses 'random'")
        if self._projection_fixed or self._step > 0 or self._mode != "off":
            raise RecorderError("rec.calibrate() must run once, before the first rec.step()")
        if lookahead_steps < 0 or (lookahead_steps and optimizer is None):
            raise ConfigError("lookahead_steps must be >= 0 and needs optimizer=... (the one that trains the model)")
        batches = list(batches)
        self._lookahead_steps = lookahead_steps if batches else 0
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
                outputs = _outputs(self.model, batch[0])
                per_example = (loss_fn or _default_loss)(outputs, batch[1])
                loss = per_example.sum() if self.loss_reduction == "sum" else per_example.mean()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                with warnings.catch_warnings():
                    # accelerate re-wraps optimizer.step(), which hides the call from the scheduler's order check
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                    scheduler.step()

    def _calibrate(self, batches: list[Sequence[Any]], loss_fn: LossFn | None, keep_whole_sides: bool) -> int:
        # Every weight: with keep_whole_sides=False even a layer stored whole is rotated into its eigenbasis.
        fitted = [True] * len(self.adapters) if not keep_whole_sides else self._fittable()
        covariances = self._covariances(fitted)
        edges: list[GradientEdge | None] = [None] * len(self.adapters)
        inputs: list[torch.Tensor | None] = [None] * len(self.adapters)

        def capture(index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                inputs[index] = self.adapters[index].raw_forward(args)
                edges[index] = get_gradient_edge(output)

        hooks = [a.module.register_forward_hook(partial(capture, i)) for i, a in enumerate(self.adapters) if fitted[i]]
        examples = 0
        try:
            for number, batch in enumerate(batches):
                edges[:] = [None] * len(self.adapters)
                inputs[:] = [None] * len(self.adapters)
                with torch.enable_grad():
                    outputs = _outputs(self.model, batch[0])
                    live = [(i, e) for i, e in enumerate(edges) if e is not None]
                    for grads in self._calibration_grads(outputs, batch[1], loss_fn, [e for _, e in live], number):
                        for (index, _), grad in zip(live, grads, strict=True):
                            factors, adapter = inputs[index], self.adapters[index]
                            if grad is not None and factors is not None:
                                covariance = covariances[self._owner[index]]
                                adapter.add_covariance(covariance, factors, adapter.raw_backward(grad))
                examples += int(batch[1].shape[0])
        finally:
            for hook in hooks:
                hook.remove()
        if not examples:
            raise ConfigError("calibrate() got no batches")
        self._apply_calibration(covariances, keep_whole_sides, examples, loss_fn is None, source="batches")
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
        samples = rows_per_example(self.curvature_samples, outputs)
        generator = torch.Generator(device=outputs.device).manual_seed(self.seed * 1_000_003 - 1 - number)
        for row in logit_factor_rows(outputs, samples=samples, position_reduction="mean", generator=generator):
            yield torch.autograd.grad(outputs, edges, grad_outputs=row, retain_graph=True, allow_unused=True)

    def _apply_calibration(
        self,
        covariances: Mapping[int, FactorCovariance],
        keep_whole_sides: bool,
        examples: int,
        ggn: bool,
        *,
        source: str,
    ) -> None:
        """Fit the bases of the weights in ``covariances`` (by owning adapter index; a tied partner takes its
        owner's projection) and write them to the log."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            for index in sorted(covariances):  # every rank must use the same bases
                for matrix in covariances[index].matrices():
                    torch.distributed.all_reduce(matrix)
        tensors: dict[str, torch.Tensor] = {}
        for index, cov in covariances.items():
            adapter = self.adapters[index]
            budget = self._budgets[index] if keep_whole_sides else None  # full-rank checks keep their sizes
            projection = calibrated_projection(
                adapter.projection, cov, keep_whole_sides=keep_whole_sides, budget=budget
            )
            for i, other in enumerate(self.adapters):
                if self._owner[i] == index:
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
                "source": source,  # "batches": rec.calibrate(); "first steps": fitted by the recorder itself
                "lookahead_steps": getattr(self, "_lookahead_steps", 0),
                "steps": len(self._held),
            },
        }
        self._writer.build.fit_bases(
            [
                ("calibrated" if a.projection.calibrated else "seeded", a.projection.k_out, a.projection.k_in)
                for a in self.layers
            ]
        )
        self._writer.write_projection(tensors, info)
        self._projection_fixed = True

    def _watch(self, optimizer: torch.optim.Optimizer) -> None:
        if self._optimizer is not None and self._optimizer.optimizer is optimizer:
            return
        if self._optimizer is not None:
            self._optimizer.remove()
        try:
            self._optimizer = OptimizerInfo(
                optimizer, [_tracked(a) for a in self.layers], second_moment_rank=self.second_moment_rank
            )
        except ValueError as exc:
            raise ConfigError(f"{exc}; pass the optimizer that trains the model") from None
        if self._writer.build.optimizer is None:
            entry = describe_optimizer(self._optimizer)
            self._resolve_samples(self._optimizer.propagation)
            carriers = None
            if self._optimizer.propagation in ("adam", "adamw"):
                entry["second_moment_rank"] = self.second_moment_rank
                carriers = [_second_moment_carrier(t, self.second_moment_rank) for t in self._optimizer.tracked]
            self._writer.build.describe_optimizer(entry, carriers)

    def _resolve_samples(self, propagation: str | None) -> None:
        """``curvature_samples="auto"``: one row under Adam and AdamW with cross-entropy (written to the
        manifest before any row is), else all classes."""
        if not self._samples_auto or self.curvature_mode != "ggn" or self.curvature_loss != "cross_entropy":
            return
        self._samples_auto = False
        if propagation in ("adam", "adamw"):
            self.curvature_samples = ADAM_CURVATURE_SAMPLES
            self._writer.build.set_curvature_samples(ADAM_CURVATURE_SAMPLES)

    def _begin(self, mode: str) -> None:
        self._mode = mode
        self._curvature_problem = None
        self._slots = [_Slots() for _ in self.adapters]
        self._loss = None

    def _end(self) -> None:
        self._mode = "off"
        self._slots = []
        self._pending_ids = None

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Record the step's training loss (optional; shown next to the phase plot)."""
        if self._mode != "train":
            raise RecorderError("rec.log_loss() must be called inside rec.step()")
        self._loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def curvature(self, logits: torch.Tensor, *, position_reduction: str = "mean") -> None:
        """Record Gauss-Newton curvature factors for the latest forward pass (ggn mode).

        Call it after the forward pass and before ``loss.backward()`` (or after
        ``loss.backward(retain_graph=True)``), once per forward pass.

        Args:
            logits: (B, C) or (B, L, V) logits of the softmax cross-entropy loss.
            position_reduction: for (B, L, V) logits, whether an example's loss is the ``"mean"``
                or the ``"sum"`` over its positions.
        """
        if self.curvature_mode != "ggn":
            raise RecorderError("rec.curvature() is for curvature='ggn'; the empirical mode needs no extra call")
        if self._mode != "train":
            raise RecorderError("rec.curvature() must be called inside rec.step()")
        _check_choice("position_reduction", position_reduction, ("mean", "sum"))
        slot_of, outputs = self._latest_outputs("rec.curvature()")
        samples = rows_per_example(self.curvature_samples, logits)
        generator = torch.Generator(device=logits.device).manual_seed(self.seed * 1_000_003 + self._step)
        rows = torch.stack(
            logit_factor_rows(logits, samples=samples, position_reduction=position_reduction, generator=generator)
        )  # (R, *logits.shape)
        try:
            self._store_curvature(get_gradient_edge(logits), slot_of, outputs, rows, weighted=False)
        except RuntimeError as exc:
            if "second time" in str(exc) or "freed" in str(exc):
                raise RecorderError(
                    "rec.curvature() needs the autograd graph: call it before loss.backward(), "
                    "or use loss.backward(retain_graph=True)"
                ) from exc
            raise
        self._curvature_sources.add("manual")

    def _store_curvature(
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
        self._mode = "curvature"  # the training hooks must not take these gradients for the loss's
        try:
            grads = _batched_grads(output, list(edges), rows)
        finally:
            self._mode = "train"
        for index, layer_rows in enumerate(self._curvature_rows(slot_of, grads, rows.shape[0])):
            self._slots[index].curvature[slot_of[index]] = layer_rows  # (B, R, d)
            self._slots[index].curvature_weighted[slot_of[index]] = weighted

    def _curvature_rows(
        self, slot_of: list[int], output_grads: Sequence[torch.Tensor | None], count: int
    ) -> list[torch.Tensor]:
        """(B, R, d) projected rows per layer (curvature rows, or with R = 1 a query's) from the R rows' gradients
        with respect to the layers' outputs ((R, B, ...) each, None where a row does not reach the layer);
        (B, R, L, out_dim) unprojected output gradients for a layer whose bases are not fitted yet."""
        found = []
        for index, grad in enumerate(output_grads):
            slots, adapter = self._slots[index], self.adapters[index]
            forward = slots.forward[slot_of[index]]  # (B, L, k) or, deferred, the raw factor
            batch = forward.shape[0]
            if self._deferred[index]:
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

    def _finish_step(self, ids: list[int] | list[str], lr: float | None, loss_scale: float | None) -> None:
        self._iteration += 1
        if loss_scale is not None and self._optimizer is not None and not self._optimizer.stepped():
            # The scaler found inf/NaN and skipped optimizer.step(): no update happened, nothing to attribute.
            self._writer.build.skip_step(self._iteration - 1)
            self._optimizer.take_step_values(require_step=False)
            return
        pairs = list(zip(self.adapters, self._slots, strict=True))
        ggn = self.curvature_mode == "ggn"
        live = {i: (a, s) for i, (a, s) in enumerate(pairs) if not self._deferred[i]}
        grads = self._merged({i: self._collect(a, s.grads, "gradient", ids) for i, (a, s) in live.items()})
        for index, (adapter, slots) in enumerate(pairs):
            if self._deferred[index]:
                self._collect(adapter, slots.grads, "gradient", ids)  # the same checks, before any other error
        if ggn:
            if self._curvature_problem is not None and any(None in s.curvature for s in self._slots):
                self._raise_curvature_problem()
            self._weigh_output_rows(len(ids), loss_scale)
        curvature: dict[str, torch.Tensor] = {}
        if ggn:
            curvature = self._merged({i: self._collect(a, s.curvature, "curvature", ids) for i, (a, s) in live.items()})
        held = {i: self._held_layer(a, s, ids, ggn) for i, (a, s) in enumerate(pairs) if self._deferred[i]}
        # The backward ran on the scaled loss; a mean-reduced step's gradient is the mean of its examples'.
        factor = (len(ids) if self.loss_reduction == "mean" else 1.0) / (loss_scale or 1.0)
        if factor != 1.0:
            for rows in [*grads.values(), *(t for layer in held.values() for t in layer.grads)]:
                rows.mul_(factor)
        self._check_finite(grads, curvature, [t for layer in held.values() for t in layer.tensors()])
        optimizer_state: dict[str, torch.Tensor] = {}
        if self._optimizer is not None and lr is None:
            try:
                lrs, decays, state = self._optimizer.take_step_values()
            except RuntimeError as exc:
                raise RecorderError(f"step {self._step}: {exc}; call optimizer.step() inside rec.step()") from None
            optimizer_state = self._optimizer_tensors(state)
        else:
            lrs, decays = [float(lr or 0.0)] * len(self.layers), [0.0] * len(self.layers)
        if ggn and not self._writer.build.curvature_described:
            held_rows = [layer.curvature[0] for layer in held.values() if layer.curvature]
            per_example = int((next(iter(curvature.values())) if curvature else held_rows[0]).shape[1])
            self._writer.build.describe_curvature_rows(
                rows_per_example=per_example,
                estimator=_estimator(self.curvature_loss, self.curvature_samples, per_example),
                sources=sorted(self._curvature_sources),
                loss=self.curvature_loss if "output" in self._curvature_sources else "cross_entropy",
            )
        record = StepRecord(self._step, ids, lrs, decays, self._loss, grads, curvature, optimizer_state)
        if held:
            self._held.append(HeldStep(record, held))
            self._step += 1
            if len(self._held) >= self.calibration_steps or self._held_too_large():
                self._release_held()
            return
        self._writer.accept_step(record)
        self._step += 1  # recorded: a write error below concerns the disk, and the step is retried with the next shard
        self._writer.flush_if_full()

    def _held_layer(self, adapter: LayerAdapter, slots: _Slots, ids: Sequence[Any], ggn: bool) -> HeldLayer:
        """A deferred layer's unprojected factors of the step, checked as :meth:`_collect` checks rows."""
        if ggn:
            self._collect(adapter, slots.curvature, "curvature", ids)
        curvature = [c for c in slots.curvature if c is not None] if ggn else None
        return HeldLayer(list(slots.forward), [g for g in slots.grads if g is not None], curvature)

    def _held_too_large(self) -> bool:
        # Ranks of a distributed run must fit their bases at the same step: only the step count decides there.
        return self.world_size == 1 and sum(step.nbytes for step in self._held) > HOLD_BUDGET_BYTES

    def _release_held(self) -> None:
        """Fit the bases on the held steps' factors, then project those steps and write them in order."""
        if not self._held:
            return
        covariances = self._covariances(self._deferred)
        examples = 0
        for step in self._held:
            counts = [
                layer.add_to(covariances[self._owner[index]], self.adapters[index])
                for index, layer in step.layers.items()
            ]
            examples += counts[0]
        ggn = self.curvature_mode == "ggn"
        self._apply_calibration(covariances, True, examples, ggn, source="first steps")
        held, self._held = self._held, []
        for step in held:
            projected = {index: layer.project(self.adapters[index]) for index, layer in step.layers.items()}
            step.record.grads.update(self._merged({i: grads for i, (grads, _) in projected.items()}))
            step.record.curvature.update(self._merged({i: r for i, (_, r) in projected.items() if r is not None}))
            order = [a.name for a in self.layers]
            step.record.grads = {n: step.record.grads[n] for n in order}
            if step.record.curvature:
                step.record.curvature = {n: step.record.curvature[n] for n in order}
            self._writer.accept_step(step.record)
            self._writer.flush_if_full()
        self._deferred = [False] * len(self.adapters)

    def _merged(self, rows: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-adapter (B, d) rows (by adapter index) as per logged layer: a tied partner's rows are added to its
        owner's."""
        out: dict[str, torch.Tensor] = {}
        for index, part in rows.items():
            name = self.adapters[self._owner[index]].name
            out[name] = part if name not in out else out[name] + part
        return out

    def _optimizer_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The optimizer's per-step tensors under their shard names (per-layer ones named by layer)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            parts = key.split(".")
            if len(parts) == 3:  # opt.<what>.<layer index>
                out[fmt.optimizer_layer_key(parts[1], self.layers[int(parts[2])].name)] = value
            else:
                out[key] = value
        return out

    def _collect(
        self, adapter: LayerAdapter, parts: list[torch.Tensor | None], what: str, ids: Sequence[Any]
    ) -> torch.Tensor:
        if not parts:
            raise RecorderError(
                f"layer {adapter.name!r} was not run with gradients in step {self._step}; run the forward pass inside "
                "rec.step(), or leave the layer out with layers=[...]"
            )
        if any(p is None for p in parts):
            hint = (
                "call loss.backward() inside rec.step()"
                if what == "gradient"
                else "the model's output did not reach the loss: call rec.curvature(logits) after every forward "
                "pass, or pass curvature='empirical'"
            )
            raise RecorderError(f"no {what} reached layer {adapter.name!r} in step {self._step}; {hint}")
        rows = torch.cat([p for p in parts if p is not None])
        if rows.shape[0] != len(ids):
            raise RecorderError(
                f"layer {adapter.name!r} saw {rows.shape[0]} examples in step {self._step} "
                f"but {len(ids)} ids were given; "
                "pass the ids of every micro-batch of the step, in order (a layer called twice per forward pass, or "
                "one whose input has no per-example batch dimension such as a position embedding fed (1, L) "
                "positions, cannot be tracked: leave it out with layers=[...])"
            )
        return rows

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
        self._release_held()
        self._writer.flush()
        raise RecorderError(
            f"non-finite gradient in layer {bad!r} at step {self._step} (learning rate too large, or "
            f"float16 overflow?); the log keeps steps 0 to {self._step - 1}"
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
            name = f"{name}.step{self._step}"
        if not fmt.QUERY_SET_NAME.match(name):
            raise ConfigError(f"query set name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if self._mode != "off":
            raise RecorderError("record_queries() cannot run inside rec.step()")
        self._release_held()  # queries are projected with the bases of the training rows
        if self.rank != 0:
            return 0
        loss_fn = loss_fn or _default_loss
        parts: list[list[torch.Tensor]] = [[] for _ in self.adapters]
        ids: list[Any] = []
        labels: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                inputs, targets = batch[0], batch[1]
                batch_ids = _as_id_list(batch[2]) if len(batch) > 2 else list(range(len(ids), len(ids) + len(targets)))
                self._begin("query")
                with torch.enable_grad():
                    per_example = loss_fn(_outputs(self.model, inputs), targets)  # (B,)
                    slot_of, outputs = self._latest_outputs("record_queries()")
                    grads = torch.autograd.grad(per_example.sum(), outputs, allow_unused=True)
                for index, rows in enumerate(self._rows_from_output_grads(slot_of, grads)):
                    parts[index].append(rows.detach())
                self._end()
                ids.extend(batch_ids)
                losses.append(per_example.detach().double().cpu())
                if targets.dim() == 1 and not targets.is_floating_point():
                    labels.append(targets.detach().cpu().long())
        finally:
            self._end()
            self.model.train(was_training)
        if not ids:
            raise ConfigError(f"query set {name!r} is empty")
        if texts is not None and len(texts) != len(ids):
            raise ConfigError(f"{len(texts)} texts for {len(ids)} queries in query set {name!r}")
        merged = self._merged(dict(enumerate(torch.cat(p) for p in parts)))
        tensors = {fmt.grad_key(name): rows for name, rows in merged.items()}
        tensors.update(fmt.encode_ids(ids), loss=torch.cat(losses))
        if len(labels) and sum(len(lab) for lab in labels) == len(ids):
            tensors["labels"] = torch.cat(labels)
        info = {"num_queries": len(ids), "step": self._step, "texts": list(texts) if texts is not None else None}
        self._writer.write_query_set(name, tensors, info)
        return len(ids)

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
        id_list = _as_id_list(ids)
        columns = {"text": texts, "label": labels, "source": sources}
        for key, values in columns.items():
            if values is not None and len(values) != len(id_list):
                raise ConfigError(f"describe(): {len(values)} {key}s for {len(id_list)} ids")
        try:
            check_ids(id_list)
        except ValueError as exc:
            raise ConfigError(f"describe(): {exc}") from None
        records: list[dict[str, Any]] = [{"id": i} for i in id_list]
        for key, values in columns.items():
            if values is not None:
                for record, value in zip(records, values, strict=True):
                    record[key] = value.item() if isinstance(value, torch.Tensor | np.generic) else value
                    _check_text(key, record)
        if images is not None:
            for record, image in zip(records, _encode_images(images, len(id_list)), strict=True):
                record["image"] = image
        self._writer.add_examples(records)

    # -- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Write everything buffered, mark the log complete and remove the hooks."""
        self._release_held()
        updates: dict[str, Any] = {"num_steps": self._step}
        if self._optimizer is not None:
            optimizer_entry = self._writer.build.optimizer or {}
            optimizer_entry["final_state"] = self._optimizer.state_summary()
            updates["optimizer"] = optimizer_entry
            self._optimizer.remove()
        self._writer.close(updates)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def _budget(spec: ProjDim) -> int | None:
    """The numbers per projected gradient an int ``proj_dim`` allows (None: explicit sizes or no projection)."""
    return spec if isinstance(spec, int) and not isinstance(spec, bool) else None


def _proj_spec_for(name: str, proj_dim: Any) -> ProjDim:
    if not isinstance(proj_dim, Mapping):
        return proj_dim  # type: ignore[no-any-return]
    for pattern, spec in proj_dim.items():
        if fnmatch.fnmatchcase(name, pattern):
            return spec  # type: ignore[no-any-return]
    return DEFAULT_PROJ_DIM


def _check_text(key: str, record: dict[str, Any]) -> None:
    """A ConfigError when an example's text, label or source holds what no log may hold (the validator would refuse
    the whole log at upload): said when it is described, not after training."""
    value = record[key]
    unsafe = unsafe_character(value) if isinstance(value, str) else None
    if unsafe is not None:
        raise ConfigError(
            f"describe(): the {key} of example {record['id']!r} holds {unsafe} (NUL, or a bidirectional override that "
            "makes the shown text read otherwise); remove it"
        )


def _second_moment_carrier(tracked: TrackedParameters, rank: int) -> str:
    """How the log carries a layer's Adam second-moment term (docs/format.md, ``layers[].second_moment``)."""
    if tracked.whole:
        return "whole"
    if tracked.lifted:
        return "lifted-moments"  # vsens, the step's gradient and the preconditioner, whole
    return "factors" if rank else "none"


def _tracked(adapter: LayerAdapter) -> TrackedParameters:
    weight = getattr(adapter.module, "weight", None)
    assert isinstance(weight, nn.Parameter)
    bias = getattr(adapter.module, "bias", None)
    return TrackedParameters(
        weight=weight,
        bias=bias if isinstance(bias, nn.Parameter) else None,
        out_dim=adapter.projection.out_dim,
        whole=adapter.projection.is_identity,
        transpose=adapter.kind == "conv1d",
    )


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its layers' names without the ``_orig_mod.`` prefix, as the user knows
    them), or ``model`` itself. Hooks on the wrapped modules run in the compiled model (tested)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def _chosen_modules(
    named: list[tuple[str, nn.Module]], layers: Sequence[str] | str | None
) -> list[tuple[str, nn.Module]]:
    if layers is None:
        return [(n, m) for n, m in named if is_default_layer(m)]
    if layers == "all":
        return [(n, m) for n, m in named if adapter_type(m) is not None]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            raise ConfigError(f"layers: no module matches {pattern!r}; module names look like {named[0][0]!r}")
    return [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _with_tied_partners(
    named: list[tuple[str, nn.Module]], chosen: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """``chosen`` plus every supported module that shares a weight with one of them, in module order:
    recording only one side of a tied weight would miss part of its gradient."""
    weights = {id(m.weight) for _, m in chosen if isinstance(getattr(m, "weight", None), torch.Tensor)}
    names = {n for n, _ in chosen}
    return [
        (n, m)
        for n, m in named
        if n in names or (adapter_type(m) is not None and _trainable(m) and id(getattr(m, "weight", None)) in weights)
    ]


def _outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
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


def _estimator(loss: str, samples: int | None, rows: int) -> str:
    """The manifest's ``curvature.estimator``: ``"classes"`` (every class's row, the exact Gauss-Newton factors),
    :data:`dvemb.curvature.ESTIMATOR` (cross-entropy rows sampled), ``"signs"`` (mean squared error, sampled)."""
    if samples is None and rows > 1:
        return "classes" if loss == "cross_entropy" else "outputs"
    return ESTIMATOR if loss == "cross_entropy" else "signs"


def _loss_scale(scaler: Any) -> float | None:
    """The loss scale of an enabled ``GradScaler`` for this step (before its ``update()``), else None."""
    if scaler is None or not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size


def _encode_images(images: Any, count: int) -> list[dict[str, Any]]:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype.kind == "f":
        array = np.clip(np.rint(array * 255.0), 0, 255)
    array = array.astype(np.uint8)
    if array.ndim not in (3, 4) or array.shape[0] != count or array[0].size > _MAX_IMAGE_PIXELS:
        raise ConfigError(
            f"describe(): images must be (N, H, W) or (N, H, W, C) with N={count} and at most "
            f"{_MAX_IMAGE_PIXELS} values each; got {array.shape}"
        )
    return [{"shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")} for a in array]
