"""The fidelity table of BENCHMARKS.md: every estimator against exact retraining (TSLOO).

For each learning-rate schedule ("constant", "warmup-cosine") and seed (0, 1, 2), the MLP of
:mod:`bench.fidelity` is trained once per recording configuration (projection size x curvature
samples). Training does not depend on what the recorder records (checked: every step's parameters
are compared bit for bit with the first recording's), so the exact ground truth is computed once
per (schedule, seed) and shared by all estimates. Estimators, each without projection and at the
projection sizes of ``--proj``:

- ``grad_dot``: ``g_s(z) . grad l(theta_T, z_test)``, no training dynamics.
- ``tracin``: TracIn-style, ``eta_s g_s(z) . grad l(theta_s, z_test)``, the test gradient at the
  checkpoint of the example's own step (projected with the log's projection when it has one).
- ``empirical``: dvemb, ``curvature="empirical", blocks="full"`` (the paper's estimator).
- ``dattri``: dattri's ``DVEmbAttributor.cache`` fed exactly the gradients dvemb recorded and the
  per-example rates (summed loss: rate = lr), one "epoch", one index per occurrence; its
  embeddings are compared with dvemb's empirical full-M embeddings (must agree to 1e-6).
- ``ggn-1``, ``ggn-4``, ``ggn-all``: dvemb, ``curvature="ggn", blocks="full"`` with 1 or 4
  sampled labels per example, or all 10 classes (exact GGN).

Scores are compared with the ground truth by the mean over test points of the Spearman (and
Pearson) correlation across the sampled (step, example) pairs (:func:`bench.fidelity.correlation`).

Run from the repository root (dattri lives in the benchmark venv made by ``bench/setup.sh``)::

    bench/.venv-bench/bin/python -m bench.fidelity_table

With the project venv the dattri column says why it is missing. Writes
``bench/out/fidelity_table.json`` and ``bench/out/fidelity_table.md`` (the markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import dvemb
from bench.fidelity import (
    Setup,
    Trajectory,
    correlation,
    dvemb_scores,
    grad_dot_scores,
    ground_truth,
    same_trajectory,
    sample_pairs,
    train,
)

SCHEDULES = ("constant", "warmup-cosine")
ESTIMATORS = ("grad_dot", "tracin", "empirical", "dattri", "ggn-1", "ggn-4", "ggn-all")
SAMPLES: tuple[int | None, ...] = (None, 1, 4)  # None = all classes


def _proj_name(proj: int | None) -> str:
    return "none" if proj is None else str(proj)


# -- dattri ---------------------------------------------------------------------------------------


def _dattri() -> tuple[Any, str | None]:
    """(DVEmbAttributor, AttributionTask) or the reason they cannot be used."""
    try:
        import dattri
        from dattri.algorithm.dvemb import DVEmbAttributor
        from dattri.task import AttributionTask

        version = getattr(dattri, "__version__", None)
        if version is None:
            from importlib.metadata import version as _v

            version = _v("dattri")
    except Exception as error:
        return None, f"dattri not importable ({type(error).__name__}: {error}); run bash bench/setup.sh"
    return (DVEmbAttributor, AttributionTask, version), None


def dattri_embeddings(api: Any, traj: Trajectory, log_dir: Path) -> np.ndarray:
    """Per-occurrence embeddings from dattri's DVEmbAttributor fed the log's gradients.

    ``cache(gradients=..., learning_rates=...)`` takes external gradients and rates; the example
    indices come from the attributor's ``data_indices`` (normally filled by ``cache_gradients``),
    which we set to one index per occurrence so that rows are occurrences, not examples. All steps
    go in one "epoch" (dattri carries ``M`` across epochs anyway).
    """
    attributor_cls, task_cls, _ = api
    model = traj.model

    def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    task = task_cls(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = attributor_cls(task=task, proj_dim=None)
    log = dvemb.open_log(log_dir)
    grads, rates, indices = [], [], []
    row = 0
    for shard in log.iter_shards():
        matrix = torch.cat([shard.grads[layer.name] for layer in log.layers], 1).to(torch.float64)
        offsets = np.cumsum([0, *shard.batch_size.tolist()])
        for i in range(len(shard.steps)):
            n = int(offsets[i + 1] - offsets[i])
            grads.append(matrix[offsets[i] : offsets[i + 1]].clone())
            rates.append(float(shard.lr[i, 0]))  # summed loss: per-example rate = lr
            indices.append(torch.arange(row, row + n))
            row += n
    attributor.data_indices = {0: indices}
    attributor.cache(gradients={0: grads}, learning_rates={0: rates}, memory_saving=True)
    return attributor.embeddings[0].numpy()


# -- TracIn ---------------------------------------------------------------------------------------


def _layer_matrices(grads: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """(Q, out, in+1) weight-gradient matrices with the bias gradient as last column (log layout)."""
    weight, bias = grads[f"{layer}.weight"], grads[f"{layer}.bias"]
    return torch.cat([weight, bias.unsqueeze(-1)], -1)


def test_gradients(traj: Trajectory, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-test-example gradients at ``params``: parameter name -> (Q, *shape)."""

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(traj.model, p, (x.unsqueeze(0),)), y.unsqueeze(0), reduction="sum")

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, traj.x_test, traj.y_test)


