"""A replay's files, next to a computation's results (docs/results.md, "Exact replay and trust").

- ``replay-<set>.npy``: (R, K) float64, every occurrence's exact first-order score on each query column, rows
  in the engine's order (``dvemb.engine.load_results(dir).scores(set)`` compares row by row);
- ``replay-<set>.json``: what was replayed and how (format ``dvemb-replay``, version 1).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dvemb.atomic import write_text_atomic
from dvemb.errors import ConfigError

__all__ = ["FORMAT", "VERSION", "Replay", "load_replay", "replay_files", "rows_digest", "save_replay"]

FORMAT = "dvemb-replay"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class Replay:
    """A finished replay.

    Attributes:
        query_set: the name it is saved and compared under (the results' query set it stands for).
        scores: (R, K) float64 scores under ``removal`` (positive: the occurrence helped).
        summary: the JSON record (removal, query columns, steps, timings, loss gap, probe).
    """

    query_set: str
    scores: np.ndarray
    summary: dict[str, Any]

    @property
    def record(self) -> dict[str, Any]:
        """The JSON record (``replay-<set>.json``; the ``summary`` field, by its file's name)."""
        return self.summary

    @property
    def removal(self) -> str:
        """``"batch"`` or ``"weight"``."""
        return str(self.record["removal"])


def replay_files(query_set: str) -> tuple[str, str]:
    """The scores' and the record's file names of a query set."""
    if not _NAME.match(query_set):
        raise ConfigError(f"query set name {query_set!r}: letters, digits, '_', '.', '-' (at most 100)")
    return f"replay-{query_set}.npy", f"replay-{query_set}.json"


def rows_digest(steps: Sequence[int], ids: Sequence[int | str]) -> str:
    """sha256 of the occurrence table (``step:id`` per row), to check that two files score the same rows."""
    h = hashlib.sha256()
    for t, i in zip(steps, ids, strict=True):
        h.update(f"{int(t)}:{i}\n".encode())
    return h.hexdigest()


def save_replay(replay: Replay, directory: str | Path) -> Path:
    """Write the replay's two files into ``directory`` (created if needed); the record's path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    scores_name, record_name = replay_files(replay.query_set)
    np.save(path / scores_name, np.ascontiguousarray(replay.scores, dtype=np.float64))
    # The record last: its presence means the replay is complete.
    return write_text_atomic(path / record_name, json.dumps(replay.summary, indent=2))


def load_replay(directory: str | Path, query_set: str) -> Replay:
    """Read a replay saved by :func:`save_replay`."""
    path = Path(directory)
    scores_name, record_name = replay_files(query_set)
    if not (path / record_name).exists():
        raise ConfigError(f"{path} holds no replay of query set {query_set!r} ({record_name} is missing)")
    record = json.loads((path / record_name).read_text())
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ConfigError(f"{path / record_name} is not a {FORMAT} version {VERSION} record")
    scores = np.load(path / scores_name, allow_pickle=False)
    if scores.ndim != 2 or scores.shape[0] != record["occurrences"]:
        raise ConfigError(
            f"{path / scores_name} has shape {scores.shape}; the record says {record['occurrences']} rows"
        )
    return Replay(query_set=query_set, scores=scores, summary=record)
