"""File names of a gradient log (docs/format.md)::

manifest.json                     rank 0 (or the only process): layers, projection, optimizer, shards
manifest.rank{R}.json             other ranks of a distributed run: their own shards
shard-r{R}-{NNNNNN}.safetensors   consecutive steps of one rank
queries-{NAME}.safetensors        gradients of a named query set at the final model
examples-{NNNNNN}.jsonl           optional metadata of training examples (text, label, source, image)
projection.safetensors            calibrated projection bases (when rec.calibrate() ran)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "EXAMPLE_FILES_GLOB",
    "LOG_FILE_NAME",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "PROJECTION_FILE",
    "QUERY_SET_NAME",
    "examples_file_name",
    "is_log_file_name",
    "is_manifest_name",
    "listed_files",
    "manifest_names",
    "query_file_name",
    "rank_manifest_name",
    "shard_name",
]

MANIFEST = "manifest.json"
#: A manifest lists every shard of its rank (about 200 bytes each): 16 MiB covers 80,000 shards.
MAX_MANIFEST_BYTES = 16 << 20
EXAMPLE_FILES_GLOB = "examples-*.jsonl"
PROJECTION_FILE = "projection.safetensors"
QUERY_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST_NAME = re.compile(r"manifest(\.rank[0-9]{1,4})?\.json")
#: Every file name a gradient log can hold; anything else, including any path, is not a log file.
LOG_FILE_NAME = re.compile(
    r"^(manifest(\.rank[0-9]{1,4})?\.json"
    r"|shard-r[0-9]{1,4}-[0-9]{6}\.safetensors"
    r"|queries-[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.safetensors"
    r"|examples-[0-9]{6}\.jsonl"
    r"|projection\.safetensors)$"
)


def rank_manifest_name(rank: int) -> str:
    """File name of a rank's manifest (rank 0 owns ``manifest.json``)."""
    return MANIFEST if rank == 0 else f"manifest.rank{rank}.json"


def manifest_names(world_size: int) -> list[str]:
    """The manifests of a run of ``world_size`` ranks, rank 0's first."""
    return [rank_manifest_name(rank) for rank in range(world_size)]


def shard_name(rank: int, index: int) -> str:
    """File name of a rank's ``index``-th shard."""
    return f"shard-r{rank}-{index:06d}.safetensors"


def query_file_name(name: str) -> str:
    """File name of a query set (``name`` matches :data:`QUERY_SET_NAME`)."""
    return f"queries-{name}.safetensors"


def examples_file_name(index: int) -> str:
    """File name of the ``index``-th example-metadata file."""
    return f"examples-{index:06d}.jsonl"


def listed_files(manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every file the ranks' manifests (rank 0's first) say the log holds: the manifests themselves, then
    each rank's shards, query sets, example files and projection files."""
    names = manifest_names(len(manifests))
    for manifest in manifests:
        for key in ("shards", "query_sets", "example_files", "projection_files"):
            names += [str(entry["file"]) for entry in manifest.get(key, [])]
    return names


def is_manifest_name(name: str) -> bool:
    """True for ``manifest.json`` and ``manifest.rank{R}.json``."""
    return MANIFEST_NAME.fullmatch(name) is not None


def is_log_file_name(name: str) -> bool:
    """True for a name a gradient log can hold (no path, no trailing newline)."""
    return LOG_FILE_NAME.fullmatch(name) is not None and ".." not in name