def _project(log: Any, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """(Q, D) test gradients laid out (and projected) as the log stores them."""
    parts = []
    for layer in log.layers:
        matrix = _layer_matrices(grads, layer.name)
        p = layer.projection
        parts.append(matrix.flatten(-2) if p.is_identity else p.project_matrix(matrix))
    return torch.cat(parts, 1)


def _log_rows(log_dir: Path) -> torch.Tensor:
    log = dvemb.open_log(log_dir)
    return torch.cat([torch.cat([s.grads[layer.name] for layer in log.layers], 1) for s in log.iter_shards()]).double()


def tracin_scores(
    traj: Trajectory,
    log_dir: Path,
    pairs: list[tuple[int, int]],
    setup: Setup,
    cache: dict[int, dict[str, torch.Tensor]],
) -> np.ndarray:
    """(pairs, test) ``eta_s g_s(z) . grad l(theta_s, z_test)`` in the log's (projected) space."""
    log = dvemb.open_log(log_dir)
    rows = _log_rows(log_dir)
    out = []
    for step, position in pairs:
        if step not in cache:
            cache[step] = test_gradients(traj, traj.params[step])
        q = _project(log, cache[step])
        out.append((traj.lrs[step] * rows[step * setup.batch + position] @ q.T).numpy())
    return np.stack(out)


def check_layout(traj: Trajectory, log_dir: Path) -> float:
    """Max relative difference between the log's test gradients and ours at the final parameters."""
    log = dvemb.open_log(log_dir)
    recorded = torch.cat([log.load_query_set("test").grads[layer.name] for layer in log.layers], 1).double()
    ours = _project(log, test_gradients(traj, traj.params[-1]))
    return float((recorded - ours).abs().max() / recorded.abs().max())


# -- one (schedule, seed) -------------------------------------------------------------------------


def run_one(setup: Setup, projs: list[int | None], work: Path, api: Any, dattri_reason: str | None) -> dict[str, Any]:
    """All estimators at all projection sizes for one training run."""
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "seed": setup.seed,
        "schedule": setup.schedule,
        "estimates": {},
        "dattri": {},
        "dims": {},
        "same_trajectory": True,
        "timings": {},
    }
    reference: Trajectory | None = None
    pairs: list[tuple[int, int]] = []
    truth = np.zeros(0)
    tracin_cache: dict[int, dict[str, torch.Tensor]] = {}

    def record(name: str, proj: int | None, est: np.ndarray) -> None:
        entry = result["estimates"].setdefault(name, {})
        entry[_proj_name(proj)] = {
            "spearman": correlation(est, truth, spearman=True),
            "pearson": correlation(est, truth, spearman=False),
        }

    for proj in projs:
        for samples in SAMPLES:
            log_dir = work / f"log-{_proj_name(proj)}-{samples}"
            t = time.monotonic()
            traj = train(setup, log_dir, curvature="ggn", proj_dim=proj, curvature_samples=samples)
            result["timings"]["train"] = result["timings"].get("train", 0.0) + time.monotonic() - t
            if reference is None:
                reference = traj
                pairs = sample_pairs(setup, traj)
                t = time.monotonic()
                truth = ground_truth(traj, pairs)
                result["timings"]["ground_truth"] = time.monotonic() - t
                result["layout_check"] = check_layout(traj, log_dir)
            elif not same_trajectory(reference, traj):
                result["same_trajectory"] = False
            t = time.monotonic()
            if samples is None:
                log = dvemb.open_log(log_dir)
                result["dims"][_proj_name(proj)] = {layer.name: layer.dim for layer in log.layers}
                record("grad_dot", proj, grad_dot_scores(log_dir, pairs, setup))
                record("tracin", proj, tracin_scores(reference, log_dir, pairs, setup, tracin_cache))
                out = work / "out-empirical"
                record(
                    "empirical", proj, dvemb_scores(log_dir, out, pairs, setup, curvature="empirical", blocks="full")
                )
                if api is not None:
                    ours = np.load(out / "embeddings.npy")
                    theirs = dattri_embeddings(api, reference, log_dir)
                    diff = np.abs(theirs - ours)
                    row_rel = np.linalg.norm(theirs - ours, axis=1) / np.maximum(np.linalg.norm(ours, axis=1), 1e-300)
                    result["dattri"][_proj_name(proj)] = {
                        "max_abs_diff_over_max_abs": float(diff.max() / np.abs(ours).max()),
                        "max_row_relative_diff": float(row_rel.max()),
                    }
                    q = _project(log, test_gradients(reference, reference.params[-1])).numpy()
                    rows = np.stack([theirs[s * setup.batch + p] for s, p in pairs])
                    record("dattri", proj, rows @ q.T)
                else:
                    result["dattri"][_proj_name(proj)] = {"unavailable": dattri_reason}
                record(
                    "ggn-all",
                    proj,
                    dvemb_scores(log_dir, work / "out-ggn", pairs, setup, curvature="ggn", blocks="full"),
                )
            else:
                record(
                    f"ggn-{samples}",
                    proj,
                    dvemb_scores(log_dir, work / "out-ggn", pairs, setup, curvature="ggn", blocks="full"),
                )
            result["timings"]["estimates"] = result["timings"].get("estimates", 0.0) + time.monotonic() - t
            shutil.rmtree(log_dir, ignore_errors=True)
    result["timings"]["total"] = time.monotonic() - t0
    return result


