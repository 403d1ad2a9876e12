"""Fidelity of optimizer-exact influence against exact retraining, per optimizer (BENCHMARKS.md).

For SGD, SGD with momentum 0.9, Adam and AdamW (weight decay 0.1), 3 seeds each, the digits MLP
of :mod:`bench.fidelity` is trained once with a ggn log without projection and once with the
default projection (training does not depend on what is recorded: checked bit for bit). Ground
truth: replay from the example's step with the example dropped and the optimizer in its state of
that step. Estimators (mean over test points of the Spearman correlation across the sampled
(step, example) pairs):

- ``proxy``: the SGD recursion whatever the optimizer (the paper's proxy; dvemb before format v2).
- ``optimizer``: dvemb's optimizer-exact propagation (with Adam's second-moment term where the
  layer is stored whole; it is never available for projected layers).
- ``ceiling``: the first-order ceiling: the exact derivative of the real trajectory (exact
  Hessians, the optimizer's own update) by a central difference of the replay in the example's
  loss weight; no estimator that is linear in the removal can beat it.

Columns: no projection (full M, and per-layer blocks), the default projection (``proj_dim=256``
per layer, per-layer blocks) with ggn curvature, and the settings a user gets by default
(empirical curvature, per-layer blocks, ``proj_dim=256``). A second table measures what each way
of carrying Adam's preconditioner into projected coordinates costs against the same propagation
without projection.

Run from the repository root: ``.venv/bin/python -m bench.optimizer_fidelity``. Writes
``bench/out/optimizer_fidelity.json`` and the BENCHMARKS.md section "Optimizer-exact fidelity".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fidelity import (
    Setup,
    Trajectory,
    correlation,
    dvemb_scores,
    ground_truth,
    replay_weighted,
    same_trajectory,
    sample_pairs,
    train,
)
from bench.harness import provenance, replace_section, save_json

RATES = {"sgd": 0.02, "momentum": 0.002, "adam": 0.001, "adamw": 0.001}
LABELS = {"sgd": "SGD", "momentum": "SGD momentum 0.9", "adam": "Adam", "adamw": "AdamW (wd 0.1)"}
SECTION = "Optimizer-exact fidelity"


def first_order_ceiling(traj: Trajectory, pairs: list[tuple[int, int]], h: float = 1e-4) -> np.ndarray:
    """(pairs, test) ``-d loss / d weight`` of each example's loss weight at its step (central difference)."""
    out = []
    for step, position in pairs:
        up, down = (replay_weighted(traj, step, position, 1.0 + sign * h).numpy() for sign in (1.0, -1.0))
        out.append(-(up - down) / (2 * h))
    return np.stack(out)


