"""What a computation's scores approximate beyond first order, said in the results (issue 20: no silent
approximation).

:func:`approximations` reads a gradient log's manifest (a plain dict, every field with a default: older logs
lack newer fields) and the computation's resolved settings, and lists every approximation the user can change,
as :class:`dvemb.formats.Approximation` values ``(kind, label, detail)``, the largest loss against exact
retraining first. The kinds (stable keys; BENCHMARKS.md measures each):

- ``sgd-proxy``: influence follows plain SGD (learning rate times gradient) whatever the optimizer did.
- ``curvature-empirical``: the curvature is the gradients' own outer products (the paper's), much less
  faithful than Gauss-Newton.
- ``random-projection``: a projected layer uses a random (seeded) basis instead of a fitted one, on both
  sides or on a side too large to fit (``MAX_FITTED_SIDE``).
- ``untracked-parameters``: under 80% of the trainable parameters are tracked (``tracked_parameters /
  total_parameters``); influence through the others is not counted.
- ``curvature-sampled``: Gauss-Newton factors from fewer rows than classes (the most probable classes and a
  label drawn from the others; labels sampled from the prediction in logs before it), not every class.
- ``second-moment-dropped``: under Adam or AdamW, how removing an example changes the second moment is not
  modelled (in projected layers whose log does not carry it: over ``LIFTED_SECOND_MOMENT_MAX`` coordinates
  without the recorder's singular pairs, or in a segmented computation; anywhere with ``second_moment=False``).
- ``per-layer-blocks``: one curvature block per layer: the curvature between layers is ignored.

First order itself (the linearisation of the leave-one-out change) is the method, not an option: not listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dvemb.calibration import MAX_FITTED_SIDE
from dvemb.curvature import ESTIMATOR
from dvemb.engine import optimizer_maps
from dvemb.engine.optimizer_maps import LIFT_STATE_MAX, LIFTED, lift_plan, lift_ratio
from dvemb.formats import Approximation
from dvemb.optim import LIFTED_SECOND_MOMENT_MAX

__all__ = ["KINDS", "TRACKED_SHARE_MIN", "approximations", "tracked_share"]

#: Every kind :func:`approximations` can list, in the order it lists them.
KINDS = (
    "sgd-proxy",
    "curvature-empirical",
    "random-projection",
    "untracked-parameters",
    "curvature-sampled",
    "second-moment-dropped",
    "per-layer-blocks",
)
#: Below this share of the trainable parameters tracked, the untracked ones are listed as an approximation.
TRACKED_SHARE_MIN = 0.8


def tracked_share(manifest: Mapping[str, Any]) -> float | None:
    """Share of the trainable parameters whose gradients the log records; None when the log does not say."""
    tracked, total = manifest.get("tracked_parameters"), manifest.get("total_parameters")
    if not isinstance(tracked, int) or not isinstance(total, int) or total <= 0 or tracked < 0:
        return None
    return tracked / total


def approximations(
    manifest: Mapping[str, Any],
    *,
    curvature: str,
    propagation: str,
    blocks: str,
    second_moment: bool = True,
    proxy_note: str | None = None,
    lifted: bool | None = None,
) -> list[Approximation]:
    """The approximations of a computation's scores, largest first (the module's docstring lists the kinds).

    Args:
        manifest: the gradient log's manifest (``GradientLog.manifest``).
        curvature: the curvature mode used, ``"empirical"`` or ``"ggn"``.
        propagation: the propagation used (a key of :data:`dvemb.optim.PROPAGATIONS`).
        blocks: the block structure used, ``"layer"`` or ``"full"`` (resolved).
        second_moment: the computation's ``second_moment`` option.
        proxy_note: why the SGD proxy is used (the summary's ``note``), if it is.
        lifted: the computation's ``second_moment_lifted`` (None: the default choice, ``LIFT_AUTO_RATIO``;
            False also for a segmented computation, which does not carry it).
    """
    layers = [layer for layer in manifest.get("layers") or [] if isinstance(layer, Mapping)]
    found = [
        _proxy(propagation, proxy_note),
        _empirical(curvature, manifest),
        _random_projection(layers),
        _untracked(manifest),
        _sampled(curvature, manifest),
        _second_moment(propagation, second_moment, layers, manifest, lifted, blocks),
        _per_layer(blocks, layers),
    ]
    return [a for a in found if a is not None]


def _projected_sides(layer: Mapping[str, Any]) -> list[int]:
    """Dimensions of the layer's sides kept at fewer dimensions than they have (a size not given: kept whole)."""
    sides = [(_int(layer.get("out_dim"), 0), layer.get("k_out")), (_int(layer.get("in_dim"), 0), layer.get("k_in"))]
    return [dim for dim, k in sides if _int(k, dim) < dim]


