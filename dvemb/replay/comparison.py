"""How far to trust a run's fast scores: their agreement with an exact replay, and the linearity probe.

:func:`trust` reads a results directory (``dvemb compute``) and a replay saved next to it
(:func:`dvemb.replay.save_replay`), compares the query set's scores row by row (over all occurrences and per
phase of the results: Spearman, Pearson, top-100 helpful and harmful overlap) and writes ``trust-<set>.json``
(docs/results.md, "Exact replay and trust").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvemb.atomic import write_text_atomic
from dvemb.engine.removal import centre_steps
from dvemb.engine.results import load_results
from dvemb.errors import ConfigError
from dvemb.replay.files import load_replay, rows_digest

__all__ = [
    "PARTLY_PREDICTABLE_ERROR",
    "PREDICTABLE_ERROR",
    "TOP",
    "agreement",
    "pearson",
    "spearman",
    "trust",
    "trust_file",
]

#: Occurrences in each top list compared.
TOP = 100
#: A run is called first-order predictable when the probe's median relative errors are both at most this.
PREDICTABLE_ERROR = 0.25
#: ... partly predictable when both are at most this, and not predictable beyond.
PARTLY_PREDICTABLE_ERROR = 0.5


def trust_file(query_set: str) -> str:
    """The trust record's file name."""
    return f"trust-{query_set}.json"


