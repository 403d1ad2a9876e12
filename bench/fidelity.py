"""Fidelity of influence estimates against exact retraining (trajectory-specific leave-one-out).

A small MLP on scikit-learn's bundled digits is trained with plain SGD in float64 on a fixed data
order with a summed loss, recorded by dvemb. For sampled (example, step) pairs the ground truth
is obtained by replaying training from that step with the example dropped from that one batch
(nothing else changed) and measuring every test loss at the end. Estimates are compared by the
mean over test points of the Spearman (and Pearson) correlation across pairs.

Used by tests/core/test_fidelity.py (one small configuration) and by ``python -m bench.fidelity``
(the full table in BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

import dvemb
from dvemb.engine import ComputeArguments, compute


@dataclass(frozen=True)
class Setup:
    """One training run to attribute."""

    seed: int = 0
    schedule: str = "constant"  # or "warmup-cosine"
    steps: int = 120
    batch: int = 16
    lr: float = 0.02
    hidden: int = 24
    train_size: int = 480
    test_size: int = 40
    pairs: int = 100
    optimizer: str = "sgd"  # "sgd", "momentum", "adam" or "adamw" (see OPTIMIZERS)
    projection: str = "random"  # "calibrated": rec.calibrate() on calibration_batches first; "auto": the defaults
    calibration_batches: int = 8
    lookahead_steps: int = 0  # calibrate at the model this many optimizer steps into training (restored after)
    second_moment_rank: int | None = None  # Recorder(second_moment_rank=...); None: the recorder's default


#: The optimizer of each Setup.optimizer, with the rate it trains the digits MLP well at.
OPTIMIZERS = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
}


@dataclass
class Trajectory:
    model: nn.Module
    params: list[dict[str, torch.Tensor]]  # parameters before each step, and after the last
    optimizer_states: list[dict[str, object]]  # optimizer.state_dict() before each step
    batches: list[torch.Tensor]  # example indices per step
    lrs: list[float]
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    optimizer: str = "sgd"


def _data(setup: Setup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    train, test = order[: setup.train_size], order[setup.train_size : setup.train_size + setup.test_size]
    return x[train], y[train], x[test], y[test]


def _lr_at(setup: Setup, step: int) -> float:
    if setup.schedule == "constant":
        return setup.lr
    warmup = max(1, setup.steps // 10)
    if step < warmup:
        return setup.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, setup.steps - warmup)
    return setup.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    setup: Setup, log_dir: Path, *, curvature: str, proj_dim: object = None, curvature_samples: int | None = None
) -> Trajectory:
    """Train with the recorder, keeping every step's parameters for the replays."""
    torch.manual_seed(setup.seed)
    x, y, x_test, y_test = _data(setup)
    model = nn.Sequential(nn.Linear(64, setup.hidden), nn.Tanh(), nn.Linear(setup.hidden, 10)).double()
    optimizer = OPTIMIZERS[setup.optimizer](model.parameters(), setup.lr)
    rec = dvemb.Recorder(
        model,
        log_dir,
        proj_dim=proj_dim,
        curvature=curvature,
        loss_reduction="sum",
        dtype="float64",
        curvature_samples=curvature_samples,
        seed=setup.seed,
        overwrite=True,
        projection={"calibrated": "calibrated", "auto": "auto"}.get(setup.projection, "random"),
        **({} if setup.second_moment_rank is None else {"second_moment_rank": setup.second_moment_rank}),
    )
    if setup.projection == "calibrated":
        # Batches of the training set in an order of their own: training's generator is not touched.
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(setup.seed + 7))
        calibration = [
            (x[order[i * setup.batch : (i + 1) * setup.batch]], y[order[i * setup.batch : (i + 1) * setup.batch]])
            for i in range(setup.calibration_batches)
        ]
        rec.calibrate(calibration, optimizer=optimizer, lookahead_steps=setup.lookahead_steps)
    generator = torch.Generator().manual_seed(setup.seed)
    per_epoch = len(x) // setup.batch
    batches: list[torch.Tensor] = []
    params, lrs, states = [], [], []
    for step in range(setup.steps):
        if step % per_epoch == 0:
            perm = torch.randperm(len(x), generator=generator)
        batch = perm[(step % per_epoch) * setup.batch : (step % per_epoch + 1) * setup.batch]
        lr = _lr_at(setup, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        params.append({k: v.detach().clone() for k, v in model.named_parameters()})
        states.append(copy.deepcopy(optimizer.state_dict()))
        with rec.step(batch, optimizer):
            logits = model(x[batch])
            if curvature == "ggn":
                rec.curvature(logits)
            F.cross_entropy(logits, y[batch], reduction="sum").backward()
            optimizer.step()
            optimizer.zero_grad()
        batches.append(batch)
        lrs.append(lr)
    params.append({k: v.detach().clone() for k, v in model.named_parameters()})
    rec.record_queries("test", [(x_test, y_test, list(range(len(x_test))))])
    rec.close()
    return Trajectory(model, params, states, batches, lrs, x, y, x_test, y_test, setup.optimizer)


def same_trajectory(a: Trajectory, b: Trajectory) -> bool:
    """True when two trainings took bit for bit the same parameters at every step (recording must not
    change training)."""
    return len(a.params) == len(b.params) and all(
        torch.equal(p[k], q[k]) for p, q in zip(a.params, b.params, strict=True) for k in p
    )


def _test_losses(model: nn.Module, params: dict[str, torch.Tensor], traj: Trajectory) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(functional_call(model, params, (traj.x_test,)), traj.y_test, reduction="none")


def sample_pairs(setup: Setup, traj: Trajectory) -> list[tuple[int, int]]:
    """(step, position in batch) pairs, uniformly over steps."""
    rng = np.random.default_rng(setup.seed + 99)
    steps = rng.integers(0, setup.steps, size=setup.pairs)
    return [(int(s), int(rng.integers(0, setup.batch))) for s in steps]


def ground_truth(traj: Trajectory, pairs: list[tuple[int, int]]) -> np.ndarray:
    """(pairs, test) loss change when the example is dropped from its one batch: positive = it helped.

    Training is replayed from that step with the same optimizer in its state of that step (momentum
    buffers, Adam moments, step counts), so the truth is exact for every optimizer. With the summed
    loss, weight 0 is the example dropped.
    """
    base = _test_losses(traj.model, traj.params[-1], traj)
    return np.stack([(replay_weighted(traj, step, position, 0.0) - base).numpy() for step, position in pairs])


def replay_weighted(traj: Trajectory, step: int, position: int, weight: float) -> torch.Tensor:
    """(test,) final test losses when one example's loss at ``step`` is weighted by ``weight``."""
    replica = copy.deepcopy(traj.model)
    with torch.no_grad():
        for name, p in replica.named_parameters():
            p.copy_(traj.params[step][name])
    optimizer = OPTIMIZERS[traj.optimizer](replica.parameters(), traj.lrs[step])
    optimizer.load_state_dict(copy.deepcopy(traj.optimizer_states[step]))
    for t in range(step, len(traj.batches)):
        batch = traj.batches[t]
        for group in optimizer.param_groups:
            group["lr"] = traj.lrs[t]
        per_example = F.cross_entropy(replica(traj.x[batch]), traj.y[batch], reduction="none")
        if t == step:
            weights = torch.ones_like(per_example)
            weights[position] = weight
            per_example = per_example * weights
        per_example.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    final = {k: v.detach() for k, v in replica.named_parameters()}
    return _test_losses(traj.model, final, traj)


def _rank(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a, axis=0), axis=0).astype(np.float64)