def _projected(layer: Mapping[str, Any]) -> bool:
    """True when a side of the layer is kept at fewer dimensions than it has."""
    return bool(_projected_sides(layer))


def _stored_whole(layer: Mapping[str, Any]) -> bool:
    """True when the layer's gradient is stored in its own coordinates (what Adam's second-moment term needs)."""
    return not _projected(layer) and layer.get("basis", "seeded") != "calibrated"


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _proxy(propagation: str, note: str | None) -> Approximation | None:
    if propagation != "proxy":
        return None
    why = f"{note[0].upper()}{note[1:]}" if note else "Influence follows the SGD proxy: scores are approximate"
    return Approximation(
        "sgd-proxy",
        "SGD proxy for the optimizer",
        f"{why}; it ignores the optimizer's momentum and moments (under momentum 0.21 Spearman against exact "
        "retraining, against 0.70 followed exactly, BENCHMARKS.md): SGD with momentum, Adam and AdamW are followed "
        "exactly with propagation='auto' on a log recorded by this dvemb.",
    )


def _empirical(curvature: str, manifest: Mapping[str, Any]) -> Approximation | None:
    if curvature != "empirical":
        return None
    recorded = (manifest.get("curvature") or {}).get("mode")
    fix = (
        "compute with curvature='ggn' (this log holds the Gauss-Newton factors)"
        if recorded == "ggn"
        else "record with Recorder(curvature='ggn') and compute with curvature='ggn'"
    )
    return Approximation(
        "curvature-empirical",
        "empirical curvature",
        "The curvature is the gradients' own outer products (the paper's choice), the largest loss against exact "
        f"retraining (about 0.4 Spearman, against 0.7 with Gauss-Newton curvature, BENCHMARKS.md): {fix}.",
    )


def _random_projection(layers: list[Mapping[str, Any]]) -> Approximation | None:
    random = [layer for layer in layers if _random_side(layer)]
    if not random:
        return None
    return Approximation(
        "random-projection",
        "random projection",
        f"{len(random)} of {len(layers)} tracked layers are projected onto random (seeded) bases on at least one "
        "side, which keep much less of the curvature signal than fitted ones (a tied embedding / LM head under a "
        "random projection cost 0.39 Spearman against exact retraining on a small GPT-2, BENCHMARKS.md): leave "
        "projection='auto' with calibration_steps > 0 (the recorder fits the bases on the first steps) or call "
        f"rec.calibrate(batches) before training; a side over {MAX_FITTED_SIDE} dimensions is never fitted: "
        "record such a layer with a larger proj_dim or leave it out.",
    )


def _random_side(layer: Mapping[str, Any]) -> bool:
    """True when a projected side of the layer uses its seeded random basis: every projected side of a seeded
    layer, and a projected side too large to fit (over MAX_FITTED_SIDE) of a calibrated one."""
    sides = _projected_sides(layer)
    if layer.get("basis", "seeded") == "seeded":
        return bool(sides)
    return any(dim > MAX_FITTED_SIDE for dim in sides)


def _untracked(manifest: Mapping[str, Any]) -> Approximation | None:
    share = tracked_share(manifest)
    if share is None or share >= TRACKED_SHARE_MIN:
        return None
    percent = f"{100 * share:.2g}%" if share < 0.1 else f"{100 * share:.0f}%"
    return Approximation(
        "untracked-parameters",
        f"{percent} of parameters tracked",
        f"{percent} of trainable parameters are tracked: influence through the others (layers not recorded, "
        "normalisation, embeddings) is not counted; record more of them with Recorder(layers='all') or a list of "
        "layer names.",
    )


def _sampled(curvature: str, manifest: Mapping[str, Any]) -> Approximation | None:
    if curvature != "ggn":
        return None
    info = manifest.get("curvature") or {}
    samples = _int(info.get("samples"), 0)
    mse = info.get("loss") == "mse"
    if samples < 1:
        # Without a sample count the recorder samples one row per example where it cannot take every class (more
        # than 32, or a sequence); every class is at least two rows. A mean-squared-error log with one row per
        # example is ambiguous (one output, exact; or over 32 outputs, sampled) and not listed.
        if mse or info.get("rows_per_example") != 1:
            return None
        samples = 1
    fix = "record with a larger curvature_samples (Recorder(curvature_samples=...)) to reduce the noise."
    rows = _int(info.get("rows_per_example"), 0)
    if not mse and info.get("estimator") == ESTIMATOR and 0 < rows < samples:
        return None  # capped at the classes: every class's row is there (exact)
    if not mse and info.get("estimator") == ESTIMATOR:
        kept = "" if samples == 1 else f"the {samples - 1} most probable classes' rows and "
        return Approximation(
            "curvature-sampled",
            f"{samples} curvature row{'s' if samples > 1 else ''} per example instead of every class",
            f"The Gauss-Newton curvature uses {kept}one row of a label drawn from the "
            f"{'other ' if samples > 1 else ''}classes (by the model's own prediction) per example instead of every "
            f"class's row, an unbiased but noisy estimate: {fix}",
        )
    if mse:
        what, instead = ("random direction" if samples == 1 else "random directions"), "every output"
    else:
        what = "label" if samples == 1 else "labels"
        instead = "every class"
    return Approximation(
        "curvature-sampled",
        f"{samples} sampled {what} in the curvature",
        f"The Gauss-Newton curvature uses {samples} {what} per example sampled from the model's prediction "
        f"instead of {instead}, an unbiased but noisy estimate: {fix}",
    )


