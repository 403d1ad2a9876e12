"""What optimizer-exact influence costs: recorder overhead and engine time under momentum and Adam,
each as a ratio to plain SGD measured in the same run (BENCHMARKS.md, "Optimizer-exact speed").

- Recorder: the models of :mod:`bench.recorder_overhead` (digits MLP, 4-layer transformer LM),
  trained with SGD and with Adam, each with and without the recorder (empirical mode, default
  ``proj_dim=256``). Configurations run interleaved in rounds; the overhead of an optimizer is the
  median over rounds of (recorded step / plain step with the same optimizer). Target (issue 9):
  Adam's overhead within 1.2x of SGD's.
- Engine: ``compute()`` on synthetic logs written with the real writer (25 layers of 128 x 129
  projected to 16 x 16, batch 32, ``steps`` steps, empirical curvature, float32, per-layer blocks)
  that differ only in their optimizer state: plain SGD (the blocked recursion), SGD with momentum,
  Adam and AdamW (the step-by-step optimizer recursion). Target: Adam within 2x of SGD.

Run from the repository root: ``.venv/bin/python -m bench.optimizer_speed``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dvemb
from bench.engine_speed import synthetic_writer
from bench.harness import provenance, replace_section, save_json
from bench.recorder_overhead import Batch, ce_loss, digits_task, lm_task
from dvemb import logformat as fmt
from dvemb.engine import ComputeArguments, compute
from dvemb.writer import StepRecord

SECTION = "Optimizer-exact speed"


# -- recorder -------------------------------------------------------------------------------------


class Run:
    """One configuration: its own model copy, optimizer, and recorder or none."""

    def __init__(self, base: nn.Module, optimizer: str, recorded: bool, work: Path, lr: float) -> None:
        self.model = copy.deepcopy(base).train()
        self.opt: torch.optim.Optimizer = (
            torch.optim.Adam(self.model.parameters(), lr=lr * 0.02)
            if optimizer == "adam"
            else torch.optim.SGD(self.model.parameters(), lr=lr)
        )
        self.rec = dvemb.Recorder(self.model, work, shard_size_mb=4, overwrite=True) if recorded else None

    def step(self, batch: Batch) -> float:
        x, y, ids = batch
        start = time.perf_counter()
        if self.rec is None:
            ce_loss(self.model(x), y).backward()
            self.opt.step()
            self.opt.zero_grad()
        else:
            with self.rec.step(ids, self.opt):
                ce_loss(self.model(x), y).backward()
                self.opt.step()
                self.opt.zero_grad()
        return time.perf_counter() - start


def recorder_overhead(model: nn.Module, batches: list[Batch], rounds: int, steps: int, lr: float) -> dict[str, Any]:
    """Per round, the median step of every configuration; the overhead ratios' medians over rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            (opt, rec): Run(model, opt, rec, Path(tmp) / f"{opt}-{rec}", lr)
            for opt in ("sgd", "adam")
            for rec in (False, True)
        }
        cursor = 0
        for run in runs.values():  # warm-up
            for i in range(5):
                run.step(batches[i % len(batches)])
        per_round: list[dict[tuple[str, bool], float]] = []
        for _ in range(rounds):
            medians = {}
            for key, run in runs.items():
                times = [run.step(batches[(cursor + i) % len(batches)]) for i in range(steps)]
                medians[key] = statistics.median(times)
            cursor += steps
            per_round.append(medians)
        for run in runs.values():
            if run.rec is not None:
                run.rec.close()
    overhead = {opt: [r[(opt, True)] / r[(opt, False)] for r in per_round] for opt in ("sgd", "adam")}
    relative = [a / s for a, s in zip(overhead["adam"], overhead["sgd"], strict=True)]
    return {
        "plain_ms": {opt: 1e3 * statistics.median(r[(opt, False)] for r in per_round) for opt in ("sgd", "adam")},
        "recorded_ms": {opt: 1e3 * statistics.median(r[(opt, True)] for r in per_round) for opt in ("sgd", "adam")},
        "overhead": {opt: statistics.median(v) for opt, v in overhead.items()},
        "adam_over_sgd": statistics.median(relative),
        "adam_over_sgd_iqr": statistics.quantiles(relative, n=4)[::2] if len(relative) > 1 else [relative[0]] * 2,
    }


# -- engine ---------------------------------------------------------------------------------------

LAYERS, OUT_DIM, IN_DIM, K = 25, 128, 129, 16


