"""Training phases found from the data, as in the paper's phase figure.

The per-step influence divided by the learning rate typically shows a brief high-impact start,
a long low-impact basin and a late ascent. We fit the log-magnitude of the (downsampled,
smoothed) curve with three constant segments by exhaustive least squares over both boundaries,
so the boundaries come from the data, not from fixed fractions of training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dvemb import formats

__all__ = ["PhaseSummary", "downsample", "find_phases"]

PHASE_NAMES = formats.PHASE_NAMES


@dataclass(frozen=True)
class PhaseSummary:
    """Boundaries and shares of the three phases.

    Attributes:
        boundaries: [first step of basin, first step of late phase].
        ranges: per phase, [first step, last step] (inclusive).
        share_abs: per phase, its share of the total absolute influence (sum |score| over rows).
        share_abs_per_lr: the same for the influence divided by the learning rate.
        mean_per_lr: per phase, the mean per-learning-rate influence of its steps.
    """

    boundaries: list[int]
    ranges: dict[str, list[int]]
    share_abs: dict[str, float]
    share_abs_per_lr: dict[str, float]
    mean_per_lr: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def downsample(values: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """Average consecutive values into at most ``points`` bins.

    Returns:
        (bin start indices, bin means), both (min(points, T),).
    """
    n = len(values)
    if n <= points:
        return np.arange(n), values.astype(np.float64)
    edges = np.linspace(0, n, points + 1).astype(np.int64)
    sums = np.add.reduceat(values.astype(np.float64), edges[:-1])
    return edges[:-1], sums / np.diff(edges)


def _three_segments(y: np.ndarray) -> tuple[int, int]:
    """Boundaries (a, b) minimising the squared error of a 3-piece constant fit, each piece at least 5% long.

    The minimum length keeps noise spikes from being fitted as one- or two-step phases.
    """
    n = len(y)
    c1 = np.concatenate([[0.0], np.cumsum(y)])
    c2 = np.concatenate([[0.0], np.cumsum(y * y)])

    def sse(i: np.ndarray, j: np.ndarray) -> np.ndarray:  # error of segment [i, j)
        count = (j - i).astype(np.float64)
        s = c1[j] - c1[i]
        return np.asarray(c2[j] - c2[i] - s * s / count)

    least = max(1, n // 20)
    a, b = np.meshgrid(np.arange(1, n - 1), np.arange(2, n), indexing="ij")
    valid = (a >= least) & (b - a >= least) & (n - b >= least)
    total = np.where(
        valid, sse(np.zeros_like(a), a) + sse(a, np.where(valid, b, a + 1)) + sse(b, np.full_like(b, n)), np.inf
    )
    flat = int(np.argmin(total))
    return int(a.flat[flat]), int(b.flat[flat])


def find_phases(per_lr: np.ndarray, abs_sum: np.ndarray, lr: np.ndarray, *, points: int = 400) -> PhaseSummary:
    """Find the early, basin and late phases of a run.

    Args:
        per_lr: (T,) mean influence of each step's batch divided by the step's learning rate.
        abs_sum: (T,) sum over the step's rows of |influence|.
        lr: (T,) learning rate of each step (steps with rate 0 carry no influence).
        points: resolution of the fit (the curve is averaged into at most this many bins).

    Returns:
        The phase summary; with fewer than 3 steps every step is in the early phase.
    """
    steps = len(per_lr)
    if steps < 3:
        bounds = [steps, steps]
    else:
        starts, binned = downsample(np.abs(np.nan_to_num(per_lr)), points)
        window = max(1, len(binned) // 50)
        smooth = np.convolve(binned, np.ones(window) / window, mode="same")
        log_mag = np.log(smooth + max(float(smooth.max()), 1e-300) * 1e-6)
        a, b = _three_segments(log_mag) if len(log_mag) >= 3 else (1, 2)
        bounds = [int(starts[a]), int(starts[b])]
    edges = [0, *bounds, steps]
    per_lr_abs = np.abs(np.nan_to_num(abs_sum / np.where(lr > 0, lr, np.inf)))
    total_abs, total_per_lr = float(abs_sum.sum()) or 1.0, float(per_lr_abs.sum()) or 1.0
    ranges, share, share_lr, mean = {}, {}, {}, {}
    for name, lo, hi in zip(PHASE_NAMES, edges[:-1], edges[1:], strict=True):
        ranges[name] = [lo, hi - 1]
        share[name] = float(abs_sum[lo:hi].sum()) / total_abs
        share_lr[name] = float(per_lr_abs[lo:hi].sum()) / total_per_lr
        mean[name] = float(np.nan_to_num(per_lr[lo:hi]).mean()) if hi > lo else 0.0
    return PhaseSummary(bounds, ranges, share, share_lr, mean)
