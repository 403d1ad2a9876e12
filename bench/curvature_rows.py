"""How many Gauss-Newton rows per example the recorder needs: fidelity against recording cost (BENCHMARKS.md).

The recorder builds the curvature ``M`` from per-example rows at the model's output: for a classifier of at most
32 classes every class's row by default (``curvature_samples=None``), else ``curvature_samples`` rows: the most
probable classes' rows and one of a label drawn from the others (an unbiased, noisier estimate,
dvemb/curvature.py). Next to it, as many labels sampled from the model's prediction (``(p - e_y) / sqrt(n)``,
``y ~ p``), the recorder's estimator before this one, put back in this process only (``--no-labels`` skips it). On the digits MLP of :mod:`bench.default_fidelity`
(10 classes; SGD at a constant rate, SGD with momentum 0.9, Adam), 3 seeds, the no-options recorder with each
setting, computed with the engine's defaults, against exact trajectory-specific leave-one-out (mean Spearman
over test points), and the recorded training's CPU time over the unrecorded training's, measured in the same run
(interleaved, median over repetitions).

Run from the repository root: ``.venv/bin/python -m bench.curvature_rows`` (``--quick``: one seed, one optimizer,
BENCHMARKS.md untouched). Writes ``bench/out/curvature_rows.json`` and the BENCHMARKS.md section
"Curvature rows: fidelity against cost".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import default_fidelity as fid
from bench.fidelity import Setup, correlation, ground_truth, sample_pairs
from bench.harness import machine, measured_commit, replace_section, save_json, utc_stamp
from dvemb import output_curvature
from dvemb.curvature import ESTIMATOR, cross_entropy_factor_rows
from dvemb.engine import ComputeArguments

SECTION = "Curvature rows: fidelity against cost"
SAMPLES: list[int | None] = [None, 1, 2, 4]  # None: every class (the default for at most 32 classes)
LABELS = "labels"  # the settings of SAMPLES[1:] again, with sampled labels
RUNS = ("sgd", "momentum", "adam")
REPEATS = 3  # timed repetitions of each training, interleaved


def _label(samples: int | None, estimator: str = ESTIMATOR) -> str:
    if samples is None:
        return "every class (10 rows)"
    if estimator == LABELS:
        return f"{samples} sampled label{'s' if samples > 1 else ''} (the estimator before)"
    return f"{samples} row{'s' if samples > 1 else ''} (top classes + one label)"


def _recording(log_dir: Path, samples: int | None) -> fid.RecordingFactory:
    return fid.no_options(log_dir, curvature_samples=samples)


def _sampled_label_rows(
    logits: torch.Tensor, weights: torch.Tensor, *, samples: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The recorder's rows before its current estimator: ``sqrt(c / n) (p - e_y)`` with ``n`` labels ``y ~ p``
    (every class's rows when ``samples`` is None, as now)."""
    if samples is None:
        return cross_entropy_factor_rows(logits, weights, samples=None, generator=generator)
    z = logits.detach()
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    probs = torch.softmax(z.to(work), dim=-1)
    root = weights.to(device=z.device, dtype=work).sqrt().unsqueeze(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, samples, replacement=True, generator=generator)  # (N, n)
    one_hot = torch.nn.functional.one_hot(drawn.T, probs.shape[-1]).to(work)  # (n, N, V)
    rows = (flat.unsqueeze(0) - one_hot).reshape(samples, *probs.shape) / samples**0.5
    return (rows * root.unsqueeze(0)).to(z.dtype)


@contextmanager
def _estimator(name: str) -> Iterator[None]:
    """Record with ``name``'s rows: the current estimator, or sampled labels (patched into dvemb.output_curvature,
    where the recorder takes its rows from, for the block only)."""
    if name != LABELS:
        yield
        return
    original = output_curvature.cross_entropy_factor_rows  # type: ignore[attr-defined]
    output_curvature.cross_entropy_factor_rows = _sampled_label_rows  # type: ignore[attr-defined]
    try:
        yield
    finally:
        output_curvature.cross_entropy_factor_rows = original  # type: ignore[attr-defined]


def _settings(labels: bool) -> list[tuple[int | None, str]]:
    return [(s, ESTIMATOR) for s in SAMPLES] + ([(s, LABELS) for s in SAMPLES[1:]] if labels else [])


def _cpu(fn: Any) -> float:
    started = time.process_time()  # the recorder's writer thread counts too
    fn()
    return time.process_time() - started


