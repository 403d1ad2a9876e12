"""File names of a gradient log (docs/format.md)::

manifest.json                     rank 0 (or the only process): layers, projection, optimizer, query sets
manifest.rank{R}.json             other ranks of a distributed run
shards.jsonl, shards.rank{R}.jsonl  a rank's shard index: one line per shard, appended (version 3)
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
    "MAX_INDEX_BYTES",
    "MAX_MANIFEST_BYTES",
    "PROJECTION_FILE",
    "QUERY_SET_NAME",
    "REPLAY_BUNDLE",
    "examples_file_name",
    "index_name",
    "index_rank",
    "is_index_name",
    "is_log_file_name",
    "is_manifest_name",
    "is_replay_bundle_name",
    "listed_files",
    "manifest_names",
    "query_file_name",
    "rank_manifest_name",
    "shard_name",
]

MANIFEST = "manifest.json"
#: A version-2 manifest lists every shard of its rank (about 200 bytes each): 16 MiB covers 80,000 shards.
#: From version 3 the shards are in the index and a manifest holds only the run-level fields.
MAX_MANIFEST_BYTES = 16 << 20
#: A shard index line is about 200 bytes: 256 MiB covers 1.3 million shards of one rank.
MAX_INDEX_BYTES = 256 << 20
EXAMPLE_FILES_GLOB = "examples-*.jsonl"
PROJECTION_FILE = "projection.safetensors"
#: What a worker needs to replay the run exactly (dvemb.replay.bundle): uploaded with the log, not listed by its
#: manifest, and accepted also once the run is complete.
REPLAY_BUNDLE = "replay-bundle.safetensors"
QUERY_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MANIFEST_NAME = re.compile(r"manifest(\.rank[0-9]{1,4})?\.json")
INDEX_NAME = re.compile(r"shards(\.rank[0-9]{1,4})?\.jsonl")
#: Every file name a gradient log can hold; anything else, including any path, is not a log file.
LOG_FILE_NAME = re.compile(
    r"^(manifest(\.rank[0-9]{1,4})?\.json"
    r"|shards(\.rank[0-9]{1,4})?\.jsonl"
    r"|shard-r[0-9]{1,4}-[0-9]{6}\.safetensors"
    r"|queries-[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.safetensors"
    r"|examples-[0-9]{6}(\.rank[0-9]{1,4})?\.jsonl"
    r"|projection\.safetensors"
    r"|replay-bundle\.safetensors)$"
)


def rank_manifest_name(rank: int) -> str:
    """File name of a rank's manifest (rank 0 owns ``manifest.json``)."""
    return MANIFEST if rank == 0 else f"manifest.rank{rank}.json"


def index_name(rank: int) -> str:
    """File name of a rank's shard index (rank 0 owns ``shards.jsonl``; version 3 on)."""
    return "shards.jsonl" if rank == 0 else f"shards.rank{rank}.jsonl"


def index_rank(name: str) -> int:
    """The rank whose shard index ``name`` is (``name`` satisfies :func:`is_index_name`)."""
    match = INDEX_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not the name of a shard index")
    return int(match.group(1)[len(".rank") :]) if match.group(1) else 0


def manifest_names(world_size: int) -> list[str]:
    """The manifests of a run of ``world_size`` ranks, rank 0's first."""
    return [rank_manifest_name(rank) for rank in range(world_size)]


def shard_name(rank: int, index: int) -> str:
    """File name of a rank's ``index``-th shard."""
    return f"shard-r{rank}-{index:06d}.safetensors"


def query_file_name(name: str) -> str:
    """File name of a query set (``name`` matches :data:`QUERY_SET_NAME`)."""
    return f"queries-{name}.safetensors"


def examples_file_name(index: int, rank: int = 0) -> str:
    """File name of a rank's ``index``-th example-metadata file (rank 0 owns ``examples-NNNNNN.jsonl``; every rank
    of a distributed run describes its own examples into the one directory, so the names must differ)."""
    return f"examples-{index:06d}.jsonl" if rank == 0 else f"examples-{index:06d}.rank{rank}.jsonl"


def listed_files(manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every file the ranks' manifests (rank 0's first) say the log holds: the manifests themselves, then
    each rank's shard index (version 3), shards, query sets, example files and projection files.

    A manifest's shards are its ``shards`` list (version 2, or a version-3 manifest with its index read
    in, as the reader and the server hold it) or else, for a version-3 manifest as written at close, the
    ``num_shards`` its ``shard_index`` records (shard names follow from the rank and the position).
    """
    names = manifest_names(len(manifests))
    for rank, manifest in enumerate(manifests):
        index = manifest.get("shard_index")
        if index is not None:
            names.append(str(index["file"]))
        if "shards" in manifest:
            names += [str(entry["file"]) for entry in manifest["shards"]]
        elif index is not None:
            names += [shard_name(rank, i) for i in range(int(index.get("num_shards") or 0))]
        for key in ("query_sets", "example_files", "projection_files"):
            names += [str(entry["file"]) for entry in manifest.get(key, [])]
    return names


def is_manifest_name(name: str) -> bool:
    """True for ``manifest.json`` and ``manifest.rank{R}.json``."""
    return MANIFEST_NAME.fullmatch(name) is not None


def is_index_name(name: str) -> bool:
    """True for ``shards.jsonl`` and ``shards.rank{R}.jsonl``."""
    return INDEX_NAME.fullmatch(name) is not None


def is_replay_bundle_name(name: str) -> bool:
    """True for the name of a run's replay bundle (:data:`REPLAY_BUNDLE`)."""
    return name == REPLAY_BUNDLE


def is_log_file_name(name: str) -> bool:
    """True for a name a gradient log can hold (no path, no trailing newline)."""
    return LOG_FILE_NAME.fullmatch(name) is not None and ".." not in name
