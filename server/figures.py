"""Plotly figures of the dashboard, built as plain dicts by pure functions (tested without a browser).

The dashboard fetches them from the REST API and hands them to plotly.js unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dvemb.formats import PHASE_NAMES

PHASE_COLOURS = dict(zip(PHASE_NAMES, ("#d62728", "#7f7f7f", "#1f77b4"), strict=True))
VIEWS = ("per_lr", "raw")


def moving_average(values: Sequence[float | None], window: int) -> list[float | None]:
    """Centred moving average that skips missing values (None where a window holds none)."""
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if window <= 1 or len(array) == 0:
        return [None if np.isnan(v) else float(v) for v in array]
    valid = ~np.isnan(array)
    kernel = np.ones(window)
    start = (window - 1) // 2  # 'full' then centre: 'same' would return max(len, window) values
    sums = np.convolve(np.where(valid, array, 0.0), kernel, mode="full")[start : start + len(array)]
    counts = np.convolve(valid.astype(np.float64), kernel, mode="full")[start : start + len(array)]
    return [float(s / c) if c > 0 else None for s, c in zip(sums, counts, strict=True)]


def phase_figure(
    curve: dict[str, list[Any]], phases: dict[str, Any], *, view: str = "per_lr", smooth: int = 1, title: str = ""
) -> dict[str, Any]:
    """The paper's phase plot: per-step influence of the step's batch, the three phases shaded.

    Args:
        curve: columns ``step``, ``mean``, ``mean_per_lr``, ``lr`` and optionally ``loss`` (downsampled).
        phases: the phase summary (``ranges``, ``share_abs_per_lr``, ``share_abs``).
        view: ``"per_lr"`` (influence divided by the learning rate, the paper's view) or ``"raw"``.
        smooth: moving-average window in points (1: none).
        title: figure title.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}")
    steps = list(curve["step"])
    values = list(curve["mean_per_lr"] if view == "per_lr" else curve["mean"])
    ylabel = (
        "mean influence of the step's batch / learning rate"
        if view == "per_lr"
        else "mean influence of the step's batch"
    )
    traces: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": "per step",
            "x": steps,
            "y": values,
            "marker": {"size": 4, "color": "#444"},
            "hovertemplate": "%{y:.4g}",
        },
    ]
    if smooth > 1:
        traces.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"smoothed ({smooth} points)",
                "x": steps,
                "y": moving_average(values, smooth),
                "line": {"color": "#000", "width": 2},
                "hovertemplate": "%{y:.4g}",
            }
        )
    traces.append(
        {
            "type": "scatter",
            "mode": "lines",
            "name": "learning rate",
            "x": steps,
            "y": list(curve["lr"]),
            "yaxis": "y2",
            "line": {"color": "#2ca02c", "dash": "dot"},
            "hovertemplate": "%{y:.4g}",
        }
    )
    if any(v is not None for v in curve.get("loss", [])):
        traces.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": "training loss",
                "x": steps,
                "y": list(curve["loss"]),
                "yaxis": "y3",
                "line": {"color": "#ff7f0e", "width": 1},
                "hovertemplate": "%{y:.4g}",
            }
        )
    shares = phases.get("share_abs_per_lr" if view == "per_lr" else "share_abs", {})
    measure = "|influence / lr|" if view == "per_lr" else "|influence|"  # what the shares are shares of
    shapes, annotations = [], []
    for position, (name, (first, last)) in enumerate(phases.get("ranges", {}).items()):
        if last < first:
            continue
        shapes.append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "paper",
                "x0": first,
                "x1": last + 1,
                "y0": 0,
                "y1": 1,
                "fillcolor": PHASE_COLOURS.get(name, "#999"),
                "opacity": 0.12,
                "line": {"width": 0},
                "layer": "below",
                "name": f"phase:{name}",
            }
        )
        annotations.append(
            {
                "xref": "x",
                "yref": "paper",
                "x": (first + last + 1) / 2,
                "y": 1.0 + 0.06 * (position % 2),  # staggered: narrow neighbours stay apart
                "yanchor": "bottom",
                "showarrow": False,
                "text": f"{name}: {shares.get(name, 0.0):.0%} of {measure}",
            }
        )
    layout = {
        # The title sits at the top of the figure and the phase labels in the margin under it: apart.
        "title": {"text": title, "y": 1.0, "yref": "container", "yanchor": "top", "pad": {"t": 8}},
        "xaxis": {"title": {"text": "training step"}, "domain": [0, 0.88]},
        "yaxis": {"title": {"text": ylabel}, "zeroline": True},
        # Rates and losses are never negative: the axes start at zero (autorange pads a flat line below it).
        "yaxis2": {
            "title": {"text": "learning rate"},
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "rangemode": "tozero",
        },
        "yaxis3": {
            "title": {"text": "training loss"},
            "overlaying": "y",
            "side": "right",
            "anchor": "free",
            "position": 0.97,
            "showgrid": False,
            "rangemode": "tozero",
        },
        "shapes": shapes,
        "annotations": annotations,
        # One hover box per step: the influence, the learning rate and the loss together.
        "hovermode": "x unified",
        "legend": {"orientation": "h", "y": -0.2},
        "margin": {"t": 100, "r": 90},
    }
    return {"data": traces, "layout": layout}


