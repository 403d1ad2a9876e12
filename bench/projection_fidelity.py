"""Fidelity of random and calibrated projections against exact retraining, and what calibration costs
the recorder (BENCHMARKS.md, "Projection fidelity").

The digits MLP of :mod:`bench.fidelity` (hidden 32, so that 256 per layer really projects), plain
SGD, both schedules, 3 seeds. For each projection size per layer (64, 256, 1024) the same training is
recorded with the seeded random Kronecker projection and with ``rec.calibrate()`` on 8 batches of
the training set at initialisation; estimates use per-layer blocks with ggn curvature and with
empirical curvature (the recorder's default), next to the unprojected per-layer figure. Mean over
test points of the Spearman correlation with exact replay, mean over seeds (min-max).

Recorder overhead: the transformer LM of :mod:`bench.recorder_overhead`, interleaved rounds of
steps with a random and a calibrated recorder (same sizes); the ratio is the median over rounds.

Run from the repository root: ``.venv/bin/python -m bench.projection_fidelity``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import dvemb
from bench.fidelity import Setup, correlation, dvemb_scores, ground_truth, same_trajectory, sample_pairs, train
from bench.harness import provenance, replace_section, save_json
from bench.recorder_overhead import ce_loss, lm_task
from dvemb.engine.compute import AUTO_FULL_MAX_DIM

SECTION = "Projection fidelity"
SIZES = (64, 256, 1024)
KINDS = ("random", "calibrated", "look-ahead")
#: (curvature, blocks) of the estimates: "auto" is the engine's default (the full M for this small model).
ESTIMATES = (("ggn", "auto"), ("ggn", "layer"), ("empirical", "auto"), ("empirical", "layer"))


def run_one(setup: Setup, work: Path) -> dict[str, float]:
    whole = train(setup, work / "whole", curvature="ggn")
    pairs = sample_pairs(setup, whole)
    truth = ground_truth(whole, pairs)
    result = {}
    for curvature, blocks in ESTIMATES:
        est = dvemb_scores(
            work / "whole", work / f"o-whole-{curvature}-{blocks}", pairs, setup, curvature=curvature, blocks=blocks
        )
        result[f"none/{curvature}/{blocks}"] = correlation(est, truth, spearman=True)
    for size in SIZES:
        for kind in KINDS:
            s = replace(setup, projection="random" if kind == "random" else "calibrated")
            if kind == "look-ahead":
                s = replace(s, lookahead_steps=setup.steps // 10)
            log = work / f"{kind}-{size}"
            recorded = train(s, log, curvature="ggn", proj_dim=size)
            if not same_trajectory(whole, recorded):
                raise RuntimeError(f"{kind} recording changed the training trajectory")
            for curvature, blocks in ESTIMATES:
                out = work / f"o-{kind}-{size}-{curvature}-{blocks}"
                est = dvemb_scores(log, out, pairs, s, curvature=curvature, blocks=blocks)
                result[f"{kind}/{size}/{curvature}/{blocks}"] = correlation(est, truth, spearman=True)
    return result


def overhead(rounds: int, steps: int) -> dict[str, float]:
    """Median over rounds of (calibrated step / random step) on the transformer LM."""
    model, batches, _ = lm_task(16, 128, 128, 128, 4)
    times: dict[str, list[float]] = {"random": [], "calibrated": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for kind in times:
            copy = lm_task(16, 128, 128, 128, 4)[0]
            copy.load_state_dict(model.state_dict())
            rec = dvemb.Recorder(copy, Path(tmp) / kind, shard_size_mb=4, projection=kind)
            if kind == "calibrated":
                rec.calibrate([(x, y) for x, y, _ in batches[:8]])
            runs[kind] = (copy, torch.optim.SGD(copy.parameters(), lr=0.02), rec)
        cursor = 0
        ratios = []
        for _ in range(rounds):
            medians = {}
            for kind, (m, opt, rec) in runs.items():
                step_times = []
                for i in range(steps):
                    x, y, ids = batches[(cursor + i) % len(batches)]
                    start = time.perf_counter()
                    with rec.step(ids, opt):
                        ce_loss(m(x), y).backward()
                        opt.step()
                        opt.zero_grad()
                    step_times.append(time.perf_counter() - start)
                medians[kind] = statistics.median(step_times)
                times[kind].append(medians[kind])
            cursor += steps
            ratios.append(medians["calibrated"] / medians["random"])
        for _, _, rec in runs.values():
            rec.close()
    return {
        "random_ms": 1e3 * statistics.median(times["random"]),
        "calibrated_ms": 1e3 * statistics.median(times["calibrated"]),
        "ratio": statistics.median(ratios),
    }


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def markdown(runs: dict[str, list[dict[str, float]]], cost: dict[str, float], meta: str, setup: Setup) -> str:
    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `.venv/bin/python -m bench.projection_fidelity` {meta}",
        "",
        f"Digits MLP 64-{setup.hidden}-10 (tanh), SGD lr {setup.lr} (summed loss), {setup.steps} steps of batch "
        f"{setup.batch}, {setup.pairs} pairs x {setup.test_size} test points, 3 seeds per schedule. 'blocks': `auto` is "
        f"the engine's default (`blocks='full'`, one `M` over both layers, since their projected sizes add up to at "
        f"most {AUTO_FULL_MAX_DIM} and they share one optimizer setting), `layer` the per-layer blocks. "
        "'calibrated': `rec.calibrate()` on 8 batches at initialisation (Gauss-Newton rows, gradient-weighted "
        "factor covariances); 'look-ahead': the same after `lookahead_steps` = 10% of training on the calibration "
        "batches (`rec.calibrate(..., optimizer=opt, lookahead_steps=12)`, model and optimizer restored after: the "
        "trajectory is checked bit for bit); 'random': the seeded Gaussian Kronecker projection. A size is per layer "
        "(k x k, a side that fits whole is kept whole). Mean Spearman against exact replay, mean over seeds (min-max).",
        "",
        "| schedule | curvature | blocks | no projection | "
        + " | ".join(f"{kind} {size}" for size in SIZES for kind in KINDS)
        + " |",
        "|---|---|---|---:|" + "---:|" * (len(SIZES) * len(KINDS)),
    ]
    for schedule, results in runs.items():
        for curvature, blocks in ESTIMATES:
            tail = f"{curvature}/{blocks}"
            cells = [_cell([r[f"none/{tail}"] for r in results])]
            for size in SIZES:
                for kind in KINDS:
                    cells.append(_cell([r[f"{kind}/{size}/{tail}"] for r in results]))
            label = "auto (full M here, the default)" if blocks == "auto" else "layer"
            lines.append(f"| {schedule} | {curvature} | {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Recorder step on the transformer LM (4 layers, width 128, seq 128, batch 16, default `proj_dim=256`): "
        f"random {cost['random_ms']:.1f} ms, calibrated {cost['calibrated_ms']:.1f} ms, ratio "
        f"{cost['ratio']:.2f}x (median over interleaved rounds; target at most 1.1x).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    base = Setup(hidden=32)
    runs: dict[str, list[dict[str, float]]] = {}
    for schedule in ("constant", "warmup-cosine"):
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as work:
                result = run_one(replace(base, seed=seed, schedule=schedule), Path(work))
            runs.setdefault(schedule, []).append(result)
            print(schedule, seed, {k: round(v, 3) for k, v in result.items()}, flush=True)
    cost = overhead(args.rounds, 6)
    meta = f"{provenance()}, torch {torch.__version__}, {time.time() - started:.0f} s."
    text = markdown(runs, cost, meta, base)
    save_json("projection_fidelity.json", {"runs": runs, "overhead": cost})
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
