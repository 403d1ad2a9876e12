"""What Adam's second-moment term buys in projected layers, against exact retraining (BENCHMARKS.md).

On the digits MLP of :mod:`bench.fidelity` trained with Adam and with AdamW (weight decay 0.1), 3 seeds, against
exact trajectory-specific leave-one-out (replay with the optimizer state of the example's step), mean Spearman
over test points. The recorder keeps, per projected layer and step, the top R singular pairs of the update's
sensitivity to the second moment and of the step's gradient (``second_moment_rank``, docs/optimizers.md
section 3); the engine carries the term through them. Rows:

- unprojected (``proj_dim=None``, full M): the term exact, with it and without it (``second_moment=False``);
- 256 per layer (bases fitted by the recorder on the first steps, the default), and 1024 per layer: rank 0
  (term left out), rank 4, and full rank (every singular pair: the only loss is the projection itself).

Run from the repository root: ``.venv/bin/python -m bench.second_moment_fidelity`` (``--quick``: one seed,
BENCHMARKS.md untouched). Writes ``bench/out/second_moment_fidelity.json`` and the BENCHMARKS.md section
"Adam's second moment under projection".
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fidelity import Setup, correlation, dvemb_scores, ground_truth, sample_pairs, train
from bench.markdown import replace_section
from bench.optimizer_fidelity import RATES

SECTION = "Adam's second moment under projection"
FULL_RANK = 1 << 20  # at least every layer's min(out, in): every singular pair
#: (row label, proj_dim per layer, second_moment_rank, compute's second_moment)
ROWS = [
    ("unprojected, term exact", None, 0, True),
    ("unprojected, term left out", None, 0, False),
    ("256 per layer, term left out (rank 0)", 256, 0, True),
    ("256 per layer, rank 4", 256, 4, True),
    ("256 per layer, full rank", 256, FULL_RANK, True),
    ("1024 per layer, term left out (rank 0)", 1024, 0, True),
    ("1024 per layer, rank 4", 1024, 4, True),
]


def _record(setup: Setup, log_dir: Path, proj_dim: int | None, rank: int) -> None:
    """Record the setup's training with the recorder's defaults and this projection and rank."""
    train(replace(setup, projection="auto", second_moment_rank=rank), log_dir, curvature="ggn", proj_dim=proj_dim)


def run_one(setup: Setup, work: Path) -> dict[str, float]:
    """Spearman of every row for one (optimizer, seed)."""
    whole = train(setup, work / "whole", curvature="ggn")
    pairs = sample_pairs(setup, whole)
    truth = ground_truth(whole, pairs)
    logs: dict[tuple[int | None, int], Path] = {(None, 0): work / "whole"}
    out: dict[str, float] = {}
    for label, proj_dim, rank, second_moment in ROWS:
        log = logs.get((proj_dim, rank))
        if log is None:
            log = logs[(proj_dim, rank)] = work / f"log-{proj_dim}-{rank}"
            _record(setup, log, proj_dim, rank)
        blocks = {"blocks": "full"} if proj_dim is None else {}
        scores = dvemb_scores(log, work / "out", pairs, setup, curvature="ggn", second_moment=second_moment, **blocks)
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
        "defaults), the engine's default blocks; `second_moment_rank` as named (docs/optimizers.md section 3).",
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
        for size in (256, 1024):
            dropped, rank4 = mean[f"{size} per layer, term left out (rank 0)"], mean[f"{size} per layer, rank 4"]
            verdicts.append(
                f"- {name}, {size} per layer: the term at rank 4 {'adds' if rank4 >= dropped else 'costs'} "
                f"{abs(rank4 - dropped):.2f} (rank 0 {dropped:.2f}, rank 4 {rank4:.2f})."
            )
        exact, without = mean["unprojected, term exact"], mean["unprojected, term left out"]
        verdicts.append(
            f"- {name}, unprojected: the exact term adds {exact - without:.2f} ({without:.2f} -> {exact:.2f})."
        )
    return "\n".join([*lines, "", *verdicts, ""])


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
        "commit": _commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread",
        "seconds": time.time() - started,
        "hidden": base.hidden,
        "steps": base.steps,
        "seeds": seeds,
        "pairs": base.pairs,
    }
    text = section(results, meta)
    print(text)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "second_moment_fidelity.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if not args.quick:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