def write_log(directory: Path, propagation: str, steps: int, batch: int) -> None:
    """A synthetic log with the optimizer state of ``propagation`` (random gradients and moments)."""
    layers = [
        {
            "name": f"l{i}",
            "kind": "linear",
            "out_dim": OUT_DIM,
            "in_dim": IN_DIM,
            "k_out": K,
            "k_in": K,
            "seed_out": 2 * i,
            "seed_in": 2 * i + 1,
            "has_bias": True,
            "parameters": OUT_DIM * IN_DIM,
        }
        for i in range(LAYERS)
    ]
    kind = {"sgd": "SGD", "momentum": "SGD", "adam": "Adam", "adamw": "AdamW"}[propagation]
    optimizer = {"type": kind, "exact_sgd": propagation == "sgd", "propagation": propagation, "nesterov": False}
    writer = synthetic_writer(directory, layers, optimizer)
    generator = torch.Generator().manual_seed(0)
    n = LAYERS
    for step in range(steps):
        grads = {f"l{i}": torch.randn(batch, K * K, generator=generator) / K for i in range(n)}
        state: dict[str, torch.Tensor] = {}
        if propagation != "sgd":
            adam = propagation in ("adam", "adamw")
            state = {
                "opt.momentum": torch.full((n,), 0.9, dtype=torch.float64),
                "opt.dampening": torch.zeros(n, dtype=torch.float64),
                "opt.beta2": torch.full((n,), 0.999 if adam else 0.0, dtype=torch.float64),
                "opt.eps": torch.full((n,), 1e-8 if adam else 0.0, dtype=torch.float64),
                "opt.step": torch.full((n,), float(step + 1), dtype=torch.float64),
            }
            if adam:
                for i in range(n):
                    state[fmt.optimizer_layer_key("v_row", f"l{i}")] = torch.rand(OUT_DIM, generator=generator) + 0.1
                    state[fmt.optimizer_layer_key("v_col", f"l{i}")] = torch.rand(IN_DIM, generator=generator) + 0.1
        lr = 1e-3 if propagation in ("adam", "adamw") else 0.05
        writer.accept_step(
            StepRecord(
                step, list(range(step * batch, (step + 1) * batch)), [lr] * n, [0.01] * n, None, grads, {}, state
            )
        )
        writer.flush_if_full()
    queries = {f"grad.l{i}": torch.randn(16, K * K) for i in range(n)}
    queries.update(example_id=torch.arange(16), loss=torch.zeros(16, dtype=torch.float64))
    writer.write_query_set("val", queries, {"num_queries": 16, "step": steps, "texts": None})
    writer.close()


def engine_times(steps: int, batch: int, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` compute() seconds per propagation, run interleaved."""
    names = ("sgd", "momentum", "adam", "adamw")
    seconds: dict[str, list[float]] = {n: [] for n in names}
    labels: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            write_log(Path(tmp) / name, name, steps, batch)
        for r in range(repeats):
            for name in names:
                out = Path(tmp) / f"out-{name}-{r}"
                start = time.perf_counter()
                summary = compute(Path(tmp) / name, out, ComputeArguments(save_embeddings=False))
                seconds[name].append(time.perf_counter() - start)
                labels[name] = summary["propagation_label"]
    best = {n: min(v) for n, v in seconds.items()}
    return {
        "seconds": best,
        "labels": labels,
        "ratio_to_sgd": {n: best[n] / best["sgd"] for n in names},
        "steps_per_s": {n: steps / best[n] for n in names},
    }


# -- report ---------------------------------------------------------------------------------------


def markdown(rec: dict[str, dict[str, Any]], eng: dict[str, Any], args: argparse.Namespace, meta: str) -> str:
    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `.venv/bin/python -m bench.optimizer_speed` {meta}",
        "",
        f"Recorder (empirical mode, default `proj_dim=256`, shards every 4 MB): {args.rounds} interleaved rounds "
        f"of {args.steps} steps per configuration; overhead = median over rounds of recorded / plain step time "
        "with the same optimizer; 'Adam / SGD' is the median over rounds of the ratio of the two overheads "
        "(interquartile range in brackets). Target: at most 1.2x.",
        "",
        "| model | plain SGD ms | recorded SGD ms | SGD overhead | plain Adam ms | recorded Adam ms | Adam overhead | Adam / SGD overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in rec.items():
        low, high = r["adam_over_sgd_iqr"]
        lines.append(
            f"| {model} | {r['plain_ms']['sgd']:.2f} | {r['recorded_ms']['sgd']:.2f} | {r['overhead']['sgd']:.2f}x "
            f"| {r['plain_ms']['adam']:.2f} | {r['recorded_ms']['adam']:.2f} | {r['overhead']['adam']:.2f}x "
            f"| {r['adam_over_sgd']:.2f}x ({low:.2f}-{high:.2f}) |"
        )
    lines += [
        "",
        f"Engine: `compute()` (no embeddings file) on synthetic logs of {args.engine_steps} steps, batch "
        f"{args.batch}, {LAYERS} layers {OUT_DIM} x {IN_DIM} projected to {K} x {K}, empirical curvature, float32, "
        f"per-layer blocks; best of {args.repeats} interleaved runs. Target: Adam at most 2x SGD.",
        "",
        "| log's optimizer | propagation | seconds | steps/s | time / SGD |",
        "|---|---|---:|---:|---:|",
    ]
    for name in eng["seconds"]:
        lines.append(
            f"| {name} | {eng['labels'][name]} | {eng['seconds'][name]:.2f} | {eng['steps_per_s'][name]:.0f} "
            f"| {eng['ratio_to_sgd'][name]:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--engine-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    rec = {}
    model, batches, _ = digits_task(64)
    rec["digits MLP (64-128-128-10, batch 64)"] = recorder_overhead(model, batches, args.rounds, args.steps * 3, 0.05)
    model, batches, _ = lm_task(16, 128, 128, 128, 4)
    rec["transformer LM (4 layers, width 128, seq 128, batch 16)"] = recorder_overhead(
        model, batches, args.rounds, args.steps, 0.02
    )
    eng = engine_times(args.engine_steps, args.batch, args.repeats)
    meta = f"{provenance()}, 2 torch threads, torch {torch.__version__}, {time.time() - started:.0f} s."
    text = markdown(rec, eng, args, meta)
    save_json("optimizer_speed.json", {"recorder": rec, "engine": eng})
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
