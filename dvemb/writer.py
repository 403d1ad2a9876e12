"""Streaming, crash-safe writer of gradient logs (see docs/format.md).

Steps are buffered until a shard's worth of bytes is reached, then written to a temporary file,
fsynced and renamed into place; only then is the shard's record appended to the rank's shard index
(``shards.jsonl``: one line, one write, fsync). A process killed at any moment therefore leaves a valid
log that ends at the last complete shard, and memory is bounded by one shard whatever the run length.

The manifest holds only run-level fields and is rewritten (atomically) on rare events: when a run-level
field changed (the optimizer is described at the first step, a skipped step), a query set or example file
is added, and at close, which seals the index (its final size and sha256). What is written per shard is
one index line, so the metadata a run writes grows linearly with its length (bench/log_metadata.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file

from dvemb import formats
from dvemb import logformat as fmt
from dvemb.atomic import replacing, write_bytes_atomic
from dvemb.errors import ConfigError
from dvemb.formats import index_line, index_name
from dvemb.formats.manifest_builder import ManifestBuilder

__all__ = ["LogWriter", "StepRecord", "sha256_file", "write_json_atomic"]


@dataclass
class StepRecord:
    """Everything recorded about one optimizer step.

    Attributes:
        step: global step number (0-based, consecutive).
        ids: example ids of the step's rows, in row order.
        lr: learning rate per tracked layer, (n_layers,).
        weight_decay: weight decay per tracked layer, (n_layers,).
        loss: training loss of the step, or None when not logged.
        grads: layer name -> (B, d_l) projected per-example gradients.
        curvature: layer name -> (B, C, d_l) curvature factors (ggn mode), else empty.
        optimizer: shard tensor name -> this step's value: ``opt.<scalar>`` (n_layers,) float64 and
            per-layer optimizer state such as ``opt.precond.<layer>`` (docs/format.md); empty for plain SGD.
    """

    step: int
    ids: Sequence[int | str]
    lr: list[float]
    weight_decay: list[float]
    loss: float | None
    grads: dict[str, torch.Tensor]
    curvature: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _record_bytes(record: StepRecord) -> int:
    tensors = (*record.grads.values(), *record.curvature.values(), *record.optimizer.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` through a fsynced temporary file and an atomic rename."""
    with replacing(path, durable=True) as tmp, tmp.open("w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)


def _file_entry(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


class LogWriter:
    """Writes one rank's part of a gradient log.

    Args:
        directory: the log directory (created if missing).
        manifest: the static part of the manifest (layers, projection, optimizer, ...).
        rank: this process's rank (0 when not distributed).
        dtype: storage dtype of gradients, one of ``float32``, ``float16``, ``bfloat16``.
        shard_bytes: a shard is written once its buffered gradients reach this many bytes.
        shard_steps: if set, a shard is written every ``shard_steps`` steps instead (use it in
            distributed runs with unequal local batch sizes so that ranks' shards stay aligned).
        overwrite: replace an existing log in ``directory`` instead of refusing.
    """

    def __init__(
        self,
        directory: str | Path,
        manifest: dict[str, Any],
        *,
        rank: int = 0,
        dtype: str = "float32",
        shard_bytes: int = 256 << 20,
        shard_steps: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.storage_dtype = fmt.STORAGE_DTYPES[dtype]
        self.shard_bytes = shard_bytes
        self.shard_steps = shard_steps
        self._prepare_directory(overwrite)
        self.manifest: dict[str, Any] = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.FORMAT_VERSION,
            "rank": rank,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "complete": False,
            "dtype": dtype,
            "id_type": None,
            "num_steps": 0,
            **manifest,
            "shard_index": {"file": index_name(rank)},
            "query_sets": [],
            "example_files": [],
        }
        #: The run-level fields a recorder describes while recording (dvemb.formats.manifest_builder).
        self.build = ManifestBuilder(self.manifest)
        self._index_path = self.directory / index_name(rank)
        self._index_bytes = 0  # bytes of complete records in the index
        self._num_shards = 0  # shards listed in the index (touched by the background thread only)
        self._num_steps = 0  # steps those shards hold
        self._saved_manifest = ""  # the manifest text last written or queued for writing
        self._pending: list[StepRecord] = []
        self._pending_bytes = 0
        self._next_step = 0
        # Shards are serialised, hashed and fsynced on one background thread while training goes on;
        # memory holds at most the shard being written and the one being filled.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvemb-writer")
        self._inflight: Future[None] | None = None
        self._failed: list[StepRecord] = []  # records of a shard whose write failed, to retry
        self._examples: list[dict[str, Any]] = []
        self._examples_bytes = 0
        self._closed = False
        self._write_bytes_atomic(self._index_path.name, b"")  # before the manifest that names it
        self._save_manifest()

    # -- directory and manifest -------------------------------------------------------------------

    def _prepare_directory(self, overwrite: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / fmt.rank_manifest_name(self.rank)
        if manifest_path.exists() and not overwrite:
            raise ConfigError(
                f"{self.directory} already holds a gradient log ({manifest_path.name}); "
                "choose a new directory or pass overwrite=True to replace it"
            )
        if overwrite:
            # Remove only files this writer would create: never anything else the directory holds.
            patterns = (
                ["shard-*", "shards*.jsonl*", "queries-*", "examples-*", "manifest*.json*"]
                if self.rank == 0
                else [f"shard-r{self.rank}-*", f"{index_name(self.rank)}*", f"{fmt.rank_manifest_name(self.rank)}*"]
            )
            for pattern in patterns:
                for old in self.directory.glob(pattern):
                    if old.is_file():
                        old.unlink()

    def _manifest_text(self) -> str:
        return json.dumps(self.manifest, indent=1)

    def _save_manifest(self) -> None:
        """Write the manifest now (training thread, no shard write in flight)."""
        self.manifest["num_steps"] = self._num_steps
        self._saved_manifest = self._manifest_text()
        self._write_manifest_text(self._saved_manifest)

    def _write_manifest_text(self, text: str) -> None:
        self._write_bytes_atomic(fmt.rank_manifest_name(self.rank), text.encode("utf-8"))

    def _append_index(self, entry: dict[str, Any]) -> None:
        """Append one shard's record to the index: one write, then fsync.

        A record is valid only with its newline, so a crash mid-write leaves a partial last line that
        readers drop. A partial line left by a failed append in this process is cut off first, so that
        the retried record starts on a line of its own.
        """
        line = index_line(entry)
        fd = os.open(self._index_path, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size != self._index_bytes:
                os.ftruncate(fd, self._index_bytes)
            written = 0
            while written < len(line):
                written += os.pwrite(fd, line[written:], self._index_bytes + written)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._index_bytes += len(line)

    def _write_bytes_atomic(self, name: str, data: bytes) -> None:
        write_bytes_atomic(self.directory / name, data, durable=True)

    def _write_tensors_atomic(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        final = self.directory / name
        with replacing(final, durable=True) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        return final

    # -- steps ------------------------------------------------------------------------------------

    def accept_step(self, record: StepRecord) -> None:
        """Check and buffer one step (raises ConfigError, and buffers nothing, when it cannot be recorded)."""
        self._check_open()
        if record.step != self._next_step:
            raise ConfigError(f"step {record.step} appended where step {self._next_step} was expected")
        kind = fmt.id_type(record.ids)
        if self.manifest["id_type"] is None:
            self.manifest["id_type"] = kind
        elif kind != self.manifest["id_type"]:
            raise ConfigError(
                f"step {record.step} has {kind} example ids but earlier steps had {self.manifest['id_type']} ids; "
                "use one id type for the whole run"
            )
        record.grads = {k: v.detach().to("cpu", self.storage_dtype) for k, v in record.grads.items()}
        record.curvature = {k: v.detach().to("cpu", self.storage_dtype) for k, v in record.curvature.items()}
        # Scalars stay float64 (exact step counts and rates); per-layer state is stored like gradients.
        record.optimizer = {
            k: v.detach().to("cpu", torch.float64 if k in fmt.OPTIMIZER_SCALARS else self.storage_dtype)
            for k, v in record.optimizer.items()
        }
        self._pending.append(record)
        self._next_step += 1
        self._pending_bytes += _record_bytes(record)

    def flush_if_full(self) -> None:
        """Hand a full buffer to the background writer (re-raises a previous write's error here)."""
        full = len(self._pending) >= self.shard_steps if self.shard_steps else self._pending_bytes >= self.shard_bytes
        if full:
            self._submit_shard()

    def _submit_shard(self) -> None:
        self._wait()  # first: if the previous write failed, the buffered steps stay buffered
        records, self._pending, self._pending_bytes = self._pending, [], 0
        # Run-level fields the training thread changed since the manifest was last written (the optimizer
        # described at the first step, a skipped step) go to disk with this shard; usually nothing changed.
        text = self._manifest_text()
        changed = text if text != self._saved_manifest else None
        self._saved_manifest = text
        self._inflight = self._executor.submit(self._write_shard, records, changed)

    def _wait(self) -> None:
        """Wait for the shard being written; re-raise its error here, in the training thread.

        The steps of a shard that failed to write go back to the front of the buffer, so the next flush
        retries them and the log stays continuous.
        """
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            try:
                inflight.result()
            except BaseException:
                self._pending = self._failed + self._pending
                self._pending_bytes = sum(_record_bytes(r) for r in self._pending)
                self._failed = []
                self._saved_manifest = ""  # the manifest may not have been written: write it with the retry
                raise

    def flush(self) -> None:
        """Write buffered steps (and example metadata) to disk now, and wait until they are."""
        self._check_open()
        if self._pending:
            self._submit_shard()
        self._wait()
        if self._examples:
            self._write_examples()

    def _write_shard(self, records: list[StepRecord], manifest_text: str | None = None) -> None:
        try:
            self._write_shard_now(records)
        except BaseException:
            self._failed = records  # not in the index: retried with the next shard
            raise
        if manifest_text is not None:  # the shard is in the log whatever happens here
            self._write_manifest_text(manifest_text)

    def _write_shard_now(self, records: list[StepRecord]) -> None:
        layers = list(records[0].grads)
        row_step = torch.cat([torch.full((len(r.ids),), r.step, dtype=torch.int64) for r in records])
        all_ids = [i for r in records for i in r.ids]
        nan = float("nan")
        tensors: dict[str, torch.Tensor] = {
            "steps": torch.tensor([r.step for r in records], dtype=torch.int64),
            "batch_size": torch.tensor([len(r.ids) for r in records], dtype=torch.int64),
            "lr": torch.tensor([r.lr for r in records], dtype=torch.float64),
            "weight_decay": torch.tensor([r.weight_decay for r in records], dtype=torch.float64),
            "loss": torch.tensor([nan if r.loss is None else r.loss for r in records], dtype=torch.float64),
            "row_step": row_step,
            **fmt.encode_ids(all_ids),
        }
        for layer in layers:
            tensors[fmt.grad_key(layer)] = torch.cat([r.grads[layer] for r in records])
            if records[0].curvature:
                tensors[fmt.curvature_key(layer)] = torch.cat([r.curvature[layer] for r in records])
        for key in records[0].optimizer:
            tensors[key] = torch.stack([r.optimizer[key] for r in records])
        name = fmt.shard_name(self.rank, self._num_shards)
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": fmt.FORMAT_NAME})
        self._write_bytes_atomic(name, data)
        entry = {
            "file": name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "first_step": records[0].step,
            "last_step": records[-1].step,
            "num_rows": int(row_step.numel()),
        }
        self._append_index(entry)  # only now is the shard part of the log
        self._num_shards += 1
        self._num_steps = records[-1].step + 1

    # -- query sets and example metadata ----------------------------------------------------------

    def write_query_set(self, name: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Write a named query set (replacing one of the same name) and list it in the manifest."""
        self._check_open()
        self._wait()
        stored = {
            k: (v.to("cpu", self.storage_dtype) if v.is_floating_point() and k.startswith("grad.") else v.cpu())
            for k, v in tensors.items()
        }
        path = self._write_tensors_atomic(formats.query_file_name(name), stored, {"info": json.dumps(info)})
        entry = _file_entry(path)
        entry.update(name=name, num_queries=int(info["num_queries"]), step=int(info["step"]))
        self.manifest["query_sets"] = [q for q in self.manifest["query_sets"] if q["name"] != name] + [entry]
        self._save_manifest()

    def write_projection(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Write the calibrated projection bases (before any shard) and list the file in the manifest."""
        self._check_open()
        if self._num_shards or self._pending or self._inflight is not None:
            raise ConfigError("the projection must be written before the first step is recorded")
        self.manifest["projection"] = info
        if self.rank == 0:  # every rank holds the same bases; rank 0's manifest lists the one file
            path = self._write_tensors_atomic(
                fmt.PROJECTION_FILE, {k: v.to("cpu", torch.float64).contiguous() for k, v in tensors.items()}, {}
            )
            self.manifest["projection_files"] = [_file_entry(path)]
        self._save_manifest()

    def add_examples(self, records: list[dict[str, Any]], *, flush_bytes: int = 8 << 20) -> None:
        """Buffer example metadata records; written as JSON lines with the next shard or at close."""
        self._check_open()
        self._examples.extend(records)
        self._examples_bytes += sum(len(json.dumps(r)) for r in records)
        if self._examples_bytes >= flush_bytes:
            self._write_examples()

    def _write_examples(self) -> None:
        self._wait()
        index = len(self.manifest["example_files"])
        final = self.directory / formats.examples_file_name(index, self.rank)
        with replacing(final, durable=True) as tmp, tmp.open("w", encoding="utf-8") as f:
            for record in self._examples:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        entry = _file_entry(final)
        entry["num_examples"] = len(self._examples)
        self.manifest["example_files"].append(entry)
        self._examples, self._examples_bytes = [], 0
        self._save_manifest()

    # -- closing ----------------------------------------------------------------------------------

    def close(self, updates: dict[str, Any] | None = None) -> None:
        """Write what is buffered, merge ``updates`` into the manifest, seal the shard index (its final
        size and sha256, so that a truncated index of a complete log is refused) and mark the log complete."""
        if self._closed:
            return
        self.flush()
        self.manifest.update(updates or {})
        self.manifest["shard_index"] = {
            "file": self._index_path.name,
            "num_shards": self._num_shards,
            "bytes": self._index_bytes,
            "sha256": sha256_file(self._index_path),
        }
        self.manifest["complete"] = True
        self._save_manifest()
        self._closed = True
        self._executor.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("the log writer is closed; start a new Recorder to record more")
