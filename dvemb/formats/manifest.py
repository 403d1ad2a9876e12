"""The gradient log's manifest as typed, validated values (docs/format.md), for every reader: the core's
reader checks a log with it, the API and the worker read what they need from it without torch.

``Manifest.from_json`` checks types, ranges and names and raises :class:`ManifestError` (a ``ValueError``)
naming the field and what is wrong; ``to_json`` gives back the JSON object (keys this version does not
model are kept as they were, so nothing a newer writer added is lost).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["LayerEntry", "Manifest", "ManifestError", "QuerySetEntry", "ShardEntry", "ShardIndexEntry"]

#: Module names as PyTorch writes them (dotted identifiers, digits for list indices); never a path.
LAYER_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
LAYER_KINDS = ("linear", "conv1d", "conv2d", "embedding")
MAX_DIM = 1 << 31
#: From this version a rank's shards are listed in its append-only shard index, not in its manifest.
INDEXED_VERSION = 3


class ManifestError(ValueError):
    """A manifest value is missing, of the wrong type, or out of range; the message names it."""


def _int(where: str, value: Any, low: int = 0, high: int = 1 << 62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ManifestError(f"{where} must be an integer in {low}..{high}, got {value!r}")
    return value


def _str(where: str, value: Any, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise ManifestError(f"{where} is not a valid name: {value!r}")
    return value


def _entries(where: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ManifestError(f"{where} must be a list of objects")
    return value


@dataclass(frozen=True)
class LayerEntry:
    """One tracked layer: its weight-gradient matrix (out_dim, in_dim) and projected sizes (k_out, k_in)."""

    name: str
    kind: str
    out_dim: int
    in_dim: int
    k_out: int
    k_in: int
    seed_out: int
    seed_in: int
    has_bias: bool = False
    basis: str = "seeded"
    parameters: int | None = None
    tied: tuple[str, ...] = ()
    #: How the log carries Adam's second moment for this layer (``"both"``, ``"factors"``, ``"none"``...); None:
    #: the key is absent (logs before it, or no Adam).
    second_moment: str | None = None

    @property
    def dim(self) -> int:
        """Length of the layer's projected vector."""
        return self.k_out * self.k_in

    @classmethod
    def from_json(cls, entry: dict[str, Any], where: str = "layer") -> LayerEntry:
        try:
            name = _str(f"{where} name", entry["name"], LAYER_NAME)
            where = f"layer {name!r}"
            out_dim = _int(f"{where} out_dim", entry["out_dim"], 1, MAX_DIM)
            in_dim = _int(f"{where} in_dim", entry["in_dim"], 1, MAX_DIM)
            layer = cls(
                name=name,
                kind=entry["kind"] if entry["kind"] in LAYER_KINDS else _bad(f"{where} kind", entry["kind"]),
                out_dim=out_dim,
                in_dim=in_dim,
                k_out=_int(f"{where} k_out", entry["k_out"], 1, out_dim),
                k_in=_int(f"{where} k_in", entry["k_in"], 1, in_dim),
                seed_out=_int(f"{where} seed_out", entry["seed_out"], -(1 << 62)),
                seed_in=_int(f"{where} seed_in", entry["seed_in"], -(1 << 62)),
                has_bias=bool(entry.get("has_bias", False)),
                basis=str(entry.get("basis", "seeded")),
                parameters=entry.get("parameters"),
                tied=tuple(_str(f"{where} tied", t, LAYER_NAME) for t in entry.get("tied") or ()),
                second_moment=None if entry.get("second_moment") is None else str(entry["second_moment"]),
            )
        except KeyError as exc:
            raise ManifestError(f"{where} lacks {exc.args[0]!r}") from None
        except TypeError:
            raise ManifestError(f"{where} is not an object") from None
        if layer.basis not in ("seeded", "calibrated"):
            raise ManifestError(f"{where} basis must be 'seeded' or 'calibrated', got {layer.basis!r}")
        return layer

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tied"] = list(self.tied)
        if self.second_moment is None:
            del out["second_moment"]  # absent in the file: absent again
        return out


