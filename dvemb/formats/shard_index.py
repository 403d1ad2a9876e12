"""A rank's shard index (docs/format.md, version 3): ``shards.jsonl``, one JSON object per shard, appended.

The writer appends a shard's line (with its newline, in one write, then fsync) only once the shard file is
durable under its final name, so every complete line names a complete shard. A crash during the append
can leave a partial last line (no newline, or bytes a file system zero-filled): that tail is what
:func:`parse_shard_index` drops from an index still being written, and refuses in a sealed one.
Shared by the reader and the server's validator (no torch).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dvemb.formats.log_files import shard_name
from dvemb.formats.manifest import ShardEntry

__all__ = ["ParsedIndex", "ShardIndexError", "index_line", "parse_shard_index"]


class ShardIndexError(ValueError):
    """A shard index cannot be used; the message names the line and what is wrong."""


@dataclass(frozen=True)
class ParsedIndex:
    """The shard entries of an index, in order, and the bytes of a partial last record that were dropped."""

    entries: list[dict[str, Any]]
    torn_bytes: int = 0


def index_line(entry: Mapping[str, Any]) -> bytes:
    """One shard's record as the index stores it: compact JSON and a newline."""
    return (json.dumps(dict(entry), separators=(",", ":")) + "\n").encode("utf-8")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_shard_index(data: bytes, rank: int, *, sealed: bool) -> ParsedIndex:
    """Parse the index of rank ``rank``.

    Args:
        data: the index file's bytes.
        rank: the rank whose shards it lists (line ``i`` must name ``shard_name(rank, i)``).
        sealed: the manifest recorded the index at close; then a partial last record is refused, else
            it is the trace of a crash mid-append and is dropped.

    Raises:
        ShardIndexError: a complete line that is not a well-formed shard record of this rank, in order,
            or (sealed) a partial last record.
    """
    *lines, tail = data.split(b"\n")
    if tail and sealed:
        raise ShardIndexError(f"ends with a partial record of {len(tail)} bytes (no newline)")
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
            entry = ShardEntry.from_json(record) if isinstance(record, dict) else None
        except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError, ManifestError; nested deep
            entry = None
        if entry is None:
            raise ShardIndexError(f"line {number} is not a shard record; the index is corrupt")
        expected = shard_name(rank, number - 1)
        if entry.file != expected:
            raise ShardIndexError(f"line {number} lists {entry.file!r} where {expected!r} was expected")
        entries.append(entry.to_json())
    return ParsedIndex(entries, len(tail))
