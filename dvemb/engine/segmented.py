"""Segmented computation (the paper's influence checkpointing): segments in parallel, combined exactly.

A segmented computation has three stages, each usable alone (the service runs them as Celery tasks,
``dvemb compute --segments K --workers W`` as a process pool):

1. :func:`prepare_segments` plans the boundaries (evenly spaced steps, plus every step at which a
   checkpoint query set was recorded) in ``segments/plan.json``.
2. :func:`run_segment` runs the recursion over one segment's steps from the identity and writes two
   files of its own (:func:`segment_file_names`): its rows' local embeddings,
   ``segments/segment-JJJJ.local.npy`` (seeds, rows, D), then, last, its propagator, per-step metadata
   and per-decile sums, ``segments/segment-JJJJ.safetensors``. Segments are independent and share no
   file, so they can run on machines that share no filesystem (the service moves the two files
   through its storage, worker/segments.py); a finished one is never redone, a killed one reruns alone.
3. :func:`combine_segments` walks the segments from the last to the first, scores each against the
   query vectors carried back over the later segments (:mod:`dvemb.engine.propagators`), rebuilds
   full embeddings when asked, and writes the same results as the sequential engine, plus the
   value dynamics of checkpoint query sets (``dynamics-{series}.safetensors``).

The combine step costs ``O(R D Q)`` for scoring (as the sequential engine) plus ``O(K D^2 (Q + D))``
to carry the vectors; it never multiplies embeddings by ``D x D`` matrices unless full embeddings
are asked for.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dvemb.atomic import replacing, write_text_atomic
from dvemb.engine.compute import (
    ComputeArguments,
    ProgressCallback,
    _fingerprint,
    _propagation,
    _Run,
    make_embedder,
)
from dvemb.engine.embedder import Embedder
from dvemb.engine.propagators import QueryState, SegmentPropagator, propagator_from_state
from dvemb.engine.query_sets import checkpoint_series
from dvemb.engine.removal import centre_steps
from dvemb.errors import ConfigError
from dvemb.formats.results_files import dynamics_file
from dvemb.reader import GradientLog, open_log

__all__ = [
    "DYNAMICS_BUCKETS",
    "SegmentPlan",
    "checkpoint_series",
    "combine_segments",
    "compute_segmented",
    "prepare_segments",
    "run_segment",
    "segment_done",
    "segment_file_names",
]

SEGMENTS_DIR = "segments"
#: In every plan's fingerprint: segment files of another layout (before each segment had its own local embeddings
#: and ``local_row_base``) are not taken for finished ones.
SEGMENT_FORMAT = "segments-v2"
PLAN_FILE = "plan.json"
#: Value dynamics groups training occurrences by the tenth of training they were used in.
DYNAMICS_BUCKETS = 10
_COMBINE_ROWS = 8192


@dataclass(frozen=True)
class SegmentPlan:
    """Boundaries ``b_0 = 0 < ... < b_K = T`` of a segmented computation (segment j: steps ``b_j..b_{j+1}-1``)."""

    boundaries: tuple[int, ...]
    fingerprint: str

    @property
    def num_segments(self) -> int:
        """K."""
        return len(self.boundaries) - 1

    def to_json(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries), "fingerprint": self.fingerprint}


def _plan(log: GradientLog, args: ComputeArguments, segments: int) -> SegmentPlan:
    steps = log.num_steps
    even = {round(i * steps / segments) for i in range(segments + 1)}
    checkpoints = {step for entries in checkpoint_series(log).values() for step, _ in entries}
    bounds = sorted({0, steps} | {b for b in even | checkpoints if 0 < b < steps})
    payload = _fingerprint(log, args) + json.dumps(bounds) + SEGMENT_FORMAT
    return SegmentPlan(tuple(bounds), hashlib.sha256(payload.encode()).hexdigest())


def _directory(out: Path) -> Path:
    return out / SEGMENTS_DIR


def segment_file_names(index: int) -> tuple[str, str]:
    """The files segment ``index`` writes in ``segments/``: its local embeddings, then (last: its presence with the
    plan's fingerprint says the segment is finished) its propagator and metadata."""
    return f"segment-{index:04d}.local.npy", f"segment-{index:04d}.safetensors"


def _segment_file(out: Path, index: int) -> Path:
    return _directory(out) / segment_file_names(index)[1]


def _local_file(out: Path, index: int) -> Path:
    return _directory(out) / segment_file_names(index)[0]


def _resolved(log: GradientLog, args: ComputeArguments) -> tuple[str, str]:
    mode = args.curvature or log.curvature_mode
    if mode == "ggn" and log.curvature_mode != "ggn":
        raise ConfigError("curvature='ggn' needs a log recorded with curvature='ggn'; this log is empirical")
    return mode, _propagation(log, args)


def prepare_segments(log_dir: str | Path, out_dir: str | Path, args: ComputeArguments, segments: int) -> SegmentPlan:
    """Plan the segments (finished segments are kept when the plan is unchanged).

    Returns:
        The plan (also written to ``segments/plan.json``).
    """
    if segments < 1:
        raise ConfigError(f"segments={segments}: need at least 1")
    if args.self_influence:
        raise ConfigError("self_influence is computed by the sequential engine only; drop --segments or the option")
    log = open_log(log_dir)
    out = Path(out_dir)
    plan = _plan(log, args, segments)
    directory = _directory(out)
    plan_path = directory / PLAN_FILE
    if plan_path.exists() and json.loads(plan_path.read_text()).get("fingerprint") == plan.fingerprint:
        return plan
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    _resolved(log, args)  # a log the options cannot compute is refused before any segment runs
    write_text_atomic(plan_path, json.dumps(plan.to_json()))
    return plan


def segment_done(out_dir: str | Path, plan: SegmentPlan, index: int) -> bool:
    """True when segment ``index`` of ``plan`` has finished (its file is written last, atomically)."""
    path = _segment_file(Path(out_dir), index)
    if not path.exists():
        return False
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("plan") == plan.fingerprint


def run_segment(
    log_dir: str | Path, out_dir: str | Path, args: ComputeArguments, plan: SegmentPlan, index: int
) -> Path:
    """Run segment ``index`` of ``plan`` (made by :func:`prepare_segments`); nothing to do when it is done.

    Returns:
        The segment's file.
    """
    out = Path(out_dir)
    path = _segment_file(out, index)
    if segment_done(out, plan, index):
        return path
    _directory(out).mkdir(parents=True, exist_ok=True)
    log = open_log(log_dir)
    mode, propagation = _resolved(log, args)
    embedder = make_embedder(log, args, mode, propagation, seeded=True)
    first, stop = plan.boundaries[index], plan.boundaries[index + 1]
    shard_offsets = np.cumsum([0, *(log.num_rows(i) for i in range(log.num_shards()))])
    overlapping = [
        i for i, entry in enumerate(log.info.shards or ()) if entry.last_step >= first and entry.first_step < stop
    ]
    # The local file's row 0 is the first row of the segment's first shard: its rows of earlier steps (at most one
    # shard's) stay zero, so that the rows' places need no shard read before the recursion.
    row_base = int(shard_offsets[overlapping[0]]) if overlapping else 0
    rows = int(shard_offsets[overlapping[-1] + 1]) - row_base if overlapping else 0
    dtype = np.float64 if args.accumulate_dtype == "float64" else np.float32
    with replacing(_local_file(out, index), unique=True) as local_path:  # two workers may run it (a takeover)
        local = np.lib.format.open_memmap(
            local_path, mode="w+", dtype=dtype, shape=(embedder.num_seeds, rows, embedder.total_dim)
        )
        places = {i: int(shard_offsets[i]) - row_base for i in overlapping}
        sums, counts, lr, batch, loss = _run_steps(log, embedder, first, stop, places, local)
        local.flush()
        del local
    tensors = {
        **embedder.state(),
        "lr": lr,
        "batch_size": batch,
        "loss": loss,
        "bucket_sums": sums,
        "bucket_counts": counts,
        "local_row_base": torch.tensor(row_base, dtype=torch.int64),
    }
    meta = {"plan": plan.fingerprint, "process": f"{socket.gethostname()}:{os.getpid()}"}
    with replacing(path, unique=True) as tmp:  # a segment may be written by two workers at once (a takeover)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def _run_steps(
    log: GradientLog, embedder: Embedder, first: int, stop: int, shards: dict[int, int], local: np.ndarray
) -> tuple[torch.Tensor, ...]:
    """The recursion over steps ``first..stop-1``, last shard first; ``shards`` maps each shard that holds them to
    the row of ``local`` (S, rows, D) where its rows go. Returns the per-decile sums and counts and the steps'
    rates, batch sizes and losses."""
    total_steps = max(log.num_steps, 1)
    count = stop - first
    lr = torch.zeros(count, dtype=torch.float64)
    batch = torch.zeros(count, dtype=torch.int64)
    loss = torch.full((count,), float("nan"), dtype=torch.float64)
    sums = torch.zeros(embedder.num_seeds, DYNAMICS_BUCKETS, embedder.total_dim, dtype=torch.float64)
    counts = torch.zeros(DYNAMICS_BUCKETS, dtype=torch.int64)
    for shard_index in sorted(shards, reverse=True):
        shard = log.read_shard(shard_index)
        base = int(shard.steps[0])
        lo, hi = max(first - base, 0), min(stop - base, len(shard.steps))
        lr[base + lo - first : base + hi - first] = shard.lr[lo:hi, 0]
        batch[base + lo - first : base + hi - first] = shard.batch_size[lo:hi]
        loss[base + lo - first : base + hi - first] = shard.loss[lo:hi]
        offset = shards[shard_index]
        for s0, s1, r0, r1 in embedder.chunks(shard, lo, hi):
            embedding = embedder.embed(shard, s0, s1, r0, r1)  # (S, n, D)
            local[:, offset + r0 : offset + r1] = embedding.cpu().numpy()
            bucket = (shard.row_step[r0:r1] * DYNAMICS_BUCKETS) // total_steps
            sums.index_add_(1, bucket, embedding.double().cpu())
            counts += torch.bincount(bucket, minlength=DYNAMICS_BUCKETS)
    return sums, counts, lr, batch, loss


