"""Which of a log's query sets are checkpoints of value dynamics and which measure the final model."""

from __future__ import annotations

import re

from dvemb.reader import GradientLog

__all__ = ["checkpoint_series", "final_query_sets"]

_CHECKPOINT_SUFFIX = re.compile(r"^(?P<series>.+)\.step(?P<step>\d+)$")


def checkpoint_series(log: GradientLog) -> dict[str, list[tuple[int, str]]]:
    """Query sets recorded before the end of training, by series: ``{series: [(step, set name), ...]}``.

    A set named ``{series}.step{N}`` recorded at step ``N < T`` (``rec.record_queries(...,
    checkpoint=True)``) measures the model ``theta_N``; the series' final set, if any, is the one named
    ``{series}`` recorded at ``T``. Other sets recorded before ``T`` form a series of their own name.
    """
    series: dict[str, list[tuple[int, str]]] = {}
    for entry in log.info.query_sets:
        step, name = entry.step, entry.name
        if step >= log.num_steps:
            continue
        match = _CHECKPOINT_SUFFIX.match(name)
        series.setdefault(match["series"] if match else name, []).append((step, name))
    return {key: sorted(value) for key, value in series.items()}


def final_query_sets(log: GradientLog) -> list[str]:
    """Query sets recorded at the end of training (scored by the engine)."""
    return [q.name for q in log.info.query_sets if q.step >= log.num_steps]
