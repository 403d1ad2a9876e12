"""One call: replay a run and score every occurrence exactly to first order (docs/replay.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvemb.engine.removal import centre_steps
from dvemb.replay.engine import ReplayArguments, Replayer
from dvemb.replay.files import FORMAT, VERSION, Replay, rows_digest
from dvemb.replay.probe import linearity_probe, probe_rows, summarise_probe
from dvemb.replay.schedule import ReplaySchedule
from dvemb.replay.training import Examples, LossFn

__all__ = ["ReplaySpec", "replay"]


@dataclass
class ReplaySpec:
    """What ``dvemb replay --entry module:function`` needs from the user's code: ``function(log_dir)`` returns one.

    Attributes:
        model: the model at initialisation.
        optimizer: the run's optimizer in its initial state, over ``model``'s parameters.
        loss_fn: ``(forward, batch) -> (b,)`` per-example losses.
        examples: ``ids -> batch``.
        queries: query batches for ``loss_fn``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    examples: Examples
    queries: Sequence[Any]


def replay(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: ReplaySchedule,
    loss_fn: LossFn,
    examples: Examples,
    queries: Sequence[Any],
    arguments: ReplayArguments | None = None,
    *,
    query_set: str = "replay",
    work_dir: str | Path | None = None,
    on_saved: Callable[[Path], None] | None = None,
) -> Replay:
    """The exact first-order influence of every training occurrence on the queries.

    Args:
        model: the model at initialisation (the run's initial weights; not modified).
        optimizer: the run's optimizer in its initial state, over ``model``'s parameters (not stepped).
        schedule: the steps' example ids and rates (:func:`dvemb.replay.schedule_from_log`).
        loss_fn: ``(forward, batch) -> (b,)`` per-example losses; ``forward`` calls the model at replayed weights.
        examples: ``ids -> batch`` for ``loss_fn``.
        queries: query batches for ``loss_fn``.
        arguments: options (removal, checkpoints, micro-batches, query columns, probe).
        query_set: the name to save it under (the results' query set it is compared with).
        work_dir: where to keep checkpoints and finished adjoint segments (dvemb/replay/resume.py); a replay killed
            mid-way and run again with the same directory resumes from its last checkpoint or segment. None:
            memory only.
        on_saved: called with the path of each file written to ``work_dir`` (a service worker copies it to its
            storage, so that a replay taken over on another machine resumes from it).

    Returns:
        the replay: (R, K) scores in the engine's row order and the record (docs/results.md).
    """
    args = arguments or ReplayArguments()
    started = time.perf_counter()
    replayer = Replayer(
        model, optimizer, schedule, loss_fn, examples, queries, args, work_dir=work_dir, on_saved=on_saved
    )
    replayer.forward()
    training_steps = replayer.timings.steps_replayed
    weight_scores, query_losses = replayer.adjoint()
    row_step, ids = schedule.rows()
    scores = weight_scores
    if replayer.removal == "batch":
        scores = centre_steps(weight_scores, row_step, schedule.num_steps)
    numpy_scores = scores.numpy()
    probe_started = time.perf_counter()
    records = []
    if args.probe:
        rows = probe_rows(numpy_scores, args.probe, args.seed)
        records = linearity_probe(replayer, numpy_scores, rows, args.probe_scales)
    probe_seconds = time.perf_counter() - probe_started
    timings = replayer.timings
    summary: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "query_set": query_set,
        "removal": replayer.removal,
        "query_columns": args.query_columns,
        "num_queries": int(scores.shape[1]),
        "query_losses": [float(x) for x in query_losses],
        "steps": schedule.num_steps,
        "occurrences": int(scores.shape[0]),
        "rows_digest": rows_digest(row_step.tolist(), ids),
        "loss_reduction": schedule.loss_reduction,
        "optimizer": sorted({s.kind for s in replayer.optimizer.settings}),
        "checkpoint_every": replayer.every,
        "micro_batches": args.micro_batches,
        "dtype": str(replayer.initial.params[0].dtype).removeprefix("torch."),
        "autocast": args.autocast,
        "loss_gap": replayer.loss_gap(),
        "seconds": {
            "forward": timings.forward,
            "adjoint": timings.adjoint,
            "probe": probe_seconds,
            "total": time.perf_counter() - started,
        },
        # CPU seconds of this process: the forward and adjoint passes (other processes' load does not count).
        "cpu_seconds": {"forward": timings.forward_cpu, "adjoint": timings.adjoint_cpu},
        "cost_over_training": (timings.forward_cpu + timings.adjoint_cpu) / max(timings.forward_cpu, 1e-12),
        "forward_steps": training_steps,
        "queries_batched": replayer.pull.batched,
        "probe": {"scales": list(args.probe_scales), **summarise_probe(records), "records": records},
    }
    return Replay(query_set=query_set, scores=numpy_scores.astype("float64"), summary=summary)
