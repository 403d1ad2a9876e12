"""What Adam's second-moment term buys in projected layers, against exact retraining (BENCHMARKS.md).

On the digits MLP of :mod:`bench.fidelity` trained with Adam and with AdamW (weight decay 0.1), 3 seeds, against
exact trajectory-specific leave-one-out (replay with the optimizer state of the example's step), mean Spearman
over test points. The recorder keeps, per projected layer (at most 16384 coordinates) and step, the update's
sensitivity to the second moment and the step's gradient whole, and the engine carries the term over the
layer's own coordinates (docs/optimizers.md section 3). Rows, each with the term and without it
(``second_moment=False``):

- unprojected (``proj_dim=None``, full M): the term exact;
- 256 per layer (bases fitted by the recorder on the first steps: the defaults), and 1024 per layer.

Run from the repository root: ``.venv/bin/python -m bench.second_moment_fidelity`` (``--quick``: one seed,
BENCHMARKS.md untouched). Writes ``bench/out/second_moment_fidelity.json`` and the BENCHMARKS.md section
"Adam's second moment under projection".
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fidelity import Setup, correlation, dvemb_scores, ground_truth, sample_pairs, train
from bench.harness import measured_commit, replace_section, save_json, utc_stamp
from bench.optimizer_fidelity import RATES

SECTION = "Adam's second moment under projection"
#: (row label, proj_dim per layer, the compute options of the row)
ROWS: list[tuple[str, int | None, dict[str, bool]]] = [
    ("unprojected, term exact", None, {}),
    ("unprojected, term left out", None, {"second_moment": False}),
    ("256 per layer (the recorder's defaults), the engine's defaults", 256, {}),
    ("256 per layer, term carried (asked for)", 256, {"second_moment_lifted": True}),
    ("256 per layer, term left out", 256, {"second_moment_lifted": False}),
    ("1024 per layer, the engine's defaults", 1024, {}),
    ("1024 per layer, term left out", 1024, {"second_moment_lifted": False}),
]


def _record(setup: Setup, log_dir: Path, proj_dim: int | None) -> None:
    """Record the setup's training with the recorder's defaults and this projection."""
    train(replace(setup, projection="auto"), log_dir, curvature="ggn", proj_dim=proj_dim)


def run_one(setup: Setup, work: Path) -> dict[str, float]:
    """Spearman of every row for one (optimizer, seed)."""
    whole = train(setup, work / "whole", curvature="ggn")
    pairs = sample_pairs(setup, whole)
    truth = ground_truth(whole, pairs)
    logs: dict[int | None, Path] = {None: work / "whole"}
    out: dict[str, float] = {}
    for label, proj_dim, options in ROWS:
        log = logs.get(proj_dim)
        if log is None:
            log = logs[proj_dim] = work / f"log-{proj_dim}"
            _record(setup, log, proj_dim)
        blocks = {"blocks": "full"} if proj_dim is None else {}
        scores = dvemb_scores(log, work / "out", pairs, setup, curvature="ggn", **options, **blocks)
        out[label] = correlation(scores, truth, spearman=True)
    return out


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def section(results: dict[str, list[dict[str, float]]], meta: dict[str, Any]) -> str:
    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `{meta['command']}` at commit {meta['commit']} on {meta['date']}, {meta['machine']}, "
        f"torch {torch.__version__}, {meta['seconds']:.0f} s. Digits MLP of bench/fidelity.py (tanh, hidden "
        f"{meta['hidden']}), {meta['steps']} steps, rates {RATES['adam']} (Adam) and {RATES['adamw']} (AdamW, weight "
        f"decay 0.1), {meta['seeds']} seeds, {meta['pairs']} sampled occurrences against exact leave-one-out "
        "(replay with the optimizer state of the example's step); mean Spearman over test points, mean [min, max] "
        "over seeds. Projected rows: curvature ggn, bases fitted by the recorder on the first steps (the "
        "defaults), the engine's default blocks; the term carried over each layer's own coordinates "
        "(docs/optimizers.md section 3; `ComputeArguments(second_moment_lifted=None)`, the default, carries it while "
        "its states hold at most 16x the recursion's own, `True` wherever memory allows) or left out (`False`).",
        "",
        "| row | Adam | AdamW |",
        "|---|---:|---:|",
    ]
    for label, *_ in ROWS:
        cells = [_cell([r[label] for r in results[name]]) for name in ("adam", "adamw")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    verdicts = []
    for name in ("adam", "adamw"):
        mean = {label: float(np.mean([r[label] for r in results[name]])) for label, *_ in ROWS}
        for size, carried_label in (
            (256, "256 per layer (the recorder's defaults), the engine's defaults"),
            (1024, "1024 per layer, the engine's defaults"),
        ):
            dropped, carried = mean[f"{size} per layer, term left out"], mean[carried_label]
            verdicts.append(
                f"- {name}, {size} per layer: the defaults (term carried within the state bound) "
                f"{'add' if carried >= dropped else 'cost'} {abs(carried - dropped):.2f} against leaving it out "
                f"({dropped:.2f} -> {carried:.2f})."
            )
        exact, without = mean["unprojected, term exact"], mean["unprojected, term left out"]
        verdicts.append(
            f"- {name}, unprojected: the exact term adds {exact - without:.2f} ({without:.2f} -> {exact:.2f})."
        )
    return "\n".join([*lines, "", *verdicts, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one seed, 30 pairs, BENCHMARKS.md untouched")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    base = Setup()
    base = replace(base, pairs=30 if args.quick else base.pairs)
    started = time.time()
    results: dict[str, list[dict[str, float]]] = {}
    for name in ("adam", "adamw"):
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as work:
                setup = replace(base, seed=seed, optimizer=name, lr=RATES[name])
                results.setdefault(name, []).append(run_one(setup, Path(work)))
            print(name, seed, {k: round(v, 3) for k, v in results[name][-1].items()}, flush=True)
    meta = {
        "command": ".venv/bin/python -m bench.second_moment_fidelity" + (" --quick" if args.quick else ""),
        "commit": measured_commit(),
        "date": utc_stamp(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread",
        "seconds": time.time() - started,
        "hidden": base.hidden,
        "steps": base.steps,
        "seeds": seeds,
        "pairs": base.pairs,
    }
    text = section(results, meta)
    print(text)
    save_json("second_moment_fidelity.json", {"meta": meta, "results": results})
    if not args.quick:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