class _CombinedRun(_Run):
    """The sequential run's scoring, aggregates and files, fed from finished segments."""

    def __init__(self, log: GradientLog, out: Path, args: ComputeArguments, plan: SegmentPlan) -> None:
        super().__init__(log, out, args, None)
        self.plan = plan
        self.seeded = make_embedder(log, args, self.mode, self.propagation, seeded=True)
        self.lifts_second_moment = False  # a segment's seeds span the projected state only

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self._open_arrays(resume=False)
        self._write_index()
        states = {name: QueryState(self.seeded, s.matrix) for name, s in self.scorers.items()}
        rebuild = QueryState.identity(self.seeded) if self.embeddings is not None else None
        series = self._series_states()
        bounds = self.plan.boundaries
        processes = []
        for index in range(self.plan.num_segments - 1, -1, -1):
            path = _segment_file(self.out, index)
            with safe_open(str(path), framework="pt") as f:
                processes.append((f.metadata() or {}).get("process", ""))
            segment = load_file(str(path))
            first, stop = bounds[index], bounds[index + 1]
            self.step_lr[first:stop], self.step_batch[first:stop] = segment["lr"], segment["batch_size"].double()
            self.step_loss[first:stop] = segment["loss"]
            local = np.load(_local_file(self.out, index), mmap_mode="r")  # (S, rows, D) from the row below
            self._score_segment(local, int(segment["local_row_base"]), first, stop, states, rebuild)
            del local
            for scorer in self.scorers.values():
                self._apply_totals(scorer, *self._settle_totals(scorer))
            for dyn in series.values():
                dyn.add_segment(index, stop, segment)
            propagators = propagator_from_state(self.seeded, segment)
            for state in [*states.values(), *([rebuild] if rebuild is not None else [])]:
                state.propagate(propagators)
            for dyn in series.values():
                dyn.propagate(propagators)
        dynamics = {}
        for name, dyn in series.items():
            tensors = dyn.tensors()
            save_file(tensors, str(self.out / dynamics_file(name)))
            mean = [[None if v != v else v for v in row] for row in tensors["mean"].tolist()]  # NaN -> null (JSON)
            dynamics[name] = {
                "checkpoints": dyn.steps,
                "query_sets": dyn.names,
                "buckets": [
                    [first, last]
                    for first, last in zip(
                        tensors["bucket_first_step"].tolist(), tensors["bucket_last_step"].tolist(), strict=True
                    )
                ],
                "mean": mean,
                "count": tensors["count"].tolist(),
            }
        extra = {
            "segments": self.plan.num_segments,
            "boundaries": list(bounds),
            "segment_processes": processes[::-1],  # host:pid that ran each segment
            "dynamics": dynamics,
        }
        return self._finish(time.monotonic() - started, extra)

    def _score_segment(
        self,
        local: np.ndarray,
        row_base: int,
        first: int,
        stop: int,
        states: dict[str, QueryState],
        rebuild: QueryState | None,
    ) -> None:
        """Score the rows of steps ``first..stop-1``; ``local`` (S, rows, D) holds them from global row ``row_base``."""
        row_step = self.row_step.numpy()
        lo, hi = np.searchsorted(row_step, [first, stop])
        start = int(lo)
        while start < hi:
            end = min(int(hi), start + _COMBINE_ROWS)
            if end < hi:  # whole steps only: the curves are written per step
                end = int(np.searchsorted(row_step, row_step[end], side="left"))
                if end <= start:
                    end = int(np.searchsorted(row_step, row_step[start], side="right"))
            chunk = torch.from_numpy(np.array(local[:, start - row_base : end - row_base]))  # (S, n, D), a copy
            rows = torch.arange(start, end)
            row_steps = self.row_step[start:end]
            steps = torch.arange(int(row_steps[0]), int(row_steps[-1]) + 1)
            for name, scorer in self.scorers.items():
                self._score_rows(scorer, states[name].score(chunk), rows, row_steps, steps)
            if rebuild is not None and self.embeddings is not None:
                full = rebuild.rebuild(chunk)
                if self.removal == "batch":
                    full = centre_steps(full, row_steps - steps[0], len(steps))
                if self.embeddings.dtype == np.float16:  # torch casts to float16 much faster than numpy
                    full = full.half()
                self.embeddings[start:end] = full.numpy()
            start = end

    def _series_states(self) -> dict[str, _Dynamics]:
        bounds = self.plan.boundaries
        finals = set(self.scorers)
        out = {}
        for name, entries in checkpoint_series(self.log).items():
            checkpoints = [(step, set_name) for step, set_name in entries if step > 0]
            if name in finals:
                checkpoints.append((self.log.num_steps, name))
            if checkpoints:
                out[name] = _Dynamics(self, checkpoints, [bounds.index(step) for step, _ in checkpoints])
        return out


