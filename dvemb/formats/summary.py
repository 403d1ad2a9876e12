"""A computation's ``summary.json`` (docs/results.md) as typed values, for every reader of results: the
API's services, the worker that stores aggregates, the CLI.

``Summary.from_json`` checks what readers rely on (the counts, each query set's size and phase boundaries,
the top-k and embedding options) and raises :class:`SummaryError` naming the field; the JSON itself is
kept (``raw``) so that the API can return the summary as the engine wrote it.

:class:`Approximation` is one entry of the summary's ``approximations`` (what the scores approximate beyond first
order, ``dvemb.engine.approximations``); a summary written before the field existed has none listed and says so
(``approximations_known`` false), so that a reader does not present it as free of approximations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Approximation", "QuerySetSummary", "Summary", "SummaryError"]


class SummaryError(ValueError):
    """A summary value is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Approximation:
    """One approximation the scores carry: ``kind`` a stable key (``"random-projection"``...), ``label`` a few
    words for a display, ``detail`` one sentence on what it means for the scores and how to avoid it."""

    kind: str
    label: str
    detail: str

    @classmethod
    def from_json(cls, data: Any) -> Approximation:
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("kind", "label", "detail")):
            raise SummaryError(f"approximation {data!r}: needs string kind, label and detail")
        return cls(kind=data["kind"], label=data["label"], detail=data["detail"])

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "label": self.label, "detail": self.detail}


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _approximations(data: Any) -> tuple[Approximation, ...]:
    """The summary's ``approximations`` (none in a summary written before the field existed)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise SummaryError("approximations must be a list")
    return tuple(Approximation.from_json(a) for a in data)


@dataclass(frozen=True)
class QuerySetSummary:
    """One scored query set: its size and the phases found on its curve."""

    name: str
    num_queries: int
    boundaries: tuple[int, int]  # first step of the basin, first step of the late phase
    phases: dict[str, Any]
    query_ids: tuple[int | str, ...] = ()  # each query's id (the query example's), in column order

    @classmethod
    def from_json(cls, name: str, data: Any) -> QuerySetSummary:
        try:
            num = int(data["num_queries"])
            first, second = (int(b) for b in data["phases"]["boundaries"])
        except (KeyError, TypeError, ValueError):
            raise SummaryError(f"query set {name!r}: needs num_queries and phases.boundaries [basin, late]") from None
        if num < 1 or not 0 <= first <= second:
            raise SummaryError(f"query set {name!r}: {num} queries, boundaries {[first, second]}")
        ids = data.get("query_ids") or ()
        return cls(
            name=name,
            num_queries=num,
            boundaries=(first, second),
            phases=dict(data["phases"]),
            query_ids=tuple(i if isinstance(i, int | str) else str(i) for i in ids),
        )


@dataclass(frozen=True)
class Summary:
    """What a finished computation says about itself."""

    steps: int
    occurrences: int
    examples: int
    top_k: int
    save_embeddings: bool
    propagation_label: str | None
    removal: str  # what removing an occurrence meant: "batch" or "weight" (the engine's; "weight" before it said)
    propagation: str | None  # the propagation's name ("adamw", "sgd"...)
    curvature: str | None  # the curvature the log recorded ("ggn", "empirical"...)
    fingerprint: str | None  # of the log and options the scores were computed from
    seconds: float | None  # the computation's wall time
    segments: int  # steps ranges computed apart and combined (1: one pass)
    note: str | None  # what the engine wants the reader to know (None: nothing)
    dynamics: dict[str, Any]  # value dynamics by series (docs/results.md; empty without checkpoint query sets)
    query_sets: dict[str, QuerySetSummary]
    approximations: tuple[Approximation, ...]
    approximations_known: bool  # False: an older summary, written before the engine listed them
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: Any) -> Summary:
        if not isinstance(data, dict):
            raise SummaryError("a summary must be a JSON object")
        try:
            arguments = data["arguments"]
            sets = data["query_sets"]
            summary = cls(
                steps=int(data["steps"]),
                occurrences=int(data["occurrences"]),
                examples=int(data["examples"]),
                top_k=int(arguments["top_k"]),
                save_embeddings=bool(arguments.get("save_embeddings", True)),
                propagation_label=data.get("propagation_label"),
                removal=str(data.get("removal", "weight")),
                propagation=_optional_str(data.get("propagation")),
                curvature=_optional_str(data.get("curvature")),
                fingerprint=_optional_str(data.get("fingerprint")),
                seconds=float(data["seconds"]) if data.get("seconds") is not None else None,
                segments=int(data.get("segments", 1)),
                note=_optional_str(data.get("note")),
                dynamics=dict(data.get("dynamics") or {}),
                query_sets={str(n): QuerySetSummary.from_json(str(n), q) for n, q in sets.items()},
                approximations=_approximations(data.get("approximations")),
                approximations_known=data.get("approximations") is not None,
                raw=data,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, SummaryError):
                raise
            raise SummaryError(f"summary lacks or mangles {exc}") from None
        return summary

    def query_set(self, name: str) -> QuerySetSummary:
        """The summary of query set ``name`` (a :class:`KeyError` when it was not scored)."""
        return self.query_sets[name]

    def approximations_json(self) -> list[dict[str, str]] | None:
        """The approximations as JSON values; None when the summary predates the list (unknown, not none)."""
        return [a.to_json() for a in self.approximations] if self.approximations_known else None

    def to_json(self) -> dict[str, Any]:
        return self.raw