def run_one(setup: Setup, work: Path) -> dict[str, Any]:
    """Every estimate of one (optimizer, seed)."""
    whole = train(setup, work / "log-whole", curvature="ggn")
    projected = train(setup, work / "log-256", curvature="ggn", proj_dim=256)
    calibrated_setup = replace(setup, projection="calibrated", lookahead_steps=setup.steps // 10)
    calibrated = train(calibrated_setup, work / "log-cal", curvature="ggn", proj_dim=256)
    if not (same_trajectory(whole, projected) and same_trajectory(whole, calibrated)):
        raise RuntimeError("recording changed the training trajectory")
    pairs = sample_pairs(setup, whole)
    truth = ground_truth(whole, pairs)
    result: dict[str, Any] = {"ceiling": correlation(first_order_ceiling(whole, pairs), truth, spearman=True)}

    def score(name: str, log: str, **kwargs: object) -> np.ndarray:
        est = dvemb_scores(work / log, work / f"out-{name}", pairs, setup, **kwargs)
        result[name] = correlation(est, truth, spearman=True)
        return est

    for prop in ("sgd-proxy", "auto"):
        tag = "proxy" if prop == "sgd-proxy" else "optimizer"
        score(f"{tag}/none/full", "log-whole", curvature="ggn", blocks="full", propagation=prop)
        score(f"{tag}/none/layer", "log-whole", curvature="ggn", blocks="layer", propagation=prop)
        score(f"{tag}/256/ggn", "log-256", curvature="ggn", blocks="layer", propagation=prop)
        score(f"{tag}/256/default", "log-256", curvature="empirical", propagation=prop)
        score(f"{tag}/256/calibrated", "log-cal", curvature="ggn", propagation=prop)
    if setup.optimizer in ("adam", "adamw"):
        score("optimizer/none/full/no-v", "log-whole", curvature="ggn", blocks="full", second_moment=False)
        exact = score("optimizer/none/layer/no-v", "log-whole", curvature="ggn", blocks="layer", second_moment=False)
        for kind in ("kronecker", "scalar"):
            est = score(
                f"optimizer/256/ggn/{kind}", "log-256", curvature="ggn", blocks="layer", projected_preconditioner=kind
            )
            result[f"vs-exact/{kind}"] = correlation(est, exact, spearman=True)
            result[f"relerr/{kind}"] = float(np.linalg.norm(est - exact) / np.linalg.norm(exact))
        result["vs-exact/proxy"] = correlation(
            dvemb_scores(
                work / "log-256", work / "out-p", pairs, setup, curvature="ggn", blocks="layer", propagation="sgd-proxy"
            ),
            exact,
            spearman=True,
        )
    with torch.no_grad():
        final = {k: v for k, v in whole.params[-1].items()}
        logits = torch.func.functional_call(whole.model, final, (whole.x_test,))
        result["test_accuracy"] = float((logits.argmax(1) == whole.y_test).double().mean())
    return result


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per optimizer and key: (mean, min, max) over seeds."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for opt, results in runs.items():
        keys = results[0].keys()
        out[opt] = {
            k: (float(np.mean([r[k] for r in results])), min(r[k] for r in results), max(r[k] for r in results))
            for k in keys
        }
    return out


def _cell(stats: dict[str, tuple[float, float, float]], key: str) -> str:
    if key not in stats:
        return "-"
    mean, low, high = stats[key]
    return f"{mean:.2f} ({low:.2f}-{high:.2f})"


def markdown(table: dict[str, dict[str, tuple[float, float, float]]], setup: Setup, seeds: int, meta: str) -> str:
    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `.venv/bin/python -m bench.optimizer_fidelity` {meta}",
        "",
        f"Digits MLP (64-{setup.hidden}-10, tanh), {setup.steps} steps of batch {setup.batch}, summed cross-entropy, "
        f"float64, {setup.pairs} sampled (step, example) pairs x {setup.test_size} test points, {seeds} seeds; "
        "rates: " + ", ".join(f"{LABELS[o]} {RATES[o]}" for o in RATES) + ". "
        "Mean Spearman over test points against exact replay (the optimizer's state restored at the "
        "example's step), mean over seeds (min-max). 'default' is what a user gets without options: "
        "empirical curvature, the random projection at `proj_dim=256` (16 x 16 per layer), the engine's "
        "`blocks='auto'` (the full M for this model); 'ggn, 256' ggn curvature with the random projection and "
        "per-layer blocks; 'calibrated' the recommended settings of the README: ggn, bases calibrated with "
        "look-ahead (10% of the steps), `proj_dim=256`, `blocks='auto'`. Adam's second-moment term is on for "
        "layers stored whole (no projection).",
        "",
        "| optimizer | test acc. | SGD proxy, no proj. (full M) | optimizer-exact, no proj. (full M) | proxy, no proj. (layer) | optimizer-exact, no proj. (layer) | proxy, ggn, 256 | optimizer-exact, ggn, 256 | proxy, default | optimizer-exact, default | proxy, calibrated | optimizer-exact, calibrated | first-order ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for opt, stats in table.items():
        cells = [
            f"{stats['test_accuracy'][0]:.2f}",
            *(
                _cell(stats, k)
                for k in (
                    "proxy/none/full",
                    "optimizer/none/full",
                    "proxy/none/layer",
                    "optimizer/none/layer",
                    "proxy/256/ggn",
                    "optimizer/256/ggn",
                    "proxy/256/default",
                    "optimizer/256/default",
                    "proxy/256/calibrated",
                    "optimizer/256/calibrated",
                    "ceiling",
                )
            ),
        ]
        lines.append(f"| {LABELS[opt]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Adam's preconditioner in projected coordinates (ggn, per-layer blocks, `proj_dim=256`), against the "
        "same optimizer-exact propagation without projection (per-layer blocks, no second-moment term): "
        "Spearman of the scores with it, their relative error, and Spearman against the exact replay. "
        "'kronecker' (the default) is the least-squares map of projected vectors from Adafactor factors "
        "of v; 'scalar' one number per layer and step; 'proxy' no preconditioner at all (SGD recursion).",
        "",
        "| optimizer | preconditioner | Spearman vs unprojected propagation | relative error | Spearman vs exact replay |",
        "|---|---|---:|---:|---:|",
    ]
    for opt, stats in table.items():
        if opt not in ("adam", "adamw"):
            continue
        for kind in ("kronecker", "scalar"):
            lines.append(
                f"| {LABELS[opt]} | {kind} | {_cell(stats, f'vs-exact/{kind}')} | {_cell(stats, f'relerr/{kind}')} "
                f"| {_cell(stats, f'optimizer/256/ggn/{kind}')} |"
            )
        lines.append(
            f"| {LABELS[opt]} | proxy | {_cell(stats, 'vs-exact/proxy')} | - | {_cell(stats, 'proxy/256/ggn')} |"
        )
    lines += [
        "",
        "Second-moment term (Adam, no projection, full M): with it "
        + ", ".join(f"{LABELS[o]} {_cell(table[o], 'optimizer/none/full')}" for o in ("adam", "adamw") if o in table)
        + "; without it "
        + ", ".join(f"{_cell(table[o], 'optimizer/none/full/no-v')}" for o in ("adam", "adamw") if o in table)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--optimizers", nargs="*", default=list(RATES))
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {}
    base = Setup()
    for opt in args.optimizers:
        for seed in range(args.seeds):
            setup = replace(base, seed=seed, optimizer=opt, lr=RATES[opt])
            with tempfile.TemporaryDirectory() as work:
                runs.setdefault(opt, []).append(run_one(setup, Path(work)))
            print(
                opt,
                seed,
                {k: round(v, 3) for k, v in runs[opt][-1].items()},
                f"{time.time() - started:.0f}s",
                flush=True,
            )
    table = aggregate(runs)
    meta = f"{provenance()}, torch {torch.__version__}, {time.time() - started:.0f} s."
    text = markdown(table, base, args.seeds, meta)
    save_json("optimizer_fidelity.json", {"runs": runs, "table": table})
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