class _Dynamics:
    """Mean influence, on each checkpoint of a series, of the occurrences of each tenth of training before it."""

    def __init__(self, run: _CombinedRun, checkpoints: list[tuple[int, str]], ends: list[int]) -> None:
        self.run, self.ends = run, ends
        self.steps = [step for step, _ in checkpoints]
        self.names = [name for _, name in checkpoints]
        self.sums = torch.zeros(len(checkpoints), DYNAMICS_BUCKETS, dtype=torch.float64)
        self.counts = torch.zeros(len(checkpoints), DYNAMICS_BUCKETS, dtype=torch.int64)
        self.states: dict[int, QueryState] = {}

    def add_segment(self, index: int, stop: int, segment: dict[str, torch.Tensor]) -> None:
        """Start the checkpoints that end this segment; add the segment to every started checkpoint."""
        for c, end in enumerate(self.ends):
            if end == index + 1:
                queries = self.run.log.load_query_set(self.names[c])
                matrix = torch.cat([queries.grads[layer.name] for layer in self.run.log.layers], dim=1)
                self.states[c] = QueryState(self.run.seeded, matrix.double().mean(0, keepdim=True))
        for c, state in self.states.items():
            self.sums[c] += state.score(segment["bucket_sums"])[:, 0]  # (buckets,)
            self.counts[c] += segment["bucket_counts"]

    def propagate(self, propagators: list[SegmentPropagator]) -> None:
        for state in self.states.values():
            state.propagate(propagators)

    def tensors(self) -> dict[str, torch.Tensor]:
        total = max(self.run.num_steps, 1)
        edges = [(b * total + DYNAMICS_BUCKETS - 1) // DYNAMICS_BUCKETS for b in range(DYNAMICS_BUCKETS + 1)]
        mean = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), torch.full_like(self.sums, torch.nan))
        return {
            "checkpoint_step": torch.tensor(self.steps, dtype=torch.int64),
            "bucket_first_step": torch.tensor(edges[:-1], dtype=torch.int64),
            "bucket_last_step": torch.tensor(edges[1:], dtype=torch.int64) - 1,
            "mean": mean.contiguous(),
            "count": self.counts.contiguous(),
        }


