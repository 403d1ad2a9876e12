"""The linearity probe: is the run first-order predictable where it matters?

For a few occurrences the tail of training is actually retrained with the occurrence's removal scaled by
``alpha`` (0.5, 1 and 2 by default) and the change of the query loss is measured. A first-order predictable run
answers in proportion (``response(alpha) ~ alpha response(1)``) and as the replay predicts
(``response(1) ~ score``); a run where removing one example flips activations (ReLU at a large rate) does not.
Half of the probed occurrences are the replay's largest ``|score|`` (the top lists the user reads), the rest
drawn at random.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dvemb.replay.engine import Replayer

__all__ = ["linearity_probe", "probe_rows", "removal_weights", "summarise_probe"]


def removal_weights(size: int, position: int, alpha: float, removal: str, dtype: torch.dtype) -> torch.Tensor:
    """(B,) example weights of a step with ``alpha`` times the removal of the example at ``position``.

    ``"weight"``: its weight becomes ``1 - alpha``. ``"batch"``: also the others' become ``1 + alpha / (B - 1)``
    (at ``alpha = 1`` the mean over the others; a step of one example: as ``"weight"``).
    """
    w = torch.ones(size, dtype=dtype)
    if removal == "batch" and size > 1:
        w += alpha / (size - 1)
    w[position] = 1 - alpha
    return w


def probe_rows(scores: np.ndarray, count: int, seed: int) -> list[int]:
    """Rows to probe: the ``ceil(count / 2)`` largest ``|score|`` (mean over queries), then random others."""
    aggregate = np.abs(scores.mean(1))
    count = min(count, len(aggregate))
    top = [int(r) for r in np.argsort(-aggregate, kind="stable")[: math.ceil(count / 2)]]
    rest = np.setdiff1d(np.arange(len(aggregate)), top)
    rng = np.random.default_rng(seed)
    drawn: list[int] = []
    if len(rest):
        drawn = [int(r) for r in rng.choice(rest, size=min(count - len(top), len(rest)), replace=False)]
    return sorted(top + drawn)


def linearity_probe(
    replayer: Replayer, scores: np.ndarray, rows: list[int], scales: tuple[float, ...]
) -> list[dict[str, Any]]:
    """Retrain the tail of the run for each row and scale; one record per row.

    Args:
        replayer: a replayer whose forward pass has run.
        scores: (R, K) the replay's scores under ``replayer.removal``.
        rows: occurrences to probe.
        scales: multiples of the removal.

    Returns:
        per row ``{row, step, position, example_id, predicted, response: {scale: change}}``: the predicted and
        actual change of the query loss (mean over the query columns) when the occurrence is removed.
    """
    final = replayer.final if replayer.final is not None else replayer.forward()
    row_step, ids = replayer.schedule.rows()
    first_row = {int(t): int(r) for r, t in reversed(list(enumerate(row_step.tolist())))}
    with torch.no_grad():
        base = replayer.query_losses(final.params).mean()
    dtype = final.params[0].dtype
    T = replayer.schedule.num_steps
    out = []
    for row in rows:
        t = int(row_step[row])
        position = row - first_row[t]
        entering = replayer.state_at(t)
        response = {}
        for alpha in scales:
            w = removal_weights(len(replayer.schedule.step_ids[t]), position, alpha, replayer.removal, dtype)
            state, _ = replayer.advance(entering, t, w.to(final.params[0].device))
            for k in range(t + 1, T):
                state, _ = replayer.advance(state, k)
            with torch.no_grad():
                response[str(alpha)] = float(replayer.query_losses(state.params).mean() - base)
        out.append(
            {
                "row": row,
                "step": t,
                "position": position,
                "example_id": ids[row],
                "predicted": float(scores[row].mean()),
                "response": response,
            }
        )
    return out


def summarise_probe(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the probed occurrences of two relative errors (0 = exactly first order).

    - ``proportionality``: ``max_alpha |response(alpha) / alpha - response(1)| / |response(1)|``;
    - ``first_order``: ``|response(1) - predicted| / max(|response(1)|, |predicted|)``.
    """
    if not records:
        return {"occurrences": 0, "proportionality": None, "first_order": None}
    prop, first = [], []
    for r in records:
        one = r["response"]["1.0"]
        scale = max(abs(one), 1e-300)
        prop.append(max(abs(v / float(a) - one) / scale for a, v in r["response"].items()))
        first.append(abs(one - r["predicted"]) / max(abs(one), abs(r["predicted"]), 1e-300))
    return {
        "occurrences": len(records),
        "proportionality": float(np.median(prop)),
        "first_order": float(np.median(first)),
    }
