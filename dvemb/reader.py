"""Validating reader of gradient logs (see docs/format.md).

Nothing in a log is trusted: the manifest's version and structure, the shard index, each file's
header, size, sha256, tensor names, shapes and dtypes, the finiteness of every value and the continuity
of steps are all checked, and each failure raises its own :mod:`dvemb.errors` class naming the file.
Shards are read one at a time (forwards or backwards), so memory is bounded by one shard;
a distributed run's ranks are merged step by step. A shard's bytes are read once: its sha256 is
computed over the same mapped pages the tensors are loaded from, on a second thread while the
tensors are checked, and nothing of the shard is returned before the checksum matched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mmap
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dvemb import formats
from dvemb import logformat as fmt
from dvemb.errors import (
    ChecksumError,
    HeaderMismatchError,
    LogFormatError,
    LogVersionError,
    NonFiniteValueError,
    StepContinuityError,
    TruncatedFileError,
)
from dvemb.formats.ids import check_ids, repeated_in_step, unsafe_character
from dvemb.formats.manifest import LayerEntry, Manifest, ManifestError
from dvemb.formats.shard_index import ParsedIndex, ShardIndexError, parse_shard_index
from dvemb.optim import PROPAGATIONS
from dvemb.projection import LayerProjection

__all__ = [
    "GradientLog",
    "LayerInfo",
    "QuerySet",
    "ShardData",
    "check_index_file",
    "check_manifest_file",
    "check_rank_manifest",
    "layers_from_manifest",
    "open_log",
]


@dataclass(frozen=True)
class LayerInfo:
    """A tracked layer as described by the manifest."""

    name: str
    kind: str
    projection: LayerProjection

    @property
    def dim(self) -> int:
        """Length of the layer's projected gradient."""
        return self.projection.dim


@dataclass
class ShardData:
    """The contents of one shard (or of aligned shards of all ranks, merged), gradients as float32.

    Attributes:
        steps: (S,) consecutive global step numbers.
        batch_size: (S,) rows per step.
        lr: (S, n_layers) learning rate per step and layer.
        weight_decay: (S, n_layers) weight decay per step and layer.
        loss: (S,) training loss (NaN where not logged).
        row_step: (R,) step of each row, non-decreasing.
        example_ids: R example ids.
        grads: layer -> (R, d_l).
        curvature: layer -> (R, C, d_l); empty in empirical mode.
        optimizer: the optimizer's per-step tensors of a version-2 log whose propagation needs them:
            ``opt.<scalar>`` (S, n_layers) float64 and ``opt.precond.<layer>`` (S, d_l) or
            ``opt.v_row.<layer>`` (S, out_dim) and ``opt.v_col.<layer>`` (S, in_dim) (docs/format.md);
            empty otherwise.
    """

    steps: torch.Tensor
    batch_size: torch.Tensor
    lr: torch.Tensor
    weight_decay: torch.Tensor
    loss: torch.Tensor
    row_step: torch.Tensor
    example_ids: list[int] | list[str]
    grads: dict[str, torch.Tensor]
    curvature: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class QuerySet:
    """Gradients of a named query set at the final model.

    Attributes:
        name: the set's name.
        ids: Q query ids.
        grads: layer -> (Q, d_l) float32.
        loss: (Q,) loss of each query at the final model.
        labels: (Q,) integer labels, or None.
        texts: Q texts, or None.
        step: number of training steps taken before the queries were recorded.
    """

    name: str
    ids: list[int] | list[str]
    grads: dict[str, torch.Tensor]
    loss: torch.Tensor
    labels: torch.Tensor | None
    texts: list[str] | None
    step: int


_T = TypeVar("_T")
MAX_WORLD_SIZE = 4096
#: sha256 releases the GIL: a shard's checksum is computed here while the reading thread checks its tensors.
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvemb-sha256")
MAX_MANIFEST_BYTES = formats.MAX_MANIFEST_BYTES
MAX_INDEX_BYTES = formats.MAX_INDEX_BYTES
MAX_IMAGE_VALUES = 128 * 128 * 4
_ID_KEYS = ("example_id", "example_id_utf8", "example_id_offsets")
_REQUIRED = (
    "format",
    "version",
    "rank",
    "world_size",
    "complete",
    "dtype",
    "layers",
    "loss_reduction",
    "curvature",
    "num_steps",
)


