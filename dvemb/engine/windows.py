"""Top examples within windows of training: per phase, per tenth of training, per epoch, or any step range.

The engine keeps the overall top-k of the whole run; on a typical run all of it comes from the last steps,
so "what harmed the model early?" cannot be answered by filtering it. This module ranks the occurrences
*inside* each window exactly, from the (R, Q) scores file, reading it in row chunks (bounded memory
whatever R): per window, query and kind, a running top-k takes in the chunk's scores that beat its k-th.

Order: helpful rows by score descending, harmful rows by score ascending, equal scores by row (earlier first),
whatever the chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dvemb.formats import PHASE_NAMES

__all__ = ["MAX_EPOCH_WINDOWS", "Window", "WindowTop", "standard_windows", "window_topk"]

MAX_EPOCH_WINDOWS = 20  # more epochs than this: per-epoch tables are computed on demand instead
CHUNK_BYTES = 32 << 20  # float64 bytes of one chunk of scores (plus the set mean) held at a time
# Rows of one chunk at most, whatever Q: besides its scores a chunk holds about 100 B of temporaries per row
# (row numbers, positions, float64 means, masks, the partition's copies), so with few queries CHUNK_BYTES alone
# let a chunk grow to the whole run (466,000 rows at Q = 16: 50 MB more at 800,000 occurrences than at 80,000).
MAX_CHUNK_ROWS = 1 << 16
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
        chunk_rows: rows read at a time (default: about 32 MiB of scores, at most :data:`MAX_CHUNK_ROWS`).

    Returns:
        The :class:`WindowTop`; the set mean of a row is the float64 mean of its Q scores.
    """
    total, queries = scores.shape
    chunk = chunk_rows or max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * (queries + 2))))
    # Per window and kind: the queries' columns (compared in the file's float32) and the set mean (float64).
    kept = [[(_Running(queries, k, largest), _Running(1, k, largest)) for largest in (True, False)] for _ in windows]
    occurrences = np.zeros(len(windows), dtype=np.int64)
    row_step, epoch = np.asarray(row_step), np.asarray(epoch)
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        steps, epochs = row_step[start:stop], epoch[start:stop]
        first, last = int(steps.min()), int(steps.max())
        block: tuple[np.ndarray, np.ndarray] | None = None
        for w, window in enumerate(windows):
            if window.step_max < first or window.step_min > last:
                continue  # the chunk holds none of the window's steps
            inside = np.flatnonzero(window.contains(steps, epochs))
            if not len(inside):
                continue
            if block is None:  # read the chunk once, only when some window needs it
                raw = np.asarray(scores[start:stop])  # (n, Q)
                block = (raw, raw.mean(axis=1, dtype=np.float64, keepdims=True))  # and (n, 1)
            occurrences[w] += len(inside)
            # Steps are chronological, so a step window's rows in a chunk are one slice (a view, no copy).
            chosen = slice(inside[0], inside[-1] + 1) if inside[-1] - inside[0] + 1 == len(inside) else inside
            rows = np.arange(start, stop)[chosen]
            for pair in kept[w]:
                for running, part in zip(pair, block, strict=True):
                    running.update(part[chosen], rows)
    values = np.full((len(windows), 2, queries + 1, k), np.nan)
    row_ids = np.full((len(windows), 2, queries + 1, k), -1, dtype=np.int64)
    for w, pairs in enumerate(kept):
        for kind, (per_query, mean) in enumerate(pairs):
            n = per_query.values.shape[1]
            values[w, kind, :, :n] = np.concatenate([per_query.values, mean.values])
            row_ids[w, kind, :, :n] = np.concatenate([per_query.rows, mean.rows])
    return WindowTop(values=values, rows=row_ids, occurrences=occurrences)


class _Running:
    """The k best scores per column so far and their rows, exactly: ordered by score, equal scores by row.

    Rows arrive in ascending order, so a kept row always precedes a new one: once k are kept, a new score enters
    only when strictly better than the k-th (a comparison pass over the chunk; few pass, so the exact merge,
    a stable sort per column of the kept and the passing candidates, stays small).
    """

    def __init__(self, columns: int, k: int, largest: bool) -> None:
        self.columns, self.k, self.largest = columns, k, largest
        self.values = np.zeros((columns, 0))  # (C, kept) float64, best first
        self.rows = np.zeros((columns, 0), dtype=np.int64)

    def update(self, block: np.ndarray, rows: np.ndarray) -> None:
        """Merge (m, C) scores of the (m,) ascending rows, all after the rows seen so far."""
        better = np.greater if self.largest else np.less
        full = self.values.shape[1] == self.k
        # Full: only strictly better than the k-th can enter.
        passing = better(block, self.values[:, -1].astype(block.dtype)) if full else np.ones(block.shape, dtype=bool)
        # Only the chunk's own k best can enter too (ties with its k-th included): when scores trend (a late chunk
        # beats most of what was kept) the candidates would otherwise be the whole chunk, and the merge's arrays
        # (C, k + chunk) several times the chunk's scores.
        if len(block) > self.k and (not full or int(passing.sum(axis=0).max()) > self.k):
            place = len(block) - self.k if self.largest else self.k - 1
            bound = np.partition(np.ascontiguousarray(block.T), place, axis=1)[:, place]  # (contiguous: faster)
            passing &= ~better(bound, block)
        column, at = np.nonzero(passing.T)  # by column, then by row: each column's candidates in row order
        if not len(at):
            return
        counts = np.bincount(column, minlength=self.columns)
        slot = np.arange(len(at)) - np.repeat(np.cumsum(counts) - counts, counts)  # place within its column
        kept, width = self.values.shape[1], int(counts.max())
        worst = -np.inf if self.largest else np.inf  # padding, sorted last
        values = np.full((self.columns, kept + width), worst)
        rows_2d = np.zeros((self.columns, kept + width), dtype=np.int64)
        values[:, :kept], rows_2d[:, :kept] = self.values, self.rows
        values[column, kept + slot] = block[at, column]
        rows_2d[column, kept + slot] = rows[at]
        # Kept rows precede new ones and new ones are in row order: a stable sort by score puts equal scores
        # earlier row first.
        order = np.argsort(-values if self.largest else values, axis=1, kind="stable")[:, : self.k]
        size = min(self.k, kept + len(rows))  # every column holds as many (each row scores every column)
        self.values = np.take_along_axis(values, order, axis=1)[:, :size]
        self.rows = np.take_along_axis(rows_2d, order, axis=1)[:, :size]
