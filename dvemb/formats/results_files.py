"""File names of a computation's results directory (docs/results.md)."""

from __future__ import annotations

__all__ = [
    "CHECKPOINT",
    "EMBEDDINGS",
    "EXAMPLES",
    "OCCURRENCES",
    "SELF_INFLUENCE",
    "SUMMARY",
    "curve_file",
    "curves_file",
    "dynamics_file",
    "scores_file",
    "topk_file",
    "totals_file",
]

SUMMARY = "summary.json"  # written last: its presence means the results are complete
CHECKPOINT = "checkpoint.safetensors"  # the recursion's state while a computation runs
OCCURRENCES = "occurrences.safetensors"  # step, example index and epoch of every occurrence
EXAMPLES = "examples.safetensors"  # example ids in index order (the id codec of dvemb.formats.ids)
EMBEDDINGS = "embeddings.npy"  # (R, D) every occurrence's embedding
SELF_INFLUENCE = "self_influence.npy"  # (R,) on request


def scores_file(query_set: str) -> str:
    """(R, Q) float32 score of every occurrence on every query."""
    return f"scores-{query_set}.npy"


def curves_file(query_set: str) -> str:
    """(T, Q) float32 per-query mean score of each step's rows."""
    return f"curves-{query_set}.npy"


def curve_file(query_set: str) -> str:
    """The query set's per-step curve (raw and per learning rate), safetensors."""
    return f"curve-{query_set}.safetensors"


def topk_file(query_set: str) -> str:
    """Top-k helpful and harmful tables, safetensors."""
    return f"topk-{query_set}.safetensors"


def totals_file(query_set: str) -> str:
    """(N, Q) float64 per-example totals over all occurrences."""
    return f"totals-{query_set}.npy"


def dynamics_file(series: str) -> str:
    """Value dynamics of a series of checkpoint query sets, safetensors (docs/results.md)."""
    return f"dynamics-{series}.safetensors"
