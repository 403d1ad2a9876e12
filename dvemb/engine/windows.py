"""Top examples within windows of training: per phase, per tenth of training, per epoch, or any step range.

The engine keeps the overall top-k of the whole run; on a typical run all of it comes from the last steps,
so "what harmed the model early?" cannot be answered by filtering it. This module ranks the occurrences
*inside* each window exactly, from the (R, Q) scores file, reading it in row chunks (bounded memory
whatever R): per window, query and kind, a running top-k is merged with each chunk's own top-k.

Order: helpful rows by score descending, harmful rows by score ascending; equal scores by row (earlier
first) when they meet in a merge (two equal scores inside one chunk are taken in torch.topk's order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dvemb.formats import PHASE_NAMES

__all__ = ["MAX_EPOCH_WINDOWS", "Window", "WindowTop", "standard_windows", "window_topk"]

MAX_EPOCH_WINDOWS = 20  # more epochs than this: per-epoch tables are computed on demand instead
CHUNK_BYTES = 32 << 20  # float64 bytes of one chunk of scores (plus the set mean) held at a time
TENTHS = 10


@dataclass(frozen=True)
class Window:
    """A set of occurrences: steps ``step_min..step_max`` (inclusive), of one epoch or of all (``epoch=None``).

    Attributes:
        kind: ``phase``, ``tenth``, ``epoch`` or ``range`` (any other step range).
        name: what it is called on the page: ``early``, ``tenth 3``, ``epoch 1``, ``steps 10-99``.
    """

    kind: str
    name: str
    step_min: int
    step_max: int
    epoch: int | None = None

    def contains(self, steps: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """(n,) bool: which occurrences (their steps and epochs, (n,) each) fall in the window."""
        inside = (steps >= self.step_min) & (steps <= self.step_max)
        return inside if self.epoch is None else inside & (epochs == self.epoch)


@dataclass
class WindowTop:
    """Top-k of every window, for every query and the query-set mean.

    Attributes:
        values: (W, 2, Q + 1, k) float64 scores; kind 0 = helpful (descending), 1 = harmful (ascending);
            column Q is the mean over the queries. NaN past the window's last occurrence.
        rows: (W, 2, Q + 1, k) int64 occurrence (row) numbers, -1 where ``values`` is NaN.
        occurrences: (W,) number of occurrences in each window.
    """

    values: np.ndarray
    rows: np.ndarray
    occurrences: np.ndarray


def standard_windows(steps: int, boundaries: Sequence[int], epochs: int) -> list[Window]:
    """The windows stored with every job: the three phases, each tenth of training and each epoch.

    Args:
        steps: number of training steps T (steps are numbered 0..T-1).
        boundaries: [first step of the basin, first step of the late phase] (the phase summary's).
        epochs: number of epochs (1 + the largest occurrence number); none are listed above
            :data:`MAX_EPOCH_WINDOWS` or when there is only one (its window is the whole run).

    Returns:
        The windows that hold at least one step, phases first.
    """
    edges = [0, *boundaries, steps]
    windows = [
        Window("phase", name, lo, hi - 1)
        for name, lo, hi in zip(PHASE_NAMES, edges[:-1], edges[1:], strict=True)
        if hi > lo
    ]
    cuts = [t * steps // TENTHS for t in range(TENTHS + 1)]
    windows += [
        Window("tenth", f"tenth {t + 1}", cuts[t], cuts[t + 1] - 1) for t in range(TENTHS) if cuts[t + 1] > cuts[t]
    ]
    if 1 < epochs <= MAX_EPOCH_WINDOWS:
        windows += [Window("epoch", f"epoch {e}", 0, steps - 1, e) for e in range(epochs)]
    return windows


def window_topk(
    scores: np.ndarray,
    row_step: np.ndarray,
    epoch: np.ndarray,
    windows: Sequence[Window],
    k: int,
    *,
    chunk_rows: int | None = None,
) -> WindowTop:
    """Exact top-k helpful and harmful occurrences of each window, for each query and the query-set mean.

    Args:
        scores: (R, Q) score of every occurrence on every query (memory-mapped is fine: read in chunks).
        row_step: (R,) step of each occurrence.
        epoch: (R,) epoch (occurrence number of the example) of each occurrence.
        windows: the windows to rank.
        k: rows kept per window, kind and column.
        chunk_rows: rows read at a time (default: about 32 MiB of float64).

    Returns:
        The :class:`WindowTop`; the set mean of a row is the float64 mean of its Q scores.
    """
    total, queries = scores.shape
    columns = queries + 1
    chunk = chunk_rows or max(1, CHUNK_BYTES // (8 * columns))
    kept = [[_Running(columns, k, largest) for largest in (True, False)] for _ in windows]
    occurrences = np.zeros(len(windows), dtype=np.int64)
    row_step, epoch = np.asarray(row_step), np.asarray(epoch)
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        steps, epochs = row_step[start:stop], epoch[start:stop]
        first, last = int(steps.min()), int(steps.max())
        block: np.ndarray | None = None
        for w, window in enumerate(windows):
            if window.step_max < first or window.step_min > last:
                continue  # the chunk holds none of the window's steps
            inside = np.flatnonzero(window.contains(steps, epochs))
            if not len(inside):
                continue
            if block is None:  # read the chunk once, only when some window needs it
                raw = np.asarray(scores[start:stop], dtype=np.float64)  # (n, Q)
                block = np.concatenate([raw, raw.mean(axis=1, keepdims=True)], axis=1)  # (n, Q + 1)
            occurrences[w] += len(inside)
            candidates = torch.from_numpy(np.ascontiguousarray(block[inside].T))  # (Q + 1, m)
            rows = torch.from_numpy(inside + start)
            for running in kept[w]:
                running.update(candidates, rows)
    values = np.full((len(windows), 2, columns, k), np.nan)
    row_ids = np.full((len(windows), 2, columns, k), -1, dtype=np.int64)
    for w, pair in enumerate(kept):
        for kind, running in enumerate(pair):
            n = running.values.shape[1]
            values[w, kind, :, :n] = running.values.numpy()
            row_ids[w, kind, :, :n] = running.rows.numpy()
    return WindowTop(values=values, rows=row_ids, occurrences=occurrences)


class _Running:
    """The k best (values, rows) per column so far; a chunk is first cut to its own k best per column."""

    def __init__(self, columns: int, k: int, largest: bool) -> None:
        self.k, self.largest = k, largest
        self.values = torch.zeros((columns, 0), dtype=torch.float64)
        self.rows = torch.zeros((columns, 0), dtype=torch.int64)

    def update(self, candidates: torch.Tensor, rows: torch.Tensor) -> None:
        """Merge (C, m) candidate scores of the (m,) ascending rows."""
        keep = min(self.k, candidates.shape[1])
        top = torch.topk(candidates, keep, dim=1, largest=self.largest, sorted=False)
        values = torch.cat([self.values, top.values], dim=1)
        index = torch.cat([self.rows, rows[top.indices]], dim=1)
        # Sort by row, then stably by score: equal scores stay in row order, earlier first.
        by_row = torch.argsort(index, dim=1, stable=True)
        values, index = values.gather(1, by_row), index.gather(1, by_row)
        order = torch.sort(values, dim=1, descending=self.largest, stable=True).indices[:, : self.k]
        self.values, self.rows = values.gather(1, order), index.gather(1, order)