def _load_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LogFormatError(path, "missing: this is not a dvemb gradient log (no manifest)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise LogFormatError(
            path, f"manifest of {path.stat().st_size} bytes; a manifest holds at most {MAX_MANIFEST_BYTES} bytes"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise LogFormatError(path, f"manifest is not valid JSON ({exc})") from None
    except RecursionError:  # arrays or objects nested thousands deep: no manifest is
        raise LogFormatError(path, "manifest is not a dvemb manifest (JSON nested too deeply to read)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        raise LogFormatError(path, f"not a dvemb gradient log manifest (format is not {fmt.FORMAT_NAME!r})")
    version = manifest.get("version")
    if version not in fmt.READABLE_VERSIONS:
        raise LogVersionError(
            path,
            f"format version {version!r} is not supported (this dvemb reads versions "
            f"{', '.join(map(str, fmt.READABLE_VERSIONS))}); upgrade dvemb or re-record the log",
        )
    # Shards are listed in the manifest (versions 1 and 2) or in the shard index it names (version 3).
    listing = "shard_index" if version >= 3 or "shard_index" in manifest else "shards"
    required = (*_REQUIRED, listing)
    missing = [k for k in required if k not in manifest]
    if missing:
        raise LogFormatError(path, f"manifest lacks {', '.join(missing)}")
    if manifest["dtype"] not in fmt.STORAGE_DTYPES:
        raise LogFormatError(path, f"unknown storage dtype {manifest['dtype']!r}")
    _check_model_name(path, manifest.get("model"))
    try:
        Manifest.from_json(manifest, max_world_size=MAX_WORLD_SIZE)  # types, ranges, names (dvemb.formats)
    except ManifestError as exc:
        raise LogFormatError(path, f"malformed manifest: {exc}") from None
    return manifest


def _check_model_name(path: Path, model: Any) -> None:
    """The manifest's ``model`` (the model's class name, shown with the run) is short printable text."""
    if model is None:
        return
    if not isinstance(model, str) or len(model) > 200 or re.search(r"[\x00-\x1f\x7f]", model):
        raise LogFormatError(path, "'model' must be the model's class name: text of at most 200 printable characters")
    unsafe = unsafe_character(model)
    if unsafe is not None:
        raise LogFormatError(path, f"'model' holds {unsafe} (NUL or a bidirectional override); remove it")


def check_rank_manifest(first: dict[str, Any], manifest: dict[str, Any], rank: int, path: str | Path) -> None:
    """Check that ``manifest`` (read from ``path``, the file of rank ``rank``) belongs to the run of rank 0's
    manifest ``first``: it is that rank, of rank 0's world size, with rank 0's storage dtype, id type, loss
    reduction and tracked layers (else the merged steps would mix two runs).

    Raises:
        LogFormatError: naming the first disagreement.
    """
    path = Path(path)
    if manifest["rank"] != rank or manifest["world_size"] != first["world_size"]:
        raise LogFormatError(
            path,
            f"holds rank {manifest['rank']} of world size {manifest['world_size']}, but {fmt.MANIFEST} records "
            f"world size {first['world_size']} and this is rank {rank}'s file: it belongs to another run",
        )
    for key in ("dtype", "id_type", "loss_reduction"):
        if manifest.get(key) != first.get(key):
            raise LogFormatError(
                path, f"{key} is {manifest.get(key)!r}, {first.get(key)!r} in {fmt.MANIFEST}: it belongs to another run"
            )

    def layers(m: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [(e.get("name"), e.get("k_out"), e.get("k_in")) for e in m["layers"]]

    if layers(manifest) != layers(first):
        raise LogFormatError(path, f"tracks other layers than {fmt.MANIFEST}: it belongs to another run")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _with_shard_list(directory: Path, rank: int, manifest: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The manifest with its ``shards`` list and ``num_steps``, and the bytes of a partial last index record
    that were dropped.

    Versions 1 and 2 list shards in the manifest. Version 3 lists them in the rank's shard index; a closed
    log's manifest records the index's size, sha256 and shard count (a truncated index is refused), while
    an index still being written (or left by a crash) may end with a partial record, which is dropped.
    """
    pointer = manifest.get("shard_index")
    if pointer is None:
        return manifest, 0
    path = directory / str(pointer["file"])
    if not path.is_file():
        raise LogFormatError(path, "missing: the manifest lists its shards in this index; copy or upload it too")
    data = _index_bytes(path)
    sealed = "num_shards" in pointer
    if sealed and len(data) != int(pointer["bytes"]):
        raise TruncatedFileError(
            path,
            f"the manifest of the closed log records {pointer['bytes']} bytes but the shard index holds {len(data)}: "
            "it was truncated or changed after recording; restore it from the recording machine",
        )
    if sealed and (digest := hashlib.sha256(data).hexdigest()) != pointer["sha256"]:
        raise ChecksumError(path, f"sha256 is {digest}, the manifest records {pointer['sha256']}; the index is corrupt")
    parsed = _parsed_index(path, data, rank, sealed=sealed)
    entries = parsed.entries
    num_steps = int(entries[-1]["last_step"]) + 1 if entries else 0
    if sealed and (len(entries), num_steps) != (int(pointer["num_shards"]), int(manifest["num_steps"])):
        raise LogFormatError(
            path,
            f"lists {len(entries)} shards of {num_steps} steps, the manifest records "
            f"{pointer['num_shards']} shards of {manifest['num_steps']} steps",
        )
    return {**manifest, "shards": entries, "num_steps": num_steps}, parsed.torn_bytes


def _layer_info(path: Path, entry: Any) -> LayerInfo:
    try:
        layer = LayerEntry.from_json(entry)
    except ManifestError as exc:
        raise LogFormatError(path, f"malformed layer entry in manifest: {exc}") from None
    projection = LayerProjection(
        out_dim=layer.out_dim,
        in_dim=layer.in_dim,
        k_out=layer.k_out,
        k_in=layer.k_in,
        seed_out=layer.seed_out,
        seed_in=layer.seed_in,
    )
    return LayerInfo(name=layer.name, kind=layer.kind, projection=projection)


def layers_from_manifest(manifest: dict[str, Any], path: str | Path = fmt.MANIFEST) -> list[LayerInfo]:
    """The tracked layers (with their projections) described by a manifest."""
    return [_layer_info(Path(path), entry) for entry in manifest["layers"]]


class GradientLog:
    """A gradient log opened for reading.

    Args:
        directory: the log directory.

    Raises:
        LogFormatError (or a subclass): the manifest is missing, malformed or of another version.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        first = _load_manifest(self.directory / fmt.MANIFEST)
        self.world_size = int(first["world_size"])
        on_disk = [first] + [
            _load_manifest(self.directory / fmt.rank_manifest_name(r)) for r in range(1, self.world_size)
        ]
        for rank, manifest in enumerate(on_disk[1:], 1):
            check_rank_manifest(first, manifest, rank, self.directory / fmt.rank_manifest_name(rank))
        # Each rank's manifest with its shard list (version 3: read from its shard index), as version 2 had it.
        listed = [_with_shard_list(self.directory, rank, m) for rank, m in enumerate(on_disk)]
        self.rank_manifests = [manifest for manifest, _ in listed]
        self._torn_index_bytes = sum(torn for _, torn in listed)
        self.manifest = self.rank_manifests[0]  # the JSON as written (with its shard list); ``info``: typed
        self._info: Manifest | None = None
        manifest_path = self.directory / fmt.MANIFEST
        # Names and sizes, enough to check every file; a calibrated projection's bases load on first use.
        self._shapes = layers_from_manifest(self.manifest, manifest_path)
        self._layers: list[LayerInfo] | None = None
        self.dtype = fmt.STORAGE_DTYPES[self.manifest["dtype"]]
        self._check_shard_list()

    @property
    def info(self) -> Manifest:
        """Rank 0's manifest, typed (dvemb.formats.Manifest), with its shard list (version 3: read from its index)."""
        if self._info is None:
            self._info = Manifest.from_json(self.manifest, max_world_size=MAX_WORLD_SIZE)
        return self._info

    @property
    def rank_infos(self) -> list[Manifest]:
        """Every rank's manifest, typed, with its shard list."""
        return [self.info] + [Manifest.from_json(m, max_world_size=MAX_WORLD_SIZE) for m in self.rank_manifests[1:]]

    @property
    def layers(self) -> list[LayerInfo]:
        """The tracked layers with their projections (a calibrated one's bases read and checked once)."""
        if self._layers is None:
            files = self.manifest.get("projection_files") or []
            self._layers = self._with_bases(self._checked_file(files[0])) if files else self._shapes
        return self._layers

    def _with_bases(self, path: Path) -> list[LayerInfo]:
        """The layers with the calibrated bases of the projection file at ``path``, checked."""
        tensors = load_file(str(path))
        layers = []
        for layer, entry in zip(self._shapes, self.manifest["layers"], strict=True):
            p = layer.projection
            bases: dict[str, torch.Tensor | None] = {"out": None, "in": None}
            if entry.get("basis") == "calibrated":
                for side, dim, k in (("out", p.out_dim, p.k_out), ("in", p.in_dim, p.k_in)):
                    key = fmt.basis_key(side, layer.name)
                    if key in tensors:
                        bases[side] = self._finite(path, key, self._tensor(path, tensors, key, (dim, k), torch.float64))
                if bases["out"] is None and bases["in"] is None:
                    raise HeaderMismatchError(path, f"layer {layer.name!r} is calibrated but the file has no basis")
            projection = replace(p, basis_out=bases["out"], basis_in=bases["in"])
            layers.append(LayerInfo(layer.name, layer.kind, projection))
        return layers

    # -- summary ----------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Number of steps the log holds (common to all ranks)."""
        return min(int(m["shards"][-1]["last_step"]) + 1 if m["shards"] else 0 for m in self.rank_manifests)

    def digest(self) -> str:
        """sha256 of the log as listed when it was opened: every rank's manifest with its shard list (each
        shard's size and sha256 included). It changes whenever the log's content does; a version-3 log still
        being recorded grows in its shard index, not in its manifest, so the manifest's bytes alone do not."""
        return hashlib.sha256(json.dumps(self.rank_manifests, sort_keys=True).encode()).hexdigest()

    @property
    def complete(self) -> bool:
        """True when every rank's recorder was closed normally."""
        return all(bool(m["complete"]) for m in self.rank_manifests)

    @property
    def propagation(self) -> str:
        """How influence is propagated through the optimizer (a key of :data:`dvemb.optim.PROPAGATIONS`).

        Version-1 logs carry no optimizer state: anything but plain SGD uses the SGD proxy.
        """
        optimizer = self.manifest.get("optimizer") or {}
        if int(self.manifest["version"]) < 2 or "propagation" not in optimizer:
            return "sgd" if optimizer.get("exact_sgd", True) else "proxy"
        propagation = str(optimizer["propagation"])
        if propagation not in PROPAGATIONS:
            raise LogFormatError(
                self.directory / fmt.MANIFEST,
                f"optimizer propagation {propagation!r} is not one of {', '.join(PROPAGATIONS)}; re-record the log",
            )
        return propagation

    @property
    def loss_reduction(self) -> str:
        """``"mean"`` or ``"sum"``: how the training loss reduced per-example losses within a step."""
        return str(self.manifest["loss_reduction"])

    @property
    def curvature_mode(self) -> str:
        """``"empirical"`` or ``"ggn"``."""
        return str(self.manifest["curvature"]["mode"])

    def end_note(self) -> str:
        """One sentence on where the log ends and whether it is complete."""
        n = self.num_steps
        if self.complete:
            return f"complete log of {n} steps"
        last = self.manifest["shards"][-1]["file"] if self.manifest["shards"] else None
        where = f"after the last complete shard {last}" if last else "before any shard was complete"
        if self._torn_index_bytes:
            where += (
                f" (a partial record of {self._torn_index_bytes} bytes at the end of the shard index, "
                "from the interrupted write, was ignored)"
            )
        return (
            (
                f"incomplete log: recording stopped {where}; it holds steps 0 to {n - 1} ({n} steps) "
                "and later steps were not saved"
            )
            if n
            else f"incomplete log: recording stopped {where}; it holds no steps"
        )

    # -- shards -----------------------------------------------------------------------------------

    def _check_shard_list(self) -> None:
        for rank, manifest in enumerate(self.rank_manifests):
            _check_shard_entries(self.directory / fmt.rank_manifest_name(rank), manifest["shards"])
        if self.world_size > 1:
            ranges = [[(e["first_step"], e["last_step"]) for e in m["shards"]] for m in self.rank_manifests]
            shortest = min(len(r) for r in ranges)
            if any(r[:shortest] != ranges[0][:shortest] for r in ranges):
                raise LogFormatError(
                    self.directory,
                    "the ranks' shards cover different step ranges; record with the same shard_steps on every rank",
                )

    def num_shards(self) -> int:
        """Number of (merged) shards that :meth:`iter_shards` yields."""
        return min(len(m["shards"]) for m in self.rank_manifests)

    def iter_shards(self, *, reverse: bool = False) -> Iterator[ShardData]:
        """Yield shards, each fully validated, from the first step (or the last with ``reverse``)."""
        order = range(self.num_shards() - 1, -1, -1) if reverse else range(self.num_shards())
        for index in order:
            yield self.read_shard(index)

    def read_index(self, index: int) -> tuple[torch.Tensor, list[int] | list[str]]:
        """Step and example id of every row of the ``index``-th (merged) shard, without loading gradients.

        Headers are checked; checksums and values are checked when the shard itself is read.
        """
        steps: list[torch.Tensor] = []
        ids: list[Any] = []
        for rank in range(self.world_size):
            entry = self.rank_manifests[rank]["shards"][index]
            path = self._listed_file(entry)  # a missing shard is named, with the log it should be in
            header, _, _ = fmt.read_safetensors_header(path)
            with safe_open(str(path), framework="pt") as f:
                steps.append(f.get_tensor("row_step"))
                ids.extend(
                    self._ids(
                        path, {k: f.get_tensor(k) for k in header if k.startswith("example_id")}, int(entry["num_rows"])
                    )
                )
        row_step = torch.cat(steps)
        order = torch.sort(row_step, stable=True).indices
        return row_step[order], [ids[i] for i in order.tolist()]

    def num_rows(self, index: int) -> int:
        """Rows of the ``index``-th (merged) shard."""
        return sum(int(m["shards"][index]["num_rows"]) for m in self.rank_manifests)

    def read_shard(self, index: int) -> ShardData:
        """Read, validate and (across ranks) merge the ``index``-th shard."""
        parts = [self._read_rank_shard(rank, index) for rank in range(self.world_size)]
        return parts[0] if len(parts) == 1 else _merge_ranks(parts)

    def _read_rank_shard(self, rank: int, index: int, path: Path | None = None) -> ShardData:
        entry = self.rank_manifests[rank]["shards"][index]
        checked = self._listed_file(entry, path)
        # One read of the bytes: the tensors are views of the file's mapped pages and the checksum is taken
        # over the same pages, on the hashing thread, while the tensors are checked.
        return _verified(checked, entry, lambda: self._shard_data(checked, entry, load_file(str(checked))))

    def _shard_data(self, path: Path, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ShardData:
        """A shard's tensors checked against its entry and the manifest."""
        first, last = int(entry["first_step"]), int(entry["last_step"])
        expected_steps = torch.arange(first, last + 1)
        steps = self._tensor(path, tensors, "steps", (len(expected_steps),), torch.int64)
        if not torch.equal(steps, expected_steps):
            raise StepContinuityError(path, f"steps are not the consecutive range {first} to {last}")
        num_steps, num_rows, n_layers = len(expected_steps), int(entry["num_rows"]), len(self._shapes)
        batch_size = self._tensor(path, tensors, "batch_size", (num_steps,), torch.int64)
        row_step = self._tensor(path, tensors, "row_step", (num_rows,), torch.int64)
        if int(batch_size.sum()) != num_rows or not torch.equal(row_step, steps.repeat_interleave(batch_size)):
            raise StepContinuityError(path, "rows do not match the per-step batch sizes")
        lr = self._finite(path, "lr", self._tensor(path, tensors, "lr", (num_steps, n_layers), torch.float64))
        weight_decay = self._finite(
            path, "weight_decay", self._tensor(path, tensors, "weight_decay", (num_steps, n_layers), torch.float64)
        )
        grads, curvature = {}, {}
        for layer in self._shapes:
            key = fmt.grad_key(layer.name)
            grads[layer.name] = self._finite(
                path, key, self._tensor(path, tensors, key, (num_rows, layer.dim), self.dtype)
            )
            if self.curvature_mode == "ggn":
                key = fmt.curvature_key(layer.name)
                factors = self._tensor(path, tensors, key, None, self.dtype)
                if factors.dim() != 3 or factors.shape[0] != num_rows or factors.shape[2] != layer.dim:
                    raise HeaderMismatchError(
                        path, f"{key} has shape {tuple(factors.shape)}, expected ({num_rows}, C, {layer.dim})"
                    )
                curvature[layer.name] = self._finite(path, key, factors)
        optimizer = self._optimizer_tensors(path, tensors, num_steps)
        known = {"steps", "batch_size", "row_step", "lr", "weight_decay", "loss", *_ID_KEYS, *fmt.OPTIMIZER_SCALARS}
        known |= {
            fmt.optimizer_layer_key(w, n) for w in fmt.OPTIMIZER_LAYER_TENSORS for n in grads
        }  # (unused ones too)
        known |= {fmt.grad_key(n) for n in grads} | {fmt.curvature_key(n) for n in curvature}
        _refuse_unknown_tensors(path, tensors, known)
        return ShardData(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            loss=_no_infinity(path, "loss", self._tensor(path, tensors, "loss", (num_steps,), torch.float64)),
            row_step=row_step,
            example_ids=_unique_per_step(path, self._ids(path, tensors, num_rows), row_step),
            grads=grads,
            curvature=curvature,
            optimizer=optimizer,
        )

    def _optimizer_tensors(
        self, path: Path, tensors: dict[str, torch.Tensor], num_steps: int
    ) -> dict[str, torch.Tensor]:
        """The optimizer state the log's propagation needs, checked for shape and finiteness."""
        propagation = self.propagation
        if propagation not in ("momentum", "adam", "adamw"):
            return {}
        n_layers = len(self._shapes)
        out = {
            key: self._finite(path, key, self._tensor(path, tensors, key, (num_steps, n_layers), torch.float64))
            for key in fmt.OPTIMIZER_SCALARS
        }
        if propagation == "momentum":
            return out
        for layer, entry in zip(self._shapes, self.manifest["layers"], strict=True):
            p = layer.projection
            stored_whole = p.is_identity and entry.get("basis") != "calibrated"
            whole = [(what, p.dim) for what in fmt.WHOLE_LAYER_ADAM_TENSORS]
            parts = whole if stored_whole else [("v_row", p.out_dim), ("v_col", p.in_dim)]
            for what, size in parts:
                key = fmt.optimizer_layer_key(what, layer.name)
                value = self._finite(path, key, self._tensor(path, tensors, key, (num_steps, size), self.dtype))
                if what in ("precond", "v_row", "v_col") and bool((value < 0).any()):
                    raise HeaderMismatchError(path, f"{key} holds negative values; it must be a second moment")
                out[key] = value
            if not stored_whole:
                out.update(self._lifted_second_moment(path, tensors, num_steps, layer.name, p))
                out.update(self._second_moment_factors(path, tensors, num_steps, layer.name, p))
        return out

    def _lifted_second_moment(
        self, path: Path, tensors: dict[str, torch.Tensor], num_steps: int, name: str, p: LayerProjection
    ) -> dict[str, torch.Tensor]:
        """A projected layer's second-moment sensitivity, step gradient and (since "lifted-moments") Adam's
        preconditioner in its own coordinates, (S, out_dim * in_dim) each (``dvemb.optim.LIFTED_SECOND_MOMENT_MAX``);
        none for larger layers and in logs recorded before them."""
        keys = [fmt.optimizer_layer_key(what, name) for what in ("vsens", "batch_grad")]
        if not any(key in tensors for key in keys):
            return {}
        precond = fmt.optimizer_layer_key("precond", name)
        if precond in tensors:  # logs since the first moment is lifted too ("lifted-moments")
            keys.append(precond)
        size = p.out_dim * p.in_dim
        return {
            key: self._finite(path, key, self._tensor(path, tensors, key, (num_steps, size), self.dtype))
            for key in keys
        }

    def _second_moment_factors(
        self, path: Path, tensors: dict[str, torch.Tensor], num_steps: int, name: str, p: LayerProjection
    ) -> dict[str, torch.Tensor]:
        """A projected layer's second-moment factors (dvemb.low_rank), (S, R, out_dim) and (S, R, in_dim) pairs
        with one R; none in logs recorded before them or with ``second_moment_rank=0``."""
        out: dict[str, torch.Tensor] = {}
        for left, right in fmt.SECOND_MOMENT_FACTORS:
            left_key, right_key = fmt.optimizer_layer_key(left, name), fmt.optimizer_layer_key(right, name)
            if left_key not in tensors and right_key not in tensors:
                continue
            rank = int(tensors[left_key].shape[1]) if left_key in tensors and tensors[left_key].dim() == 3 else 0
            for key, size in ((left_key, p.out_dim), (right_key, p.in_dim)):
                value = self._tensor(path, tensors, key, (num_steps, rank, size), self.dtype)
                out[key] = self._finite(path, key, value)
        return out

    # -- validation helpers -----------------------------------------------------------------------

    def _checked_file(self, entry: dict[str, Any], path: Path | None = None) -> Path:
        """Path of a listed file after checking its name, header, size and sha256.

        ``path``: where the file's bytes are, when not in the log directory (an upload being validated).
        """
        path = self._listed_file(entry, path)
        _check_digest(path, entry, _sha256(path))
        return path

    def _listed_file(self, entry: dict[str, Any], path: Path | None = None) -> Path:
        """Path of a listed file after checking its name, header and size (not its checksum)."""
        name = str(entry["file"])
        path = path or self.directory / name
        if Path(name).name != name or not path.is_file():
            raise LogFormatError(path, "listed in the manifest but missing from the log directory")
        if name.endswith(".safetensors"):
            # Bounded by what the manifest implies, before anything is loaded: a header listing a million empty
            # tensors would otherwise cost gigabytes to load and reject.
            limit = 32 + 8 * len(self._shapes)
            header, _, _ = fmt.read_safetensors_header(path, max_header_bytes=(1 << 16) + 4096 * limit)
            if len(header) > limit:
                raise HeaderMismatchError(path, f"{len(header)} tensors; a file of this log holds at most {limit}")
        size = path.stat().st_size
        if size != int(entry["bytes"]):
            raise TruncatedFileError(path, f"the log records {entry['bytes']} bytes but the file holds {size}")
        return path

    @staticmethod
    def _tensor(
        path: Path, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...] | None, dtype: torch.dtype
    ) -> torch.Tensor:
        if key not in tensors:
            raise HeaderMismatchError(path, f"tensor {key!r} is missing")
        t = tensors[key]
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
            raise HeaderMismatchError(
                path, f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, the manifest implies {dtype} {shape}"
            )
        return t

    @staticmethod
    def _finite(path: Path, key: str, t: torch.Tensor) -> torch.Tensor:
        # The sum of values is NaN or infinite when one of them is (and, rarely, when finite values overflow):
        # one pass without the mask isfinite() builds (24x faster on a 128 MB tensor); the mask only to count.
        total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        if not bool(torch.isfinite(total)):
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise NonFiniteValueError(path, f"tensor {key!r} holds {bad} NaN or infinite values")
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    @staticmethod
    def _ids(path: Path, tensors: dict[str, torch.Tensor], count: int) -> list[int] | list[str]:
        try:
            ids = fmt.decode_ids(tensors)
            check_ids(ids)
        except (KeyError, UnicodeDecodeError, ValueError) as exc:
            raise HeaderMismatchError(path, f"example ids cannot be used: {exc}") from None
        if len(ids) != count:
            raise HeaderMismatchError(path, f"{len(ids)} example ids for {count} rows")
        return ids

    # -- query sets and examples ------------------------------------------------------------------

    def query_set_names(self) -> list[str]:
        """Names of the recorded query sets."""
        return [str(q["name"]) for q in self.manifest.get("query_sets", [])]

    def load_query_set(self, name: str, path: Path | None = None) -> QuerySet:
        """Load and validate a query set by name (``path``: its bytes, when not in the log directory)."""
        entries = [q for q in self.manifest.get("query_sets", []) if q["name"] == name]
        if not entries:
            raise LogFormatError(self.directory, f"no query set named {name!r}; the log has {self.query_set_names()}")
        path = self._checked_file(entries[0], path)
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("info", "{}"))
        tensors = load_file(str(path))
        n = int(entries[0]["num_queries"])
        grads = {
            layer.name: self._finite(
                path,
                fmt.grad_key(layer.name),
                self._tensor(path, tensors, fmt.grad_key(layer.name), (n, layer.dim), self.dtype),
            )
            for layer in self._shapes
        }
        labels = self._tensor(path, tensors, "labels", (n,), torch.int64) if "labels" in tensors else None
        texts = info.get("texts")
        return QuerySet(
            name=name,
            ids=self._ids(path, tensors, n),
            grads=grads,
            loss=self._finite(path, "loss", self._tensor(path, tensors, "loss", (n,), torch.float64)),
            labels=labels,
            texts=list(texts) if texts is not None else None,
            step=int(entries[0]["step"]),
        )

    def iter_examples(self) -> Iterator[dict[str, Any]]:
        """Yield example metadata records (id, and any of text, label, source, image as uint8 array), every rank's
        files in rank order."""
        for manifest in self.rank_manifests:
            for entry in manifest.get("example_files", []):
                yield from self._example_records(entry)

    def _example_records(self, entry: dict[str, Any], path: Path | None = None) -> Iterator[dict[str, Any]]:
        path = self._checked_file(entry, path)
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):  # not JSON, or nested thousands deep
                    raise LogFormatError(path, f"line {line_number} is not JSON (or nested too deeply)") from None
                if not isinstance(record, dict) or "id" not in record:
                    raise LogFormatError(path, f"line {line_number} is not an example record with an 'id'")
                _check_record_texts(path, line_number, record)
                if "image" in record:
                    record["image"] = _decode_image(path, line_number, record["image"])
                yield record

    def validate_file(self, name: str, path: Path) -> None:
        """Fully validate one file the manifests list, whose bytes are at ``path``.

        Raises:
            LogFormatError (or a subclass) naming the problem; also when ``name`` is not listed.
        """
        for rank, manifest in enumerate(self.rank_manifests):
            for index, entry in enumerate(manifest["shards"]):
                if entry["file"] == name:
                    self._read_rank_shard(rank, index, path)
                    return
        for query_set in self.manifest.get("query_sets", []):
            if query_set["file"] == name:
                self.load_query_set(str(query_set["name"]), path)
                return
        for entry in (e for m in self.rank_manifests for e in m.get("example_files", [])):
            if entry["file"] == name:
                for _ in self._example_records(entry, path):
                    pass
                return
        for entry in self.manifest.get("projection_files", []):
            if entry["file"] == name:
                self._with_bases(self._checked_file(entry, path))
                return
        raise LogFormatError(path, f"{name} is not listed in the log's manifests")

    def validate(self) -> None:
        """Read every file of the log once and raise on the first problem."""
        for _ in self.iter_shards():
            pass
        for name in self.query_set_names():
            self.load_query_set(name)
        for _ in self.iter_examples():
            pass


def _check_record_texts(path: Path, line_number: int, record: dict[str, Any]) -> None:
    """An example record's id is a usable id, and its texts (text, label, source) hold no NUL nor bidirectional
    override: the dashboard shows them, the database stores them."""
    example_id = record["id"]
    if isinstance(example_id, bool) or not isinstance(example_id, int | str):
        raise LogFormatError(path, f"line {line_number}: the id must be an integer or a string")
    try:
        check_ids([example_id])
    except ValueError as exc:
        raise LogFormatError(path, f"line {line_number}: {exc}") from None
    for key in ("text", "label", "source"):
        value = record.get(key)
        unsafe = unsafe_character(value) if isinstance(value, str) else None
        if unsafe is not None:
            raise LogFormatError(
                path,
                f"line {line_number} (example {record['id']!r}): its {key} holds {unsafe} (NUL, or a bidirectional "
                "override that makes the shown text read otherwise); remove it before rec.describe(...)",
            )


def _decode_image(path: Path, line_number: int, image: Any) -> np.ndarray:
    """A stored image as a uint8 array, or a LogFormatError naming the line (docs/format.md: (H, W) or
    (H, W, C), at most 128 x 128 x 4 values)."""
    malformed = LogFormatError(path, f"line {line_number}: malformed image (needs 'shape' and matching 'base64')")
    try:
        shape = [int(v) for v in image["shape"]]
    except (KeyError, TypeError, ValueError):
        raise malformed from None
    if len(shape) not in (2, 3) or min(shape) < 1 or int(np.prod(shape)) > MAX_IMAGE_VALUES:
        raise LogFormatError(
            path,
            f"line {line_number}: image of shape {shape}; images are (H, W) or (H, W, C) with at most "
            f"{MAX_IMAGE_VALUES} values",
        )
    try:
        pixels = np.frombuffer(base64.b64decode(image["base64"], validate=True), dtype=np.uint8)
        return pixels.reshape(shape)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise malformed from None


def _sha256(path: Path) -> str:
    """Hex sha256 of a file through a read-only mapping: no copy of the bytes, and the pages it reads are
    the ones a safetensors load of the same file maps."""
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as pages:
            return hashlib.sha256(pages).hexdigest()


def _check_digest(path: Path, entry: dict[str, Any], digest: str) -> None:
    if digest != entry["sha256"]:
        raise ChecksumError(path, f"sha256 is {digest}, the log records {entry['sha256']}; the file is corrupt")


def _verified(path: Path, entry: dict[str, Any], parse: Callable[[], _T]) -> _T:
    """``parse()`` of a listed file while its sha256 is computed on the hashing thread; the result only once
    the checksum matched. When parsing fails and the checksum does not match, the file is reported as
    corrupt (the cause) rather than by the symptom parsing met."""
    digest: Future[str] = _HASHER.submit(_sha256, path)
    try:
        result = parse()
    except Exception:
        _check_digest(path, entry, digest.result())
        raise
    _check_digest(path, entry, digest.result())
    return result


def _refuse_unknown_tensors(path: Path, tensors: dict[str, torch.Tensor], known: set[str]) -> None:
    """A shard holds exactly the tensors its manifest implies: anything else is refused, not carried along."""
    extra = sorted(set(tensors) - known)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise HeaderMismatchError(path, f"unexpected tensor(s) {shown}; a shard holds only what docs/format.md lists")


def _no_infinity(path: Path, name: str, values: torch.Tensor) -> torch.Tensor:
    """``values`` when none is infinite (NaN is allowed: a step whose loss was not logged)."""
    if bool(torch.isinf(values).any()):
        raise NonFiniteValueError(path, f"{name} holds an infinite value")
    return values


def _unique_per_step(path: Path, ids: list[int] | list[str], row_step: torch.Tensor) -> list[int] | list[str]:
    """The ids of a rank's shard, each at most once per step (a step's rows are its distinct examples)."""
    if ids and isinstance(ids[0], int):  # the usual case, without a Python loop: sorted (step, id) pairs
        pairs = np.stack([row_step.numpy(), np.asarray(ids, dtype=np.int64)], axis=1)  # (R, 2)
        if len(np.unique(pairs, axis=0)) == len(ids):
            return ids
    seen: set[tuple[int, object]] = set()
    for step, example in zip(row_step.tolist(), ids, strict=True):
        if (step, example) in seen:
            raise HeaderMismatchError(path, repeated_in_step(example, step))
        seen.add((step, example))
    return ids


def _merge_ranks(parts: list[ShardData]) -> ShardData:
    """Merge aligned shards of all ranks: a step's rows are rank 0's rows, then rank 1's, ..."""
    first = parts[0]
    for part in parts[1:]:
        if not torch.equal(part.lr, first.lr):
            raise LogFormatError("<ranks>", "ranks recorded different learning rates for the same steps")
    row_step = torch.cat([p.row_step for p in parts])
    order = torch.sort(row_step, stable=True).indices  # stable: rank order within a step
    ids: list[Any] = [i for p in parts for i in p.example_ids]
    return ShardData(
        steps=first.steps,
        batch_size=sum((p.batch_size for p in parts), torch.zeros_like(first.batch_size)),
        lr=first.lr,
        weight_decay=first.weight_decay,
        loss=torch.stack([p.loss for p in parts]).mean(0),
        optimizer=first.optimizer,  # the optimizer state is the same on every rank
        row_step=row_step[order],
        example_ids=[ids[i] for i in order.tolist()],
        grads={k: torch.cat([p.grads[k] for p in parts])[order] for k in first.grads},
        curvature={k: torch.cat([p.curvature[k] for p in parts])[order] for k in first.curvature},
    )


def check_manifest_file(path: str | Path) -> dict[str, Any]:
    """Validate one manifest file on its own (format, version, keys, layers, shard step ranges).

    Returns:
        The parsed manifest.
    """
    path = Path(path)
    manifest = _load_manifest(path)
    layers_from_manifest(manifest, path)
    world, rank = manifest.get("world_size"), manifest.get("rank")
    if not (isinstance(world, int) and isinstance(rank, int) and 1 <= world <= MAX_WORLD_SIZE and 0 <= rank < world):
        raise LogFormatError(
            path,
            f"world_size {world!r} and rank {rank!r} must be integers, 1 <= world_size <= "
            f"{MAX_WORLD_SIZE}, 0 <= rank < world_size",
        )
    if "shards" in manifest:  # version 3 lists shards in the shard index (check_index_file)
        _check_shard_entries(path, manifest["shards"])
    return manifest


def check_index_file(path: str | Path, name: str) -> list[dict[str, Any]]:
    """Validate one rank's shard index, named ``name`` in the log, on its own (records well formed, in order,
    consecutive steps from 0).

    A partial last record is dropped (the log may be incomplete); the rank's manifest decides, when the two
    are read together, whether the index must be whole.

    Returns:
        The shard entries.
    """
    path = Path(path)
    entries = _parsed_index(path, _index_bytes(path), formats.index_rank(name), sealed=False).entries
    _check_shard_entries(path, entries)
    return entries


def _index_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise LogFormatError(path, f"shard index of {size} bytes; an index holds at most {MAX_INDEX_BYTES} bytes")
    return path.read_bytes()


def _parsed_index(path: Path, data: bytes, rank: int, *, sealed: bool) -> ParsedIndex:
    try:
        return parse_shard_index(data, rank, sealed=sealed)
    except ShardIndexError as exc:
        raise LogFormatError(path, str(exc)) from None


def _check_shard_entries(path: Path, shards: list[Any]) -> None:
    """Each shard entry is well formed and the entries cover consecutive steps from 0."""
    next_step = 0
    for entry in shards:
        try:
            first, last = int(entry["first_step"]), int(entry["last_step"])
            str(entry["file"]), int(entry["bytes"]), str(entry["sha256"]), int(entry["num_rows"])
        except (KeyError, TypeError, ValueError):
            raise LogFormatError(path, f"malformed shard entry {entry!r}") from None
        if first != next_step or last < first:
            raise StepContinuityError(
                path, f"shard {entry['file']} covers steps {first} to {last}, expected it to start at {next_step}"
            )
        next_step = last + 1


def open_log(directory: str | Path) -> GradientLog:
    """Open a gradient log for reading; see :class:`GradientLog`."""
    return GradientLog(directory)
