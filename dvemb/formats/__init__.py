"""The layouts dvemb writes and reads: gradient-log and results file names, the example-id codec and
the phase names. numpy and the standard library only (no torch), so that the API server, which must
not load torch, shares these definitions with the recorder, the reader, the engine and the worker
instead of restating them (an import-linter contract keeps it so).

- :mod:`dvemb.formats.log_files`: the file names of a gradient log and their grammar (docs/format.md).
- :mod:`dvemb.formats.results_files`: the file names of a computation's results (docs/results.md).
- :mod:`dvemb.formats.manifest`: the manifest as typed, validated values (``Manifest.from_json``).
- :mod:`dvemb.formats.shard_index`: a rank's append-only shard index (``shards.jsonl``, version 3).
- :mod:`dvemb.formats.summary`: a computation's ``summary.json`` as typed values (``Summary.from_json``).
- :mod:`dvemb.formats.ids`: example ids as arrays (int64, or UTF-8 bytes with offsets) and back.
- :mod:`dvemb.formats.phases`: the three training phases and which one a step falls in.
"""

from dvemb.formats.ids import (
    MAX_ID_CHARS,
    check_ids,
    decode_ids,
    encode_ids,
    id_type,
    repeated_in_step,
    unsafe_character,
)
from dvemb.formats.log_files import (
    EXAMPLE_FILES_GLOB,
    LOG_FILE_NAME,
    MANIFEST,
    MAX_INDEX_BYTES,
    MAX_MANIFEST_BYTES,
    PROJECTION_FILE,
    QUERY_SET_NAME,
    REPLAY_BUNDLE,
    examples_file_name,
    index_name,
    index_rank,
    is_index_name,
    is_log_file_name,
    is_manifest_name,
    is_replay_bundle_name,
    listed_files,
    manifest_names,
    query_file_name,
    rank_manifest_name,
    shard_name,
)
from dvemb.formats.manifest import LayerEntry, Manifest, ManifestError, QuerySetEntry, ShardEntry, ShardIndexEntry
from dvemb.formats.phases import PHASE_NAMES, PhaseName, phase_of
from dvemb.formats.results_files import (
    CHECKPOINT,
    EMBEDDINGS,
    EXAMPLES,
    OCCURRENCES,
    SELF_INFLUENCE,
    SUMMARY,
    curve_file,
    curves_file,
    dynamics_file,
    scores_file,
    topk_file,
    totals_file,
)
from dvemb.formats.shard_index import ParsedIndex, ShardIndexError, index_line, parse_shard_index
from dvemb.formats.summary import Approximation, QuerySetSummary, Summary, SummaryError

__all__ = [
    "CHECKPOINT",
    "EMBEDDINGS",
    "EXAMPLES",
    "EXAMPLE_FILES_GLOB",
    "LOG_FILE_NAME",
    "MANIFEST",
    "MAX_ID_CHARS",
    "MAX_INDEX_BYTES",
    "MAX_MANIFEST_BYTES",
    "OCCURRENCES",
    "PHASE_NAMES",
    "PROJECTION_FILE",
    "QUERY_SET_NAME",
    "REPLAY_BUNDLE",
    "SELF_INFLUENCE",
    "SUMMARY",
    "Approximation",
    "LayerEntry",
    "Manifest",
    "ManifestError",
    "ParsedIndex",
    "PhaseName",
    "QuerySetEntry",
    "QuerySetSummary",
    "ShardEntry",
    "ShardIndexEntry",
    "ShardIndexError",
    "Summary",
    "SummaryError",
    "check_ids",
    "curve_file",
    "curves_file",
    "decode_ids",
    "dynamics_file",
    "encode_ids",
    "examples_file_name",
    "id_type",
    "index_line",
    "index_name",
    "index_rank",
    "is_index_name",
    "is_log_file_name",
    "is_manifest_name",
    "is_replay_bundle_name",
    "listed_files",
    "manifest_names",
    "parse_shard_index",
    "phase_of",
    "query_file_name",
    "rank_manifest_name",
    "repeated_in_step",
    "scores_file",
    "shard_name",
    "topk_file",
    "totals_file",
    "unsafe_character",
]
