"""When to run data selection: the step windows that carry a chosen share of a run's influence at the
smallest share of steps, and the paper's early+late rule evaluated on the run (docs/dashboard.md).

Pure functions of a job's binned curve (numpy only), tested against brute force.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Selection", "StepWindow", "fewest_bins", "selection_timing"]

MEASURES = {"per_lr": "|influence / lr|", "raw": "|influence|"}


@dataclass(frozen=True)
class StepWindow:
    """Steps ``first..last`` (inclusive) and their share of the steps and of the influence."""

    first: int
    last: int
    share_of_steps: float
    share_of_influence: float


@dataclass(frozen=True)
class Selection:
    """A set of windows and what it carries in total."""

    windows: list[StepWindow]
    share_of_steps: float
    share_of_influence: float


def fewest_bins(weights: np.ndarray, share: float, max_windows: int) -> list[tuple[int, int]]:
    """The at most ``max_windows`` runs of consecutive bins that carry ``share`` of the total weight in the
    fewest bins (exact, by dynamic programming over bins, windows used and bins taken). The curve's bins hold
    equally many steps (give or take one), so the fewest bins are the fewest steps at the bins' resolution.

    Args:
        weights: (n,) non-negative weight of each bin.
        share: the share of the total weight to carry, in (0, 1].
        max_windows: the most runs allowed.

    Returns:
        [(first bin, last bin)] in order; empty when the total weight is 0.
    """
    n = len(weights)
    total = float(weights.sum())
    if n == 0 or total <= 0:
        return []
    need = share * total * (1 - 1e-12)
    m = max_windows
    # on[j, b]: most weight with j windows and b bins taken, the current bin taken; off: the current bin not taken.
    on = np.full((m + 1, n + 1), -np.inf)
    off = np.full((m + 1, n + 1), -np.inf)
    off[0, 0] = 0.0
    started = np.zeros((n, m + 1, n + 1), dtype=bool)  # on came from off: the bin starts window j
    closed = np.zeros((n, m + 1, n + 1), dtype=bool)  # off came from on: the previous bin ended a window
    for i in range(n):
        extend = np.full_like(on, -np.inf)
        extend[:, 1:] = on[:, :-1]
        start = np.full_like(on, -np.inf)
        start[1:, 1:] = off[:-1, :-1]
        started[i] = start > extend
        new_on = np.maximum(extend, start) + weights[i]
        closed[i] = on > off
        off = np.maximum(off, on)
        on = new_on
    best = np.maximum(on, off)  # (m + 1, n + 1)
    reach = np.flatnonzero(best.max(axis=0) >= need)
    taken = int(reach[0])
    j = int(np.argmax(best[:, taken]))
    state_on = on[j, taken] >= off[j, taken]
    chosen = np.zeros(n, dtype=bool)
    b = taken
    for i in range(n - 1, -1, -1):  # walk back: which state led to (j, b, on/off) after bin i
        if state_on:
            chosen[i] = True
            if started[i, j, b]:
                j, state_on = j - 1, False
            b -= 1
        else:
            state_on = bool(closed[i, j, b])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], chosen.astype(np.int8), [0]])))
    return [(int(a), int(z) - 1) for a, z in zip(edges[::2], edges[1::2], strict=True)]


def selection_timing(
    first_step: np.ndarray,
    last_step: np.ndarray,
    weights: np.ndarray,
    phases: dict[str, Any],
    *,
    share: float,
    max_windows: int,
    measure: str,
) -> dict[str, Any]:
    """The recommendation for one query set.

    Args:
        first_step, last_step: (n,) the steps each bin of the curve spans (consecutive, covering 0..T-1).
        weights: (n,) each bin's sum over its steps of |influence| (``raw``) or |influence| / lr (``per_lr``).
        phases: the job's phase summary (``ranges``, ``share_abs``, ``share_abs_per_lr``).
        share: the share of the influence to carry.
        max_windows: the most windows of selection.
        measure: ``per_lr`` or ``raw``.

    Returns:
        JSON-ready: the fewest-steps windows, the early+late rule and the early phase alone (each with its
        share of steps and of influence), the resolution of the search and a sentence saying it.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {sorted(MEASURES)}")
    steps = int(last_step[-1]) + 1 if len(last_step) else 0
    sizes = (last_step - first_step + 1).astype(np.int64)
    total = float(weights.sum()) or 1.0

    def window(first: int, last: int, weight: float) -> StepWindow:
        return StepWindow(first, last, (last - first + 1) / max(steps, 1), weight / total)

    best = [
        window(int(first_step[a]), int(last_step[z]), float(weights[a : z + 1].sum()))
        for a, z in fewest_bins(weights, share, max_windows)
    ]
    phase_share = phases["share_abs_per_lr" if measure == "per_lr" else "share_abs"]
    rule = [
        StepWindow(lo, hi, (hi - lo + 1) / max(steps, 1), float(phase_share[name]))
        for name in ("early", "late")
        for lo, hi in [phases["ranges"][name]]
        if hi >= lo
    ]
    chosen, early_late = _selection(best), _selection(rule)
    early_only = _selection([w for w in rule if w.first == 0])
    return {
        "measure": measure,
        "measure_label": MEASURES[measure],
        "share": share,
        "max_windows": max_windows,
        "steps": steps,
        "resolution_steps": int(sizes.max()) if len(sizes) else 1,
        "fewest_steps": asdict(chosen),
        "early_late": asdict(early_late),
        "early_only": asdict(early_only),
        "recommendation": _sentence(chosen, early_late, MEASURES[measure]),
    }


def _selection(windows: list[StepWindow]) -> Selection:
    return Selection(
        windows, sum(w.share_of_steps for w in windows), min(1.0, sum(w.share_of_influence for w in windows))
    )


def _spans(selection: Selection) -> str:
    return " and ".join(f"{w.first}–{w.last}" for w in selection.windows) or "none"


def _sentence(best: Selection, rule: Selection, measure: str) -> str:
    """E.g. "Select data in steps 0–12 and 850–999: 16% of the steps carry 81% of |influence / lr|. ..."."""
    return (
        f"Select data in steps {_spans(best)}: {best.share_of_steps:.0%} of the steps carry "
        f"{best.share_of_influence:.0%} of {measure}. The paper's rule (early and late phases only) on this run: "
        f"steps {_spans(rule)}, {rule.share_of_steps:.0%} of the steps, carrying {rule.share_of_influence:.0%}."
    )
