"""The dashboard's figure builders, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from server.figures import (
    compare_curves_figure,
    compare_shares_figure,
    distribution_figure,
    moving_average,
    phase_figure,
)

CURVE = {
    "step": [0, 10, 20, 30, 40],
    "mean": [5.0, 1.0, 0.5, 1.5, 4.0],
    "mean_per_lr": [50.0, 10.0, 5.0, 15.0, 80.0],
    "lr": [0.1, 0.1, 0.1, 0.1, 0.05],
    "loss": [2.0, 1.5, 1.2, 1.0, 0.9],
}
PHASES = {
    "ranges": {"early": [0, 9], "basin": [10, 29], "late": [30, 49]},
    "share_abs_per_lr": {"early": 0.3, "basin": 0.2, "late": 0.5},
    "share_abs": {"early": 0.4, "basin": 0.3, "late": 0.3},
}


def test_phase_figure_per_lr_view() -> None:
    figure = phase_figure(CURVE, PHASES, view="per_lr", smooth=3, title="val")
    names = [t["name"] for t in figure["data"]]
    assert names == ["per step", "smoothed (3 points)", "learning rate", "training loss"]
    assert figure["data"][0]["y"] == CURVE["mean_per_lr"] and figure["data"][0]["x"] == CURVE["step"]
    assert figure["data"][2]["yaxis"] == "y2" and figure["data"][3]["yaxis"] == "y3"
    layout = figure["layout"]
    assert layout["xaxis"]["title"]["text"] == "training step"
    assert layout["yaxis"]["title"]["text"] == "mean influence of the step's batch / learning rate"
    assert layout["yaxis2"]["title"]["text"] == "learning rate"
    shapes = [s for s in layout["shapes"] if s["name"].startswith("phase:")]
    assert [(s["name"], s["x0"], s["x1"]) for s in shapes] == [
        ("phase:early", 0, 10),
        ("phase:basin", 10, 30),
        ("phase:late", 30, 50),
    ]
    assert [a["text"] for a in layout["annotations"]] == [
        "early: 30% of |influence / lr|",  # the per-lr view's shares are shares of |influence / lr|
        "basin: 20% of |influence / lr|",
        "late: 50% of |influence / lr|",
    ]
    # learning rate and loss are never negative: their axes start at zero
    assert layout["yaxis2"]["rangemode"] == "tozero" and layout["yaxis3"]["rangemode"] == "tozero"
    assert layout["hovermode"] == "x unified"  # one hover box: influence, lr and loss of one step
    # the title sits at the top of the figure, the phase labels under it in the margin
    assert layout["title"]["yref"] == "container" and layout["title"]["yanchor"] == "top"
    assert layout["margin"]["t"] >= 90


def test_phase_figure_raw_view_without_loss_or_smoothing() -> None:
    curve = {**CURVE, "loss": [None] * 5}
    figure = phase_figure(curve, PHASES, view="raw")
    assert [t["name"] for t in figure["data"]] == ["per step", "learning rate"]
    assert figure["data"][0]["y"] == CURVE["mean"]
    assert figure["layout"]["yaxis"]["title"]["text"] == "mean influence of the step's batch"
    assert figure["layout"]["annotations"][0]["text"] == "early: 40% of |influence|"
    assert figure["layout"]["yaxis2"]["rangemode"] == "tozero"
    with pytest.raises(ValueError, match="view"):
        phase_figure(curve, PHASES, view="log")


def test_moving_average_skips_missing_values() -> None:
    assert moving_average([1.0, None, 3.0, 5.0], 3) == [1.0, 2.0, 4.0, 4.0]
    assert moving_average([None, None], 3) == [None, None]
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]


def test_distribution_figure() -> None:
    figure = distribution_figure({"early": [1.0, 2.0], "basin": [0.1], "late": []}, title="t")
    assert [(t["type"], t["name"], t["y"]) for t in figure["data"]] == [
        ("box", "early", [1.0, 2.0]),
        ("box", "basin", [0.1]),
        ("box", "late", []),
    ]
    assert figure["layout"]["xaxis"]["title"]["text"] == "training phase"


def test_the_distribution_axis_spans_the_whiskers_not_the_extremes() -> None:
    """Heavy-tailed scores (issue 24.6): two extreme occurrences no longer squash every box flat."""
    rng = np.random.default_rng(0)
    body = rng.normal(0.0, 1e-4, 500).tolist()
    figure = distribution_figure({"early": [*body[:250], 5.0], "basin": body[250:450], "late": [*body[450:], -3.0]})
    low, high = figure["layout"]["yaxis"]["range"]
    assert -1e-3 < low < -2e-4 and 2e-4 < high < 1e-3  # about the whiskers of N(0, 1e-4), padded
    assert 2 <= figure["beyond"] <= 10 and figure["drawn"] == 502  # 5.0, -3.0 and a few beyond the whiskers
    assert distribution_figure({"early": [], "basin": [], "late": []})["layout"]["yaxis"].get("range") is None


def test_compare_curves_figure_normalises_progress() -> None:
    runs = [
        {"label": "a", "steps": 50, **CURVE},
        {"label": "b", "steps": 4, "step": [0, 2], "mean": [1.0, 2.0], "mean_per_lr": [3.0, 4.0]},
    ]
    figure = compare_curves_figure(runs, view="per_lr")
    assert [t["name"] for t in figure["data"]] == ["a", "b"]
    assert figure["data"][0]["x"] == [0.0, 20.0, 40.0, 60.0, 80.0]
    assert figure["data"][1]["x"] == [0.0, 50.0] and figure["data"][1]["y"] == [3.0, 4.0]
    assert figure["data"][1]["customdata"] == [0, 2]  # the hover names each run's own step
    raw = compare_curves_figure(runs, view="raw", smooth=3)
    assert raw["data"][1]["y"] == [1.5, 1.5]
    with pytest.raises(ValueError, match="view"):
        compare_curves_figure(runs, view="log")


def test_compare_shares_figure_groups_phases() -> None:
    other = {"share_abs_per_lr": {"early": 0.6, "basin": 0.1, "late": 0.3}, "share_abs": {}}
    figure = compare_shares_figure([{"label": "a", "phases": PHASES}, {"label": "b", "phases": other}])
    assert figure["layout"]["barmode"] == "group"
    assert [(t["name"], t["x"], t["y"]) for t in figure["data"]] == [
        ("a", ["early", "basin", "late"], [0.3, 0.2, 0.5]),
        ("b", ["early", "basin", "late"], [0.6, 0.1, 0.3]),
    ]
    raw = compare_shares_figure([{"label": "b", "phases": other}], view="raw")
    assert raw["data"][0]["y"] == [0.0, 0.0, 0.0]
    assert raw["layout"]["yaxis"]["title"]["text"] == "share of |influence|"
