"""When to run data selection (server/selection.py): the fewest-bins windows against brute force over every
subset of bins, and the early+late rule read from the phase summary."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from server.selection import fewest_bins, selection_timing


def brute_force(weights: np.ndarray, share: float, max_windows: int) -> int:
    """The fewest bins of any subset made of at most max_windows runs that carries the share."""
    need = share * weights.sum() * (1 - 1e-12)
    best = len(weights) + 1
    for mask in itertools.product([0, 1], repeat=len(weights)):
        chosen = np.array(mask, dtype=bool)
        runs = int(np.count_nonzero(np.diff(np.concatenate([[0], chosen.astype(int)])) == 1))
        if runs <= max_windows and weights[chosen].sum() >= need:
            best = min(best, int(chosen.sum()))
    return best


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("max_windows", [1, 2, 3])
def test_fewest_bins_equals_brute_force(seed: int, max_windows: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.exponential(size=11) ** 3  # heavy-tailed, as per-step influence is
    share = float(rng.uniform(0.3, 0.99))
    windows = fewest_bins(weights, share, max_windows)
    taken = np.zeros(len(weights), dtype=bool)
    for first, last in windows:
        assert first <= last
        taken[first : last + 1] = True
    assert len(windows) <= max_windows
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(windows))  # separate runs, in order
    assert weights[taken].sum() >= share * weights.sum() * (1 - 1e-12)
    assert taken.sum() == brute_force(weights, share, max_windows)


def test_paper_shaped_curve_picks_the_early_and_late_steps() -> None:
    steps = np.arange(100)
    weights = np.where(steps < 5, 10.0, np.where(steps >= 80, 3.0, 0.1))
    assert fewest_bins(weights, 0.93, 2) == [(0, 4), (80, 99)]  # 50 + 60 of 117.5
    assert fewest_bins(weights, 0.9, 2) == [(0, 4), (81, 99)]  # one late step fewer is enough
    assert fewest_bins(weights, 0.4, 2) == [(0, 4)]
    assert fewest_bins(np.zeros(5), 0.9, 2) == []


def test_selection_timing_reports_the_rule_and_the_best_windows() -> None:
    first = np.arange(0, 100, 2)  # 50 bins of two steps
    weights = np.where(first < 6, 10.0, np.where(first >= 80, 3.0, 0.1))
    phases = {
        "ranges": {"early": [0, 9], "basin": [10, 69], "late": [70, 99]},
        "share_abs_per_lr": {"early": 0.5, "basin": 0.1, "late": 0.4},
        "share_abs": {"early": 0.7, "basin": 0.2, "late": 0.1},
    }
    got = selection_timing(first, first + 1, weights, phases, share=0.9, max_windows=2, measure="per_lr")
    assert [(w["first"], w["last"]) for w in got["fewest_steps"]["windows"]] == [(0, 5), (80, 99)]
    assert got["fewest_steps"]["share_of_steps"] == pytest.approx(0.26)
    assert got["fewest_steps"]["share_of_influence"] == pytest.approx(60 / weights.sum())
    assert got["early_late"]["share_of_steps"] == pytest.approx(0.4)
    assert got["early_late"]["share_of_influence"] == pytest.approx(0.9)
    assert got["early_only"]["share_of_influence"] == pytest.approx(0.5)
    assert got["resolution_steps"] == 2 and got["steps"] == 100
    assert got["recommendation"].startswith("Select data in steps 0–5 and 80–99: 26% of the steps carry")
    raw = selection_timing(first, first + 1, weights, phases, share=0.9, max_windows=2, measure="raw")
    assert raw["early_late"]["share_of_influence"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="measure"):
        selection_timing(first, first + 1, weights, phases, share=0.9, max_windows=2, measure="lr")
