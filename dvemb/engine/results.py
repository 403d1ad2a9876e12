"""Reading computed results back (see docs/results.md): top-k tables with example ids, curves,
phase summaries and one example's history. The service and the dashboard read results through this."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dvemb import formats
from dvemb import logformat as fmt
from dvemb.errors import ConfigError
from dvemb.formats import QuerySetSummary, Summary

__all__ = ["Results", "load_results"]

KINDS = ("helpful", "harmful")


@dataclass
class Results:
    """Results of one computation.

    Attributes:
        directory: the results directory.
        summary: the parsed summary.json.
        example_ids: id of each example index.
        row_step, example_index, epoch: (R,) occurrence table in chronological order.
    """

    directory: Path
    summary: dict[str, Any]
    example_ids: list[int] | list[str]
    row_step: torch.Tensor
    example_index: torch.Tensor
    epoch: torch.Tensor

    @property
    def info(self) -> Summary:
        """The summary, typed (dvemb.formats.Summary)."""
        return Summary.from_json(self.summary)

    @property
    def query_sets(self) -> list[str]:
        """The query sets scored, in the summary's order."""
        return list(self.info.query_sets)

    def _query_set(self, name: str) -> QuerySetSummary:
        sets = self.info.query_sets
        if name not in sets:
            raise ConfigError(f"no results for query set {name!r}; computed sets are {sorted(sets)}")
        return sets[name]

    def top(
        self, query_set: str, *, kind: str = "helpful", query: int | None = None, k: int = 10
    ) -> list[dict[str, Any]]:
        """Top-k helpful or harmful occurrences for one query (index) or the whole set (``None``).

        Helpful rows have a positive score and harmful rows a negative one (the service's rule too): the file keeps
        the k largest and smallest scores whatever their sign, and those of the other sign are left out here.

        Returns:
            rows of ``{rank, score, row, step, epoch, example_id}``, best first.
        """
        if kind not in KINDS:
            raise ConfigError(f"kind={kind!r} is not one of {KINDS}")
        info = self._query_set(query_set)
        if query is not None and not 0 <= query < info.num_queries:
            raise ConfigError(f"query {query} is out of range 0..{info.num_queries - 1}")
        table = load_file(str(self.directory / formats.topk_file(query_set)))
        mask = (table["query"] == (-1 if query is None else query)) & (table["kind"] == KINDS.index(kind))
        mask &= table["score"] > 0 if kind == "helpful" else table["score"] < 0
        chosen = torch.nonzero(mask).squeeze(1)[:k]
        return [
            {
                "rank": int(table["rank"][i]),
                "score": float(table["score"][i]),
                "row": int(table["row"][i]),
                "step": int(table["step"][i]),
                "epoch": int(table["epoch"][i]),
                "example_id": self.example_ids[int(table["example_index"][i])],
            }
            for i in chosen.tolist()
        ]

    def curve(self, query_set: str) -> dict[str, np.ndarray]:
        """Per-step columns: step, lr, batch_size, loss, mean, mean_per_lr, abs_sum."""
        self._query_set(query_set)
        return {k: v.numpy() for k, v in load_file(str(self.directory / formats.curve_file(query_set))).items()}

    def phases(self, query_set: str) -> dict[str, Any]:
        """Phase summary of a query set (boundaries, ranges, shares)."""
        return self._query_set(query_set).phases

    def totals(self, query_set: str) -> np.ndarray:
        """(N, Q) total influence of each example (sum over its occurrences) on each query."""
        self._query_set(query_set)
        return np.asarray(np.load(self.directory / formats.totals_file(query_set), mmap_mode="r"))

    def scores(self, query_set: str) -> np.ndarray:
        """(R, Q) memory-mapped score of every occurrence on every query."""
        self._query_set(query_set)
        scores: np.ndarray = np.load(self.directory / formats.scores_file(query_set), mmap_mode="r")
        return scores

    def history(self, example_id: int | str, query_set: str) -> list[dict[str, Any]]:
        """Every occurrence of one example: step, epoch and its score on the set (mean) and on each query."""
        try:
            index = self.example_ids.index(example_id)  # type: ignore[arg-type]
        except ValueError:
            raise ConfigError(f"example {example_id!r} does not occur in this run") from None
        rows = torch.nonzero(self.example_index == index).squeeze(1).tolist()
        scores = self.scores(query_set)
        return [
            {
                "row": r,
                "step": int(self.row_step[r]),
                "epoch": int(self.epoch[r]),
                "score": float(scores[r].mean()),
                "per_query": scores[r].astype(np.float64).tolist(),
            }
            for r in rows
        ]


def load_results(directory: str | Path) -> Results:
    """Open a finished results directory written by :func:`dvemb.engine.compute`."""
    path = Path(directory)
    summary_path = path / formats.SUMMARY
    if not summary_path.exists():
        raise ConfigError(f"{path} holds no finished results (no summary.json); run dvemb compute first")
    summary = json.loads(summary_path.read_text())
    occurrences = load_file(str(path / formats.OCCURRENCES))
    return Results(
        directory=path,
        summary=summary,
        example_ids=fmt.decode_ids(load_file(str(path / formats.EXAMPLES))),
        row_step=occurrences["row_step"],
        example_index=occurrences["example_index"],
        epoch=occurrences["epoch"],
    )