def _second_moment(
    propagation: str,
    second_moment: bool,
    layers: list[Mapping[str, Any]],
    manifest: Mapping[str, Any],
    lifted: bool | None,
    blocks: str,
) -> Approximation | None:
    if propagation not in ("adam", "adamw"):
        return None
    if not second_moment:
        return Approximation(
            "second-moment-dropped",
            "Adam's second moment not modelled",
            "second_moment=False was asked for: how removing an example changes Adam's second moment is not "
            "modelled in any layer; compute with second_moment=True (the default) to model it.",
        )
    projected = [i for i, layer in enumerate(layers) if not _stored_whole(layer)]
    plan = _lift_plan(layers, blocks, lifted is None) if lifted is not False else [0] * len(layers)
    carried = [layers[i] for i in projected if plan[i]]
    dropped = len(projected) - len(carried)
    if dropped:
        offered = _lift_plan(layers, blocks, False)
        if lifted is False:
            why = "second_moment_lifted=False was asked for, or the computation is segmented (it cannot carry it)"
        elif (
            lifted is None
            and any(offered)
            and lift_ratio(*_lift_inputs(layers, blocks)) > optimizer_maps.LIFT_AUTO_RATIO
        ):
            ratio = lift_ratio(*_lift_inputs(layers, blocks))
            why = (
                f"its states would hold {ratio:.0f}x the recursion's own (the default carries it up to "
                f"{optimizer_maps.LIFT_AUTO_RATIO}x, and its work grows about as much): compute with "
                "second_moment_lifted=True to carry it anyway"
            )
        else:
            why = (
                f"the log carries it for projected layers of at most {LIFTED_SECOND_MOMENT_MAX} coordinates, and "
                f"the computation holds at most {LIFT_STATE_MAX} numbers of its state"
            )
        return Approximation(
            "second-moment-dropped",
            "Adam's second moment dropped",
            f"How removing an example changes Adam's second moment is not modelled in {dropped} projected layer(s) "
            f"of {len(layers)}: {why} (carried, it added 0.05 on the digits MLP and 0.17 on a small GPT-2 to the "
            "Spearman correlation with exact retraining, BENCHMARKS.md).",
        )
    return None


def _lift_plan(layers: list[Mapping[str, Any]], blocks: str, automatic: bool) -> list[int]:
    """The engine's :func:`dvemb.engine.optimizer_maps.lift_plan` for this computation, from the manifest: a layer
    whose log carries both Adam moments whole (``second_moment`` :data:`LIFTED`) offers its own coordinates;
    ``automatic``: the default choice (``LIFT_AUTO_RATIO``)."""
    sizes, widths, own = _lift_inputs(layers, blocks)
    return lift_plan(sizes, widths, own if automatic else None)


def _lift_inputs(layers: list[Mapping[str, Any]], blocks: str) -> tuple[list[int], list[int], int]:
    """Per layer the own size it offers (0: none) and its state width, and the recursion's own state size."""
    sizes = [
        _int(layer.get("out_dim"), 0) * _int(layer.get("in_dim"), 0)
        if not _stored_whole(layer) and layer.get("second_moment") == LIFTED
        else 0
        for layer in layers
    ]
    dims = [_int(layer.get("k_out"), 0) * _int(layer.get("k_in"), 0) for layer in layers]
    if blocks == "full":
        return sizes, [sum(dims)] * len(dims), sum(dims) ** 2
    return sizes, dims, sum(d * d for d in dims)


def _per_layer(blocks: str, layers: list[Mapping[str, Any]]) -> Approximation | None:
    if blocks != "layer" or len(layers) < 2:
        return None
    return Approximation(
        "per-layer-blocks",
        "per-layer curvature blocks",
        "The curvature is kept one block per layer, so the curvature between layers is ignored (blocks='full' "
        "gained 0.1 to 0.15 Spearman against exact retraining, BENCHMARKS.md): compute with blocks='full' when "
        "the projected dimensions add up to a size whose D x D matrix fits in memory and all layers share one "
        "optimizer setting.",
    )
