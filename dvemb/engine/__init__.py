"""The engine: data value embeddings, scores and training phases from a gradient log.

- :func:`compute` (streaming, blocked, resumable) writes the results documented in docs/results.md;
- :func:`load_results` reads them back;
- :func:`reference_embeddings` is the naive per-step recursion the fast path is tested against.
"""

from dvemb.engine.compute import ComputeArguments, ComputeProgress, compute
from dvemb.engine.phases import PhaseSummary, find_phases
from dvemb.engine.recursion import BlockedRecursion, Chunk, reference_embeddings
from dvemb.engine.results import Results, load_results

__all__ = [
    "BlockedRecursion",
    "Chunk",
    "ComputeArguments",
    "ComputeProgress",
    "PhaseSummary",
    "Results",
    "compute",
    "find_phases",
    "load_results",
    "reference_embeddings",
]