@dataclass(frozen=True)
class ShardEntry:
    """One shard file: consecutive steps ``first_step..last_step`` of one rank."""

    file: str
    first_step: int
    last_step: int
    num_rows: int
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ShardEntry:
        try:
            first = _int("shard first_step", entry["first_step"])
            return cls(
                file=_str("shard file", entry["file"]),
                first_step=first,
                last_step=_int(f"shard {entry['file']!r} last_step", entry["last_step"], first),
                num_rows=_int("shard num_rows", entry["num_rows"]),
                bytes=_int("shard bytes", entry["bytes"]),
                sha256=_str("shard sha256", entry["sha256"]),
            )
        except (KeyError, TypeError):
            raise ManifestError(f"malformed shard entry {entry!r}") from None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ShardIndexEntry:
    """A version-3 manifest's pointer to its rank's shard index (``shards.jsonl``).

    While recording only ``file`` is set; ``close()`` seals the index: ``num_shards``, ``bytes`` and
    ``sha256`` then describe it exactly, so a complete log whose index was truncated is refused.
    """

    file: str
    num_shards: int | None = None
    bytes: int | None = None
    sha256: str | None = None

    @property
    def sealed(self) -> bool:
        """True once the recorder was closed and recorded the index's final size and checksum."""
        return self.num_shards is not None

    @classmethod
    def from_json(cls, entry: Any, rank: int) -> ShardIndexEntry:
        from dvemb.formats.log_files import index_name

        if not isinstance(entry, dict):
            raise ManifestError("shard_index must be an object")
        expected = index_name(rank)
        if entry.get("file") != expected:
            raise ManifestError(f"shard_index file of rank {rank} must be {expected!r}, got {entry.get('file')!r}")
        sealed = [k for k in ("num_shards", "bytes", "sha256") if k in entry]
        if sealed and len(sealed) != 3:
            raise ManifestError("a sealed shard_index records num_shards, bytes and sha256 together")
        if not sealed:
            return cls(file=expected)
        return cls(
            file=expected,
            num_shards=_int("shard_index num_shards", entry["num_shards"]),
            bytes=_int("shard_index bytes", entry["bytes"]),
            sha256=_str("shard_index sha256", entry["sha256"]),
        )

    def to_json(self) -> dict[str, Any]:
        if not self.sealed:
            return {"file": self.file}
        return {"file": self.file, "num_shards": self.num_shards, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class QuerySetEntry:
    """One query set recorded at the final model."""

    name: str
    file: str
    num_queries: int
    step: int
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> QuerySetEntry:
        from dvemb.formats.log_files import QUERY_SET_NAME

        try:
            return cls(
                name=_str("query set name", entry["name"], QUERY_SET_NAME),
                file=_str("query set file", entry["file"]),
                num_queries=_int("query set num_queries", entry["num_queries"], 1),
                step=_int("query set step", entry["step"]),
                bytes=_int("query set bytes", entry["bytes"]),
                sha256=_str("query set sha256", entry["sha256"]),
            )
        except (KeyError, TypeError):
            raise ManifestError(f"malformed query set entry {entry!r}") from None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Manifest:
    """One rank's manifest. ``other`` keeps every key this class does not model (optimizer, provenance...).

    ``shards`` is the manifest's shard list: always there in versions 1 and 2; in version 3 the list is in
    the shard index, and ``shards`` is None for the manifest file as written (``shard_index`` points to
    the index) or the list once a reader merged the index in (what the reader and the server hold).
    """

    version: int
    rank: int
    world_size: int
    complete: bool
    dtype: str
    loss_reduction: str
    num_steps: int
    layers: tuple[LayerEntry, ...]
    shards: tuple[ShardEntry, ...] | None
    query_sets: tuple[QuerySetEntry, ...] = ()
    shard_index: ShardIndexEntry | None = None
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def total_dim(self) -> int:
        """Length of the concatenated projected vector of all layers."""
        return sum(layer.dim for layer in self.layers)

    # Fields kept in ``other`` (written by dvemb.formats.manifest_builder; docs/format.md), typed for readers.

    @property
    def model(self) -> str | None:
        """The recorded model's class name, when the recorder knew it."""
        value = self.other.get("model")
        return value if isinstance(value, str) else None

    @property
    def curvature(self) -> dict[str, Any]:
        """The curvature entry (``mode``, ``samples``, ``rows_per_example``, ``estimator``...); empty when absent."""
        value = self.other.get("curvature")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def curvature_mode(self) -> str | None:
        """``"ggn"``, ``"empirical"``..., or None for a log that does not say."""
        mode = self.curvature.get("mode")
        return str(mode) if mode is not None else None

    @property
    def optimizer(self) -> dict[str, Any]:
        """The optimizer entry (``type``, ``propagation``, groups, second moments); empty when not recorded."""
        value = self.other.get("optimizer")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def tracked_parameters(self) -> int | None:
        """Parameters of the tracked layers (None: not recorded)."""
        value = self.other.get("tracked_parameters")
        return int(value) if isinstance(value, int) else None

    @property
    def total_parameters(self) -> int | None:
        """Parameters of the whole model (None: not recorded)."""
        value = self.other.get("total_parameters")
        return int(value) if isinstance(value, int) else None

    @property
    def id_type(self) -> str | None:
        """``"int"`` or ``"str"``: the type of the example ids (None before the first step)."""
        value = self.other.get("id_type")
        return str(value) if value is not None else None

    @property
    def example_files(self) -> list[dict[str, Any]]:
        """The example-metadata files' entries (``file``, ``bytes``, ``sha256``...)."""
        value = self.other.get("example_files")
        return [dict(e) for e in value if isinstance(e, dict)] if isinstance(value, list) else []

    @property
    def projection_files(self) -> list[dict[str, Any]]:
        """The projection files' entries (learned bases), if any."""
        value = self.other.get("projection_files")
        return [dict(e) for e in value if isinstance(e, dict)] if isinstance(value, list) else []

    @classmethod
    def from_json(cls, data: Any, *, max_world_size: int = 4096) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError("a manifest must be a JSON object")
        modelled = {"version", "rank", "world_size", "complete", "dtype", "loss_reduction", "num_steps"}
        modelled |= {"layers", "shards", "query_sets", "shard_index"}
        try:
            world = _int("world_size", data["world_size"], 1, max_world_size)
            version = _int("version", data["version"], 1)
            rank = _int("rank", data["rank"], 0, world - 1)
            # Where the shards are listed follows from the keys: 'shards' (versions 1 and 2; version 3 once a
            # reader merged the index in) or the index 'shard_index' names (required from version 3).
            indexed = "shard_index" in data
            if version >= INDEXED_VERSION and not indexed:
                raise ManifestError(f"a version-{version} manifest names its shard index in 'shard_index'")
            shards = data["shards"] if "shards" in data or not indexed else None
            manifest = cls(
                version=version,
                rank=rank,
                world_size=world,
                complete=bool(data["complete"]),
                dtype=_str("dtype", data["dtype"]),
                loss_reduction=data["loss_reduction"]
                if data["loss_reduction"] in ("mean", "sum")
                else _bad("loss_reduction", data["loss_reduction"]),
                num_steps=_int("num_steps", data["num_steps"]),
                layers=tuple(
                    LayerEntry.from_json(e, f"layer {i}") for i, e in enumerate(_entries("layers", data["layers"]))
                ),
                shards=None if shards is None else tuple(ShardEntry.from_json(e) for e in _entries("shards", shards)),
                query_sets=tuple(
                    QuerySetEntry.from_json(e) for e in _entries("query_sets", data.get("query_sets", []))
                ),
                shard_index=ShardIndexEntry.from_json(data["shard_index"], rank) if indexed else None,
                other={k: v for k, v in data.items() if k not in modelled},
            )
        except KeyError as exc:
            raise ManifestError(f"manifest lacks {exc.args[0]!r}") from None
        if manifest.complete and manifest.shard_index is not None and not manifest.shard_index.sealed:
            raise ManifestError("a complete manifest seals its shard_index (num_shards, bytes, sha256)")
        names = [layer.name for layer in manifest.layers]
        if len(set(names)) != len(names):
            raise ManifestError("two layers have the same name")
        return manifest

    def to_json(self) -> dict[str, Any]:
        out = dict(self.other)
        out.update(
            {
                "version": self.version,
                "rank": self.rank,
                "world_size": self.world_size,
                "complete": self.complete,
                "dtype": self.dtype,
                "loss_reduction": self.loss_reduction,
                "num_steps": self.num_steps,
                "layers": [layer.to_json() for layer in self.layers],
                "query_sets": [q.to_json() for q in self.query_sets],
            }
        )
        if self.shards is not None:
            out["shards"] = [shard.to_json() for shard in self.shards]
        if self.shard_index is not None:
            out["shard_index"] = self.shard_index.to_json()
        return out


def _bad(where: str, value: Any) -> Any:
    raise ManifestError(f"{where} has an unknown value {value!r}")