def combine_segments(
    log_dir: str | Path, out_dir: str | Path, args: ComputeArguments, plan: SegmentPlan, *, keep_scratch: bool = False
) -> dict[str, Any]:
    """Score every finished segment, write the results and the summary, remove the scratch files."""
    log = open_log(log_dir)
    out = Path(out_dir)
    missing = [j for j in range(plan.num_segments) if not segment_done(out, plan, j)]
    if missing:
        raise ConfigError(f"segments {missing} of the plan are not finished; run them before combining")
    summary = _CombinedRun(log, out, args, plan).run()
    if not keep_scratch:
        shutil.rmtree(_directory(out), ignore_errors=True)
    return summary


def _segment_worker(
    log_dir: str, out_dir: str, args: dict[str, Any], plan: dict[str, Any], index: int, threads: int
) -> int:
    torch.set_num_threads(threads)
    arguments = ComputeArguments(**{**args, "query_sets": tuple(args["query_sets"]) if args["query_sets"] else None})
    run_segment(log_dir, out_dir, arguments, SegmentPlan(tuple(plan["boundaries"]), plan["fingerprint"]), index)
    return index


def compute_segmented(
    log_dir: Path, out: Path, args: ComputeArguments, *, progress: ProgressCallback | None, workers: int
) -> dict[str, Any]:
    """Prepare, run every segment (``workers`` processes; inline for one) and combine."""
    plan = prepare_segments(log_dir, out, args, args.segments)
    todo = [j for j in range(plan.num_segments) if not segment_done(out, plan, j)]
    if workers <= 1:
        for j in reversed(todo):
            run_segment(log_dir, out, args, plan, j)
    else:
        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [
                pool.submit(_segment_worker, str(log_dir), str(out), asdict(args), plan.to_json(), j, threads)
                for j in todo
            ]
            for future in futures:
                future.result()
    return combine_segments(log_dir, out, args, plan)
