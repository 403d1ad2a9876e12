"""Fidelity against exact retraining: dvemb beats the plain gradient dot product, ggn beats empirical.

Ground truth: training replayed from each sampled step with the example dropped from that one
batch (bench/fidelity.py). Measured on seeds 0-4 of this configuration (Spearman, mean over test
points): gradient dot 0.12-0.19, empirical 0.35-0.43, ggn 0.62-0.71; the smallest gaps were 0.20
(empirical over dot) and 0.26 (ggn over empirical). The margins below are half of those.

Each test is budgeted in CPU time, not wall time: on a loaded 2-core machine one took 290 s of wall time for
67 s of CPU, past pytest's 300 s timeout. They run on one thread: a second intra-op thread spinning while it
waits for a busy core counts as CPU time too (one went over its budget at a load of 6, and passed alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.fidelity import Setup, correlation, dvemb_scores, ground_truth, measure, sample_pairs, train


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(1800)
@pytest.mark.cpu_budget(300)
def test_dvemb_tracks_exact_leave_one_out(tmp_path: Path) -> None:
    result = measure(Setup(seed=0, steps=80, hidden=16, pairs=100), tmp_path)
    assert result["empirical"] > result["grad_dot"] + 0.10, result
    assert result["ggn"] > result["empirical"] + 0.15, result
    assert result["ggn"] > 0.5, result


@pytest.mark.timeout(1800)
@pytest.mark.cpu_budget(300)
def test_optimizer_exact_propagation_beats_the_sgd_proxy_under_adam(tmp_path: Path) -> None:
    """Under Adam (lr 1e-3, same MLP, no projection, full M, ggn) against exact replay with the optimizer
    state restored. Measured on seeds 0-3: SGD proxy 0.64-0.76, optimizer-exact 0.93-0.95; the
    smallest gap was 0.18. The margins below are half of it, and under the smallest estimate."""
    setup = Setup(seed=0, steps=80, hidden=16, pairs=100, optimizer="adam", lr=0.001)
    traj = train(setup, tmp_path / "log", curvature="ggn")
    pairs = sample_pairs(setup, traj)
    truth = ground_truth(traj, pairs)
    result = {
        propagation: correlation(
            dvemb_scores(
                tmp_path / "log", tmp_path / propagation, pairs, setup, blocks="full", propagation=propagation
            ),
            truth,
            spearman=True,
        )
        for propagation in ("sgd-proxy", "auto")
    }
    assert result["auto"] > result["sgd-proxy"] + 0.09, result
    assert result["auto"] > 0.85, result


@pytest.mark.timeout(1800)
@pytest.mark.cpu_budget(300)
def test_calibrated_projection_beats_the_random_one_at_the_default_size(tmp_path: Path) -> None:
    """Digits MLP with hidden 32 (256 per layer really projects), the engine's default blocks ('auto': the full
    M for this model), against exact replay. Measured (BENCHMARKS.md, "Projection fidelity", seed 0 of this
    configuration): ggn with the random projection 0.46, look-ahead calibrated 0.73 (0.67-0.72 on seeds 1-2);
    the gap was at least 0.20 on every seed. The margin below is half of it; the floor is the issue's 0.6.

    And what a user gets with no options (issue 20): ggn found at the output and bases the recorder fits on the
    first 16 steps it holds, against the earlier defaults (empirical curvature, random projection). Measured
    on seeds 0 and 1: no options 0.73 / 0.71 (the look-ahead recipe 0.73 / 0.69), earlier defaults 0.26 /
    0.30: a gap of at least 0.40, asserted at half of it."""
    base = Setup(seed=0, hidden=32)
    whole = train(base, tmp_path / "whole", curvature="ggn")
    pairs = sample_pairs(base, whole)
    truth = ground_truth(whole, pairs)
    result = {}
    runs = {
        "random": ("random", "ggn"),
        "calibrated": ("calibrated", "ggn"),
        "no-options": ("auto", "ggn"),
        "earlier-defaults": ("random", "empirical"),
    }
    for name, (kind, curvature) in runs.items():
        setup = replace(base, projection=kind, lookahead_steps=base.steps // 10 if kind == "calibrated" else 0)
        train(setup, tmp_path / name, curvature=curvature, proj_dim=256)
        estimate = dvemb_scores(tmp_path / name, tmp_path / f"out-{name}", pairs, setup, curvature=curvature)
        result[name] = correlation(estimate, truth, spearman=True)
    assert result["calibrated"] > result["random"] + 0.10, result
    assert result["calibrated"] > 0.6, result
    assert result["no-options"] > result["earlier-defaults"] + 0.20, result
    assert result["no-options"] > 0.6, result