def whisker_range(values: Sequence[float]) -> tuple[float, float] | None:
    """The span of a box's whiskers (Tukey's): the lowest and highest values within 1.5 interquartile ranges of
    the quartiles; None without values."""
    if not len(values):
        return None
    data = np.asarray(values, dtype=np.float64)
    q1, q3 = np.quantile(data, [0.25, 0.75])
    inside = data[(data >= q1 - 1.5 * (q3 - q1)) & (data <= q3 + 1.5 * (q3 - q1))]
    return float(inside.min()), float(inside.max())


def distribution_figure(scores_by_phase: dict[str, list[float]], *, title: str = "") -> dict[str, Any]:
    """Box plot of per-occurrence scores (query-set mean) by phase. Influence is heavy-tailed: the y axis spans the
    boxes' whiskers (1.5 interquartile ranges), not the few extreme occurrences that would squash every box flat;
    ``beyond`` counts the occurrences outside it (the whiskers drawn to them are cut by the axis)."""
    spans = [s for s in (whisker_range(v) for v in scores_by_phase.values()) if s is not None]
    low, high = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else (0.0, 0.0)
    pad = 0.05 * (high - low) or abs(high) * 0.05 or 1e-12
    axis: dict[str, Any] = {"title": {"text": "influence on the query set (+ helped)"}, "zeroline": True}
    if spans:
        axis["range"] = [low - pad, high + pad]
    beyond = sum(int(((np.asarray(v) < low) | (np.asarray(v) > high)).sum()) for v in scores_by_phase.values())
    traces = [
        {
            "type": "box",
            "name": name,
            "y": values,
            "marker": {"color": PHASE_COLOURS.get(name, "#999")},
            "boxpoints": False,
        }
        for name, values in scores_by_phase.items()
    ]
    layout = {
        "title": {"text": title},
        "yaxis": axis,
        "xaxis": {"title": {"text": "training phase"}},
        "showlegend": False,
    }
    drawn = sum(len(v) for v in scores_by_phase.values())
    return {"data": traces, "layout": layout, "drawn": drawn, "beyond": beyond}


RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def compare_curves_figure(runs: Sequence[dict[str, Any]], *, view: str = "per_lr", smooth: int = 1) -> dict[str, Any]:
    """Several runs' phase curves overlaid, x normalised to the share of training done (0–100%).

    Args:
        runs: per run ``label``, ``steps`` (the run's number of steps) and its curve's columns ``step``,
            ``mean`` and ``mean_per_lr`` (downsampled or not; x is ``100 * step / steps``).
        view: ``"per_lr"`` or ``"raw"``, as in :func:`phase_figure`.
        smooth: moving-average window in points (1: none), applied to each run's curve.
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}")
    traces = []
    for i, run in enumerate(runs):
        values = list(run["mean_per_lr"] if view == "per_lr" else run["mean"])
        steps = max(int(run["steps"]), 1)
        traces.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": str(run["label"]),
                "x": [100.0 * s / steps for s in run["step"]],
                "y": moving_average(values, smooth),
                "customdata": list(run["step"]),
                "line": {"color": RUN_COLOURS[i % len(RUN_COLOURS)], "width": 1.5},
                "hovertemplate": "step %{customdata}: %{y:.4g}",
            }
        )
    ylabel = "mean influence / learning rate" if view == "per_lr" else "mean influence"
    layout = {
        "xaxis": {"title": {"text": "training progress (% of the run's steps)"}, "range": [0, 100]},
        "yaxis": {"title": {"text": ylabel}, "zeroline": True},
        "hovermode": "x unified",
        "legend": {"orientation": "h", "y": -0.2},
        "margin": {"t": 30},
    }
    return {"data": traces, "layout": layout}


def compare_shares_figure(runs: Sequence[dict[str, Any]], *, view: str = "per_lr") -> dict[str, Any]:
    """The runs' phase shares side by side: one group of bars per phase, one bar per run.

    Args:
        runs: per run ``label`` and ``phases`` (the phase summary: ``share_abs_per_lr``, ``share_abs``).
        view: ``"per_lr"`` (shares of |influence / lr|) or ``"raw"`` (of |influence|).
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}")
    key = "share_abs_per_lr" if view == "per_lr" else "share_abs"
    traces = [
        {
            "type": "bar",
            "name": str(run["label"]),
            "x": list(PHASE_NAMES),
            "y": [float(run["phases"].get(key, {}).get(name, 0.0)) for name in PHASE_NAMES],
            "marker": {"color": RUN_COLOURS[i % len(RUN_COLOURS)]},
            "hovertemplate": "%{x}: %{y:.1%}",
        }
        for i, run in enumerate(runs)
    ]
    measure = "|influence / lr|" if view == "per_lr" else "|influence|"
    layout = {
        "barmode": "group",
        "xaxis": {"title": {"text": "training phase"}},
        "yaxis": {"title": {"text": f"share of {measure}"}, "tickformat": ".0%", "rangemode": "tozero"},
        "legend": {"orientation": "h", "y": -0.2},
        "margin": {"t": 30},
    }
    return {"data": traces, "layout": layout}


def dynamics_figure(dynamics: dict[str, Any], *, title: str = "") -> dict[str, Any]:
    """Value dynamics (the paper's Figure 4): one line per tenth of training, the mean influence of its
    occurrences on each later checkpoint.

    Args:
        dynamics: a series of the summary's ``dynamics``: ``checkpoints`` (C,), ``buckets`` (10 x [first, last]
            step), ``mean`` (C x 10, null where nothing of the bucket was trained before the checkpoint).
    """
    checkpoints = list(dynamics["checkpoints"])
    buckets = list(dynamics["buckets"])
    traces = []
    for b, (first, last) in enumerate(buckets):
        values = [row[b] for row in dynamics["mean"]]
        if all(v is None for v in values):
            continue
        shade = int(40 + 180 * b / max(len(buckets) - 1, 1))  # early dark blue to late light orange
        traces.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": f"trained at steps {first}–{last}",
                "x": checkpoints,
                "y": values,
                "line": {"color": f"rgb({shade}, {110 + shade // 4}, {255 - shade})"},
                "hovertemplate": "checkpoint %{x}<br>mean influence %{y:.3g}<extra>%{fullData.name}</extra>",
            }
        )
    layout = {
        "title": {"text": title},
        "xaxis": {"title": {"text": "checkpoint (training step)"}},
        "yaxis": {"title": {"text": "mean influence on the checkpoint's queries (+ helped)"}},
        "legend": {"orientation": "v"},
        "margin": {"t": 60},
    }
    return {"data": traces, "layout": layout}