def correlation(estimate: np.ndarray, truth: np.ndarray, *, spearman: bool) -> float:
    """Mean over test points (columns) of the correlation across pairs (rows)."""
    a, b = (_rank(estimate), _rank(truth)) if spearman else (estimate, truth)
    a, b = a - a.mean(0), b - b.mean(0)
    r = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0) + 1e-300)
    return float(r.mean())


def dvemb_scores(
    log_dir: Path, out_dir: Path, pairs: list[tuple[int, int]], setup: Setup, **kwargs: object
) -> np.ndarray:
    """(pairs, test) dvemb scores read from the computed per-occurrence score file."""
    compute(log_dir, out_dir, ComputeArguments(accumulate_dtype="float64", **kwargs), overwrite=True)  # type: ignore[arg-type]
    scores = np.load(out_dir / "scores-test.npy")
    return np.stack([scores[step * setup.batch + position] for step, position in pairs])


def grad_dot_scores(log_dir: Path, pairs: list[tuple[int, int]], setup: Setup) -> np.ndarray:
    """(pairs, test) plain gradient dot products g_s(z) . grad l(theta_T, z_test): no training dynamics."""
    log = dvemb.open_log(log_dir)
    queries = log.load_query_set("test")
    q = torch.cat([queries.grads[layer.name] for layer in log.layers], 1)
    rows = []
    for shard in log.iter_shards():
        rows.append(torch.cat([shard.grads[layer.name] for layer in log.layers], 1))
    grads = torch.cat(rows)
    return np.stack([(grads[s * setup.batch + p] @ q.T).numpy() for s, p in pairs])


def measure(setup: Setup, work: Path | None = None) -> dict[str, float]:
    """Spearman correlations of empirical, ggn (all classes) and the gradient dot product for one setup."""
    work = work or Path(tempfile.mkdtemp())
    results: dict[str, float] = {}
    traj = train(setup, work / "log-ggn", curvature="ggn")
    pairs = sample_pairs(setup, traj)
    truth = ground_truth(traj, pairs)
    for name, curvature in [("empirical", "empirical"), ("ggn", "ggn")]:
        est = dvemb_scores(work / "log-ggn", work / f"out-{name}", pairs, setup, curvature=curvature, blocks="full")
        results[name] = correlation(est, truth, spearman=True)
    results["grad_dot"] = correlation(grad_dot_scores(work / "log-ggn", pairs, setup), truth, spearman=True)
    return results


if __name__ == "__main__":
    import time

    t0 = time.time()
    for seed in range(3):
        print(seed, measure(Setup(seed=seed)), f"{time.time() - t0:.1f}s")
