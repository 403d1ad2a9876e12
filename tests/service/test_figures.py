"""The dashboard's figure builders, as pure functions."""

from __future__ import annotations

import pytest

from server.figures import distribution_figure, moving_average, phase_figure

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
        "early: 30% of |influence|",
        "basin: 20% of |influence|",
        "late: 50% of |influence|",
    ]


def test_phase_figure_raw_view_without_loss_or_smoothing() -> None:
    curve = {**CURVE, "loss": [None] * 5}
    figure = phase_figure(curve, PHASES, view="raw")
    assert [t["name"] for t in figure["data"]] == ["per step", "learning rate"]
    assert figure["data"][0]["y"] == CURVE["mean"]
    assert figure["layout"]["yaxis"]["title"]["text"] == "mean influence of the step's batch"
    assert figure["layout"]["annotations"][0]["text"] == "early: 40% of |influence|"
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