def run_one(setup: Setup, work: Path, labels: bool) -> dict[str, Any]:
    """Spearman and cost ratio of every setting for one (optimizer, seed)."""
    reference, _ = fid.run_training(setup, None)
    pairs = sample_pairs(setup, reference)
    truth = ground_truth(reference, pairs)
    spearman, ratios = {}, {}
    for samples, estimator in _settings(labels):
        log = work / f"log-{samples}-{estimator}"
        with _estimator(estimator):
            traj, _ = fid.run_training(setup, _recording(log, samples))
        if not fid.same_trajectory(reference, traj):
            raise RuntimeError(f"recording with curvature_samples={samples} changed the training trajectory")
        est, _ = fid.scores(log, work / "out", pairs, setup, ComputeArguments())
        spearman[_label(samples, estimator)] = correlation(est, truth, spearman=True)
    for samples, estimator in _settings(labels):
        per_round = []
        for r in range(REPEATS):
            plain = _cpu(lambda: fid.run_training(setup, None))
            log = work / f"timed-{samples}-{estimator}-{r}"
            with _estimator(estimator):
                recorded = _cpu(lambda log=log, samples=samples: fid.run_training(setup, _recording(log, samples)))
            per_round.append(recorded / plain)
        ratios[_label(samples, estimator)] = float(np.median(per_round))
    return {"spearman": spearman, "cost": ratios}


def section(results: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    labels = [_label(s, e) for s, e in _settings(meta["labels"])]
    runs = list(results)
    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `{meta['command']}` at commit {meta['commit']} on {meta['date']}, {meta['machine']}, "
        f"torch {torch.__version__}, {meta['seconds']:.0f} s. The digits MLP of bench/default_fidelity.py "
        f"({meta['steps']} steps of {meta['batch']}, 10 classes), {meta['seeds']} seed(s), {meta['pairs']} sampled "
        "occurrences against exact leave-one-out; `dvemb.Recorder(model, log_dir, curvature_samples=...)` with "
        "nothing else (Gauss-Newton rows found at the output, bases fitted by the recorder), computed with the "
        "engine's defaults. Rows: every class's, or the most probable classes' rows and one of a label drawn "
        "from the others (the recorder's estimator; with one row, a label sampled from the prediction), or as many labels sampled from the model's "
        "prediction (its estimator before, put back in the benchmark's process). Spearman: mean over test points, mean [min, max] over seeds. Cost: CPU time of the "
        "whole recorded training (the recorder's writer thread included) over the same training unrecorded, "
        f"median of {REPEATS} interleaved repetitions, mean over seeds (this MLP's step is under a millisecond, "
        "so fixed per-step costs weigh heavily: BENCHMARKS.md 'Recorder overhead' times steps on larger models).",
        "",
        "| rows per example | "
        + " | ".join(f"{fid.RUN_LABELS[r]} Spearman" for r in runs)
        + " | "
        + " | ".join(f"{fid.RUN_LABELS[r]} cost" for r in runs)
        + " |",
        "|---|" + "---:|" * (2 * len(runs)),
    ]
    for label in labels:
        cells = []
        for run in runs:
            values = [r["spearman"][label] for r in results[run]]
            cells.append(f"{np.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]")
        for run in runs:
            cells.append(f"{np.mean([r['cost'][label] for r in results[run]]):.1f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    every = labels[0]
    for run in runs:
        best = np.mean([r["spearman"][every] for r in results[run]])
        for label in labels[1:]:
            got = np.mean([r["spearman"][label] for r in results[run]])
            lines.append(f"- {fid.RUN_LABELS[run]}, {label}: {got - best:+.2f} Spearman against every class.")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, Adam only, 40 pairs; BENCHMARKS.md untouched")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-labels", action="store_true", help="leave out the sampled-label rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, runs = (1, ("adam",)) if args.quick else (args.seeds, RUNS)
    base = Setup()
    base = replace(base, pairs=40 if args.quick else base.pairs)
    started = time.time()
    results: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        optimizer, schedule = fid.RUNS[run]
        for seed in range(seeds):
            setup = replace(base, seed=seed, optimizer=optimizer, schedule=schedule, lr=fid.RATES[optimizer])
            with tempfile.TemporaryDirectory() as work:
                results.setdefault(run, []).append(run_one(setup, Path(work), not args.no_labels))
            print(run, seed, results[run][-1], flush=True)
    meta = {
        "command": ".venv/bin/python -m bench.curvature_rows" + (" --quick" if args.quick else ""),
        "commit": measured_commit(),
        "date": utc_stamp(),
        "machine": f"{machine()}, 1 thread",
        "seconds": time.time() - started,
        "seeds": seeds,
        "pairs": base.pairs,
        "steps": base.steps,
        "batch": base.batch,
        "labels": not args.no_labels,
    }
    text = section(results, meta)
    print(text)
    save_json("curvature_rows.json", {"results": results, "meta": meta})
    if not args.quick:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