# -- aggregation and output -----------------------------------------------------------------------


def aggregate(runs: list[dict[str, Any]], projs: list[int | None]) -> dict[str, Any]:
    """estimator -> projection -> schedule -> metric -> {mean, min, max, values}."""
    table: dict[str, Any] = {}
    for name in ESTIMATORS:
        for proj in projs:
            for schedule in SCHEDULES:
                chosen = [
                    r for r in runs if r["schedule"] == schedule and _proj_name(proj) in r["estimates"].get(name, {})
                ]
                if not chosen:
                    continue
                for metric in ("spearman", "pearson"):
                    values = [r["estimates"][name][_proj_name(proj)][metric] for r in chosen]
                    table.setdefault(name, {}).setdefault(_proj_name(proj), {}).setdefault(schedule, {})[metric] = {
                        "mean": float(np.mean(values)),
                        "min": float(np.min(values)),
                        "max": float(np.max(values)),
                        "values": values,
                    }
    return table


def _cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "n/a"
    return f"{stats['mean']:.3f} [{stats['min']:.2f}, {stats['max']:.2f}]"


LABELS = {
    "grad_dot": "gradient dot product (final model)",
    "tracin": "TracIn-style (test grad at theta_s)",
    "empirical": "dvemb empirical (paper)",
    "dattri": "dattri DVEmbAttributor, same gradients",
    "ggn-1": "dvemb ggn, 1 sampled label",
    "ggn-4": "dvemb ggn, 4 sampled labels",
    "ggn-all": "dvemb ggn, all 10 classes",
}


