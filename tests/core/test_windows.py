"""Top examples per window of training (dvemb.engine.windows) against a naive numpy reference: every
window's rows sorted whole, for every query and the set mean, whatever the chunking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dvemb.engine.windows import MAX_EPOCH_WINDOWS, Window, standard_windows, window_topk


def naive_topk(
    scores: np.ndarray, steps: np.ndarray, epochs: np.ndarray, window: Window, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every occurrence of the window sorted whole: (values, rows), each (2, Q + 1, k), NaN/-1 padded."""
    full = np.concatenate([scores.astype(np.float64), scores.astype(np.float64).mean(1, keepdims=True)], 1)
    inside = (steps >= window.step_min) & (steps <= window.step_max)
    if window.epoch is not None:
        inside &= epochs == window.epoch
    rows = np.flatnonzero(inside)
    values = np.full((2, full.shape[1], k), np.nan)
    chosen = np.full((2, full.shape[1], k), -1)
    for c in range(full.shape[1]):
        for kind, sign in ((0, -1.0), (1, 1.0)):
            order = rows[np.lexsort((rows, sign * full[rows, c]))][:k]  # by score, then by row
            values[kind, c, : len(order)] = full[order, c]
            chosen[kind, c, : len(order)] = order
    return values, chosen


def synthetic_run(
    steps: int = 50, batch: int = 7, queries: int = 5, epochs: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    row_step = np.repeat(np.arange(steps), batch)
    epoch = rng.integers(0, epochs, size=len(row_step))
    scores = rng.standard_normal((len(row_step), queries)).astype(np.float32)
    scores[row_step >= steps - 5] *= 100  # the overall top-k all comes from the last steps, as on real runs
    return scores, row_step, epoch


@pytest.mark.parametrize("chunk_rows", [1, 13, 64, None])
def test_window_topk_equals_the_naive_reference(chunk_rows: int | None, tmp_path: Path) -> None:
    scores, row_step, epoch = synthetic_run()
    np.save(tmp_path / "scores.npy", scores)
    mapped = np.load(tmp_path / "scores.npy", mmap_mode="r")
    windows = [*standard_windows(50, [4, 30], 3), Window("range", "steps 7-8", 7, 8), Window("range", "one", 3, 3, 1)]
    k = 9
    top = window_topk(mapped, row_step, epoch, windows, k, chunk_rows=chunk_rows)
    for w, window in enumerate(windows):
        values, rows = naive_topk(scores, row_step, epoch, window, k)
        np.testing.assert_array_equal(top.rows[w], rows, err_msg=window.name)
        np.testing.assert_allclose(top.values[w], values, rtol=1e-12, atol=0, equal_nan=True)
        assert top.occurrences[w] == np.count_nonzero(
            (row_step >= window.step_min)
            & (row_step <= window.step_max)
            & ((epoch == window.epoch) if window.epoch is not None else True)
        )


def test_early_windows_are_full_where_the_overall_top_k_has_none() -> None:
    scores, row_step, epoch = synthetic_run()
    early = Window("phase", "early", 0, 3)
    overall, windowed = window_topk(scores, row_step, epoch, [Window("range", "all", 0, 49), early], 10).rows
    assert (row_step[overall[overall >= 0]] >= 4).all()  # filtering the overall top: empty
    assert (windowed >= 0).all() and (row_step[windowed] <= 3).all()  # the early window's own top: 10 rows each


def test_a_window_smaller_than_k_is_padded() -> None:
    scores, row_step, epoch = synthetic_run(batch=3)
    top = window_topk(scores, row_step, epoch, [Window("range", "steps 2-2", 2, 2)], 5)
    assert (top.rows[0, :, :, :3] >= 0).all() and (top.rows[0, :, :, 3:] == -1).all()
    assert np.isnan(top.values[0, :, :, 3:]).all() and top.occurrences.tolist() == [3]


def test_equal_scores_are_ranked_earlier_row_first() -> None:
    scores = np.ones((12, 2), dtype=np.float32)
    top = window_topk(
        scores, np.arange(12), np.zeros(12, dtype=np.int64), [Window("range", "all", 0, 11)], 4, chunk_rows=3
    )
    assert top.rows[0, 0, 0].tolist() == [0, 1, 2, 3] and top.rows[0, 1, 2].tolist() == [0, 1, 2, 3]


def test_standard_windows() -> None:
    windows = standard_windows(100, [10, 70], 2)
    assert [(w.name, w.step_min, w.step_max) for w in windows[:3]] == [
        ("early", 0, 9),
        ("basin", 10, 69),
        ("late", 70, 99),
    ]
    tenths = [w for w in windows if w.kind == "tenth"]
    assert [(w.step_min, w.step_max) for w in tenths][:2] == [(0, 9), (10, 19)] and len(tenths) == 10
    assert [(w.name, w.epoch) for w in windows if w.kind == "epoch"] == [("epoch 0", 0), ("epoch 1", 1)]
    short = standard_windows(4, [1, 1], 1)  # an empty basin and fewer steps than tenths: no empty window
    assert [w.name for w in short if w.kind == "phase"] == ["early", "late"]
    assert all(w.step_max >= w.step_min for w in short) and len([w for w in short if w.kind == "tenth"]) == 4
    assert not [w for w in standard_windows(10, [2, 5], MAX_EPOCH_WINDOWS + 1) if w.kind == "epoch"]


@pytest.mark.parametrize("chunk_rows", [5, 40, None])
def test_many_equal_scores_are_ranked_as_the_reference(chunk_rows: int | None) -> None:
    scores, row_step, epoch = synthetic_run(seed=3)
    scores = np.round(scores / 50).astype(np.float32)  # a handful of distinct values: ties everywhere
    windows = standard_windows(50, [4, 30], 3)
    top = window_topk(scores, row_step, epoch, windows, 9, chunk_rows=chunk_rows)
    for w, window in enumerate(windows):
        values, rows = naive_topk(scores, row_step, epoch, window, 9)
        np.testing.assert_array_equal(top.rows[w], rows, err_msg=window.name)
        np.testing.assert_array_equal(top.values[w], values)
