"""The recorded layers: which modules are recorded, their adapters and projections, and tied weights.

A recorded module gets a :class:`~dvemb.layers.LayerAdapter` (``dvemb.layers``) with a seeded projection sized
by ``proj_dim``. Modules that share one weight (GPT-2's input embedding and LM head) are recorded as one layer:
each has an adapter, the first one in module order owns the weight, and the others' rows are added to the
owner's (:meth:`LayerSet.merged`), so the log holds one row per weight and example.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dvemb.calibration import FactorCovariance
from dvemb.errors import ConfigError
from dvemb.formats import LayerEntry
from dvemb.layers import LayerAdapter, adapter_type, is_default_layer, make_adapter
from dvemb.optim import DvembWarning, TrackedParameters
from dvemb.projection import LayerProjection

__all__ = ["DEFAULT_PROJ_DIM", "UNTRACKED_WARNING_SHARE", "LayerSet", "ProjDim", "uncompiled"]

#: Default projected size per layer (16 x 16); see BENCHMARKS.md for the overhead it costs.
DEFAULT_PROJ_DIM = 256
#: A layer's projected size: a square int (a budget of numbers), ``(k_out, k_in)``, or None (no projection).
ProjDim = int | tuple[int, int] | None
#: Below this share of trainable parameters tracked, the first step warns (Recorder.untracked_modules).
UNTRACKED_WARNING_SHARE = 0.8


class LayerSet:
    """The recorded modules of a model as adapters, and which adapter owns each weight.

    Args:
        model: the model being trained (a ``torch.compile`` wrapper is looked through for names).
        layers: ``None``, ``"all"`` or module names / glob patterns (``Recorder(layers=...)``).
        proj_dim: a :data:`ProjDim`, or a mapping from layer name (or glob) to one.
        seed: the recorder's seed; the projections' seeds follow from it and the weight's order.

    Attributes:
        adapters: one per recorded module, in module order (tied partners included).
        owner: per adapter, the index of the adapter that owns its weight (itself unless tied to an earlier one).
        budgets: per adapter, the numbers per row an int ``proj_dim`` allows (None: explicit sizes or none).
        layers: the adapters written to the log, one per weight (a tied partner adds its rows to its owner's).
        tracked_parameters: parameters of the recorded weights (and biases), tied weights counted once.
        total_parameters: the model's trainable parameters.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | str | None, proj_dim: Any, seed: int) -> None:
        self.model = model
        self.adapters, self.owner = _make_adapters(model, layers, proj_dim, seed)
        # An int proj_dim is a budget of numbers per layer: fitted bases split it between the sides by their spectra.
        self.budgets = [_budget(_proj_spec_for(a.name, proj_dim)) for a in self.adapters]
        self.layers = [a for i, a in enumerate(self.adapters) if self.owner[i] == i]
        self.tracked_parameters = sum(a.parameter_count() for a in self.layers)
        self.total_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # -- what is recorded -------------------------------------------------------------------------

    def partners(self, adapter: LayerAdapter) -> list[str]:
        """Names of the modules tied to ``adapter``'s weight and recorded with it."""
        owner = self.adapters.index(adapter)
        return [a.name for i, a in enumerate(self.adapters) if self.owner[i] == owner and i != owner]

    def entry(self, adapter: LayerAdapter) -> LayerEntry:
        """The manifest's description of a logged layer (docs/format.md, ``layers[]``)."""
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
            tied=tuple(self.partners(adapter)),
        )

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

    def untracked_modules(self) -> list[tuple[str, str, int]]:
        """Modules holding trainable parameters that are not recorded: ``(name, type, parameters)``, largest first."""
        recorded = {id(a.module) for a in self.adapters}
        found = []
        for name, module in uncompiled(self.model).named_modules():
            count = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
            if count and id(module) not in recorded:
                found.append((name or "(the model itself)", type(module).__name__, count))
        return sorted(found, key=lambda item: -item[2])

    def warn_if_untracked(self) -> None:
        """Below 80% of the trainable parameters tracked, scores miss most of the model: say so, and what helps.

        Called by ``Recorder.step`` itself: the warning's ``stacklevel`` (this method, ``Recorder.step``,
        contextlib's ``__enter__``) points at the user's ``with rec.step(...)`` line.
        """
        if self.tracked_fraction >= UNTRACKED_WARNING_SHARE:
            return
        largest = self.untracked_modules()[:3]
        named = ", ".join(f"{name} ({kind}, {count:,} parameters)" for name, kind, count in largest)
        modules = dict(uncompiled(self.model).named_modules())
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

    # -- rows and bases ---------------------------------------------------------------------------

    def merged(self, rows: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-adapter rows (by adapter index; (B, d) or (B, R, d)) as per logged layer: a tied partner's rows
        are added to its owner's, in the same coordinates."""
        out: dict[str, torch.Tensor] = {}
        for index, part in rows.items():
            name = self.adapters[self.owner[index]].name
            out[name] = part if name not in out else out[name] + part
        return out

    def fittable(self) -> list[bool]:
        """Per adapter: its weight is projected, so its bases are fitted (every supported kind; a tied weight's
        modules, GPT-2's embedding and LM head, share one basis fitted on both paths' factors)."""
        return [not self.adapters[self.owner[i]].projection.is_identity for i in range(len(self.adapters))]

    def covariances(self, fitted: Sequence[bool]) -> dict[int, FactorCovariance]:
        """Empty factor covariances of the fitted weights, by the index of the adapter that owns the weight."""
        owners = sorted({self.owner[i] for i, fit in enumerate(fitted) if fit})
        shapes = {i: (self.adapters[i].projection.out_dim, self.adapters[i].projection.in_dim) for i in owners}
        return {i: FactorCovariance(*shape) for i, shape in shapes.items()}

    def tracked(self) -> list[TrackedParameters]:
        """The logged layers' parameters as the optimizer's hooks see them, in the manifest's order."""
        return [_tracked(adapter) for adapter in self.layers]


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its layers' names without the ``_orig_mod.`` prefix, as the user knows
    them), or ``model`` itself. Hooks on the wrapped modules run in the compiled model (tested)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def _make_adapters(
    model: nn.Module, layers: Sequence[str] | str | None, proj_dim: Any, seed: int
) -> tuple[list[LayerAdapter], list[int]]:
    """The adapters of the recorded modules, and for each the index of the adapter that owns its weight."""
    named = [(n, m) for n, m in uncompiled(model).named_modules() if n]
    chosen = _chosen_modules(named, layers)
    for name, module in chosen:
        if adapter_type(module) is None:
            make_adapter(name, module, LayerProjection(1, 1, 1, 1, 0, 0))  # raises the ConfigError naming it
    chosen = _with_tied_partners(named, [(n, m) for n, m in chosen if _trainable(m)])
    if not chosen:
        raise ConfigError(
            "no trainable layer to record; pass layers=[...] with names of Linear, Conv1D, Conv2d or Embedding modules"
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
        # Two seeds per weight, in module order: the seeds depend on the weights recorded, not on tied partners.
        base = seed * 100_003 + 2 * len(owner_of_weight) - 2
        projection = LayerProjection(shape[0], shape[1], k_out, k_in, seed_out=base, seed_in=base + 1)
        adapters.append(make_adapter(name, module, projection))
        owner.append(first)
    return adapters, owner


def _resolve_proj_dim(spec: ProjDim, out_dim: int, in_dim: int, name: str) -> tuple[int, int]:
    """``(k_out, k_in)`` of a layer with an (out_dim, in_dim) gradient under ``spec``."""
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


def _budget(spec: ProjDim) -> int | None:
    """The numbers per projected gradient an int ``proj_dim`` allows (None: explicit sizes or no projection)."""
    return spec if isinstance(spec, int) and not isinstance(spec, bool) else None


def _proj_spec_for(name: str, proj_dim: Any) -> ProjDim:
    """A layer's ``proj_dim``: the first pattern of a mapping that matches its name, else the default."""
    if not isinstance(proj_dim, Mapping):
        return proj_dim  # type: ignore[no-any-return]
    for pattern, spec in proj_dim.items():
        if fnmatch.fnmatchcase(name, pattern):
            return spec  # type: ignore[no-any-return]
    return DEFAULT_PROJ_DIM


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