def markdown(table: dict[str, Any], projs: list[int | None], dims: dict[str, Any], dattri_reason: str | None) -> str:
    head = ["estimator", "projection (total d)"]
    for schedule in SCHEDULES:
        head += [f"Spearman, {schedule}", f"Pearson, {schedule}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ESTIMATORS:
        for proj in projs:
            key = _proj_name(proj)
            by_schedule = table.get(name, {}).get(key)
            total = sum(dims.get(key, {}).values()) if key in dims else "?"
            cells = [LABELS[name], f"{key} ({total})"]
            if by_schedule is None:
                reason = f"unavailable: {dattri_reason}" if name == "dattri" and dattri_reason else "not run"
                cells += [reason] + ["-"] * (2 * len(SCHEDULES) - 1)
            else:
                for schedule in SCHEDULES:
                    cells += [_cell(by_schedule.get(schedule, {}).get(m)) for m in ("spearman", "pearson")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument(
        "--proj",
        nargs="+",
        default=["none", "64", "256", "1024"],
        help="projection sizes per layer (k*k), 'none' for no projection",
    )
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--pairs", type=int, default=Setup.pairs)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    projs: list[int | None] = [None if p == "none" else int(p) for p in args.proj]

    api, dattri_reason = _dattri()
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="dvemb-fidelity-") as tmp:
        for schedule in args.schedules:
            for seed in args.seeds:
                setup = Setup(seed=seed, schedule=schedule, steps=args.steps, pairs=args.pairs)
                run = run_one(setup, projs, Path(tmp) / f"{schedule}-{seed}", api, dattri_reason)
                runs.append(run)
                spear = {
                    n: round(v.get("none", next(iter(v.values())))["spearman"], 3) for n, v in run["estimates"].items()
                }
                print(
                    f"{schedule} seed {seed}: {run['timings']['total']:.0f}s same_trajectory={run['same_trajectory']} "
                    f"layout={run['layout_check']:.1e} dattri={run['dattri'].get('none')} spearman(none)={spear}",
                    flush=True,
                )
    elapsed = time.monotonic() - started
    table = aggregate(runs, projs)
    dims = runs[0]["dims"]
    md = markdown(table, projs, dims, dattri_reason)
    agreement = [
        v["max_abs_diff_over_max_abs"] for r in runs for v in r["dattri"].values() if "max_abs_diff_over_max_abs" in v
    ]
    row_agreement = [
        v["max_row_relative_diff"] for r in runs for v in r["dattri"].values() if "max_row_relative_diff" in v
    ]
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "dvemb": dvemb.__version__,
            "dattri": api[2] if api else None,
        },
        "setup": {
            "steps": args.steps,
            "pairs": args.pairs,
            "hidden": Setup.hidden,
            "batch": Setup.batch,
            "lr": Setup.lr,
            "seeds": args.seeds,
            "schedules": args.schedules,
            "proj": args.proj,
        },
        "dattri_unavailable": dattri_reason,
        "dattri_max_relative_diff": max(agreement) if agreement else None,
        "dattri_max_row_relative_diff": max(row_agreement) if row_agreement else None,
        "all_same_trajectory": all(r["same_trajectory"] for r in runs),
        "max_layout_check": max(r["layout_check"] for r in runs),
        "elapsed_s": elapsed,
        "dims": dims,
        "table": table,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity_table.json").write_text(json.dumps(summary, indent=1))
    (args.out / "fidelity_table.md").write_text(md + "\n")
    print()
    print(md)
    print()
    if agreement:
        print(
            f"dattri vs dvemb empirical full-M embeddings: max |diff| / max |emb| = {max(agreement):.2e}, "
            f"max per-row relative = {max(row_agreement):.2e} (must be <= 1e-6)"
        )
    else:
        print(f"dattri: {dattri_reason}")
    print(
        f"same trajectory across recordings: {summary['all_same_trajectory']}; "
        f"log layout check: {summary['max_layout_check']:.1e}; total {elapsed:.0f}s"
    )


if __name__ == "__main__":
    main()
