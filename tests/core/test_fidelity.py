"""Fidelity against exact retraining: dvemb beats the plain gradient dot product, ggn beats empirical.

Ground truth: training replayed from each sampled step with the example dropped from that one
batch (bench/fidelity.py). Measured on seeds 0-4 of this configuration (Spearman, mean over test
points): gradient dot 0.12-0.19, empirical 0.35-0.43, ggn 0.62-0.71; the smallest gaps were 0.20
(empirical over dot) and 0.26 (ggn over empirical). The margins below are half of those.
"""

from __future__ import annotations

from pathlib import Path

from bench.fidelity import Setup, measure


def test_dvemb_tracks_exact_leave_one_out(tmp_path: Path) -> None:
    result = measure(Setup(seed=0, steps=80, hidden=16, pairs=100), tmp_path)
    assert result["empirical"] > result["grad_dot"] + 0.10, result
    assert result["ggn"] > result["empirical"] + 0.15, result
    assert result["ggn"] > 0.5, result