def ranks(values: np.ndarray) -> np.ndarray:
    """(n,) ranks from 0, ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    out = np.empty(len(values), dtype=np.float64)
    for a, b in zip(starts, ends, strict=True):
        out[order[a:b]] = (a + b - 1) / 2
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation (None when either side is constant or there are fewer than 2 values)."""
    if len(a) < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else None


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (ties averaged)."""
    return pearson(ranks(a), ranks(b))


def _overlap(a: np.ndarray, b: np.ndarray, k: int, *, largest: bool) -> float | None:
    if k == 0:
        return None
    sign = -1.0 if largest else 1.0
    top_a = set(np.argsort(sign * a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(sign * b, kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def agreement(fast: np.ndarray, exact: np.ndarray, top: int = TOP) -> dict[str, Any]:
    """Agreement of two (n,) score vectors: Spearman, Pearson, top-``k`` helpful and harmful overlap.

    ``k = min(top, n // 2)``; the overlap is the share of the exact top-k that the fast top-k holds.
    """
    k = min(top, len(fast) // 2)
    return {
        "occurrences": len(fast),
        "spearman": spearman(fast, exact),
        "pearson": pearson(fast, exact),
        "top_k": k,
        "top_helpful_overlap": _overlap(fast, exact, k, largest=True),
        "top_harmful_overlap": _overlap(fast, exact, k, largest=False),
    }


def trust(results_dir: str | Path, query_set: str, *, write: bool = True) -> dict[str, Any]:
    """Compare a query set's fast scores with the replay saved next to them; write ``trust-<set>.json``.

    The query set's score is the mean over its query columns on both sides (the mean loss of the set); when both
    have the same columns the mean per-query Spearman is added.

    Raises:
        ConfigError: no replay, different occurrences, or a replay under the ``"batch"`` removal compared with
            ``"weight"`` results.
    """
    path = Path(results_dir)
    results = load_results(path)
    replay = load_replay(path, query_set)
    fast = np.asarray(results.scores(query_set), dtype=np.float64)
    steps = results.row_step.tolist()
    ids = [results.example_ids[i] for i in results.example_index.tolist()]
    if replay.record["rows_digest"] != rows_digest(steps, ids):
        raise ConfigError(
            f"the replay of {query_set!r} scores other occurrences than the results in {path} "
            "(another run, order or log)"
        )
    summary = results.info
    exact, removal = _same_removal(replay.scores, replay.removal, summary.removal, steps)
    fast_mean, exact_mean = fast.mean(1), exact.mean(1)
    record: dict[str, Any] = {
        "format": "dvemb-trust",
        "version": 1,
        "query_set": query_set,
        "removal": removal,
        "propagation": summary.propagation,
        "steps": summary.steps,
        "fingerprint": summary.fingerprint,
        "all": agreement(fast_mean, exact_mean),
        "phases": _per_phase(results.phases(query_set), np.asarray(steps), fast_mean, exact_mean),
        "per_query_spearman": _per_query(fast, exact),
        "probe": {k: v for k, v in replay.record["probe"].items() if k != "records"},
        "replay_loss_gap": replay.record.get("loss_gap"),
    }
    record["first_order_predictable"] = _predictable(record["probe"])
    record["first_order_verdict"] = _verdict(record["probe"])
    if write:
        write_text_atomic(path / trust_file(query_set), json.dumps(record, indent=2))
    return record


def _same_removal(scores: np.ndarray, replayed: str, computed: str, steps: list[int]) -> tuple[np.ndarray, str]:
    if replayed == computed:
        return scores, computed
    if replayed == "weight" and computed == "batch":
        position = torch.tensor(steps, dtype=torch.int64)
        return centre_steps(torch.from_numpy(scores), position, max(steps) + 1).numpy(), computed
    raise ConfigError(
        f"the replay removes occurrences as {replayed!r} and the results as {computed!r}: "
        f"replay again with ReplayArguments(removal={computed!r})"
    )


def _per_phase(phases: dict[str, Any], steps: np.ndarray, fast: np.ndarray, exact: np.ndarray) -> dict[str, Any]:
    out = {}
    for name, (first, last) in phases["ranges"].items():
        mask = (steps >= first) & (steps <= last)
        out[name] = {"steps": [int(first), int(last)], **agreement(fast[mask], exact[mask])}
    return out


def _per_query(fast: np.ndarray, exact: np.ndarray) -> float | None:
    if fast.shape[1] != exact.shape[1] or fast.shape[1] < 2:
        return None
    values = [spearman(fast[:, k], exact[:, k]) for k in range(fast.shape[1])]
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _predictable(probe: dict[str, Any]) -> bool | None:
    if not probe.get("occurrences"):
        return None
    return bool(probe["proportionality"] <= PREDICTABLE_ERROR and probe["first_order"] <= PREDICTABLE_ERROR)


def _verdict(probe: dict[str, Any]) -> str | None:
    """``"predictable"``, ``"partly predictable"`` or ``"not predictable"`` by the worse of the probe's medians."""
    if not probe.get("occurrences"):
        return None
    worst = max(probe["proportionality"], probe["first_order"])
    if worst <= PREDICTABLE_ERROR:
        return "predictable"
    return "partly predictable" if worst <= PARTLY_PREDICTABLE_ERROR else "not predictable"


def describe(record: dict[str, Any]) -> str:
    """One line for a display, as the dashboard would put it next to a table of scores, with a warning when the
    probe finds the run not first-order predictable.

    Example: ``fast scores agree with exact replay: Spearman 0.71, top-100 overlap 64% helpful, 58% harmful``.
    """
    agreement = record["all"]
    parts = [f"fast scores agree with exact replay: Spearman {_number(agreement['spearman'])}"]
    if agreement["top_k"]:
        parts.append(
            f"top-{agreement['top_k']} overlap {agreement['top_helpful_overlap']:.0%} helpful, "
            f"{agreement['top_harmful_overlap']:.0%} harmful"
        )
    line = ", ".join(parts)
    verdict = record.get("first_order_verdict")
    if verdict == "not predictable":
        line += (
            "; WARNING: this run is not first-order predictable (removing an example does not move the queries in "
            "proportion): no first-order score, fast or exact, ranks its examples reliably"
        )
    elif verdict == "partly predictable":
        line += "; the largest scores respond to removal only roughly in proportion (partly first-order predictable)"
    return line


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
