"""Transformer LM fidelity, where it is lost: an ablation on bench/lm_fidelity.py's model, training and ground truth.

bench/lm_fidelity.py measures dvemb on a tiny GPT-2 (2 layers, ``n_embd`` 32, float64, AdamW, 32 steps) against
exact leave-one-out retraining. This script takes the same training (the Trainer's shuffled order, the plain
loop, bit for bit), the same sampled occurrences, the same ground truth (replays with the example removed) and
the same first-order ceiling (the exact derivative of the real training in the example's loss weight), and
scores variants of dvemb against it, one factor at a time:

- **engine rows**: logs recorded with ``dvemb.Recorder`` options (projection size, the tied embedding whole, projected
  on one side or left out, random bases, sampled labels) and computed with ``dvemb.engine.compute`` options
  (blocks, Adam's second-moment term, the SGD proxy, float64 accumulation, the scalar preconditioner);
- **linearised rows** (``lin``, :class:`Linearised`): the same first-order model without any projection, in
  parameter space: the exact derivative of every AdamW step of the real run (its parameters, moments, rates and
  weight decay) with a chosen curvature (the true Hessian of the batch loss by Hessian-vector products, the exact
  Gauss-Newton matrix of the causal-LM cross-entropy by Jacobian-vector products, the log's sampled Gauss-Newton
  rows, or the log's gradients), over every parameter or only the tracked ones, one matrix or per-layer blocks,
  with or without the second-moment term. The queries' gradients are carried backwards through the transpose of
  those maps, one curvature product per query and step, which scores every occurrence as the engine's recursion
  would with one unprojected matrix over all 28096 tracked coordinates (more than the engine can hold here).
  Two checks tie it to the rest: with the true Hessian over every parameter it reproduces the ceiling (the same
  derivative, by central differences of the real training), and with the log's rows in per-layer blocks the
  engine on the unprojected log.

Every row is scored twice: as dvemb scores (the removal taken as ``-w g_z``, the example's gradient alone,
``w = 1/B``) and **centred** (the step's mean score subtracted: the removal taken as ``-w (g_z - g_B)`` with
``g_B`` the step's batch gradient, which is what removing one example from a mean-reduced batch does to the
step's gradient: the remaining examples' mean replaces the full mean; the ceiling is centred by definition).
For the engine rows the centring is exact post hoc: embeddings are linear in the gradient, so the batch
gradient's embedding is the mean of the step's embeddings, and the engine scores every row of the step.

Run from the repository root: ``.venv/bin/python -m bench.lm_ablation`` (``--quick``: small smoke run,
BENCHMARKS.md left alone; ``--seeds N``; ``--from-json``: re-render the section from
``bench/out/lm_ablation.json``). Writes the BENCHMARKS.md section "Transformer LM fidelity: where it is lost".
About 10 minutes a seed on one core.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dvemb
from bench.fidelity import correlation
from bench.harness import provenance, replace_section
from bench.lm_fidelity import (
    QUICK,
    Corpus,
    Settings,
    Trajectory,
    _git,
    _query_batches,
    _snapshot,
    _version,
    batch_loss,
    corpus,
    grad_dot_scores,
    make_model,
    make_optimizer,
    make_scheduler,
    plain_run,
    query_losses,
    replay,
    same_trajectory,
    sample_pairs,
    trainer_run,
)
from dvemb.engine import ComputeArguments, compute, load_results

SECTION = "Transformer LM fidelity: where it is lost"
CONV1D = tuple(
    f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
)


# -- recorded runs ----------------------------------------------------------------------------------


def recorded_run(
    s: Settings, data: Corpus, seed: int, order: list[list[int]], log_dir: Path, **options: Any
) -> Trajectory:
    """The plain loop of bench/lm_fidelity.py recorded with ``dvemb.Recorder(model, log_dir, **options)``."""
    from dvemb.integrations.huggingface import causal_lm_loss

    model = make_model(s, len(data.vocab), seed)
    optimizer = make_optimizer(model, s)
    scheduler = make_scheduler(optimizer, s)
    rec = dvemb.Recorder(model, log_dir, **options)
    traj = Trajectory([], order)
    for batch in order:
        traj.params.append(_snapshot(model))
        with rec.step(batch, optimizer):
            batch_loss(model, data.train[batch], None).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    traj.params.append(_snapshot(model))
    rec.record_queries("test", _query_batches(data, s.batch), loss_fn=causal_lm_loss)
    rec.close()
    return traj


def engine_scores(
    log_dir: Path, out_dir: Path, arguments: ComputeArguments, keys: list[tuple[int, Any]]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(pairs, Q) scores of the occurrences, the same centred (minus their step's mean score), and the summary."""
    summary = compute(log_dir, out_dir, arguments, overwrite=True)
    results = load_results(out_dir)
    scores = np.asarray(results.scores("test"), dtype=np.float64)
    steps = results.row_step.numpy()
    step_mean = {int(t): scores[steps == t].mean(0) for t in np.unique(steps)}
    row = {
        (int(t), results.example_ids[int(e)]): r
        for r, (t, e) in enumerate(zip(results.row_step.tolist(), results.example_index.tolist(), strict=True))
    }
    raw = np.stack([scores[row[k]] for k in keys])
    centred = np.stack([scores[row[k]] - step_mean[k[0]] for k in keys])
    return raw, centred, summary


# -- the linearised training, unprojected -------------------------------------------------------------------


class Linearised:
    """The real AdamW run's first-order map, unprojected, in parameter space (queries carried backwards).

    Args:
        s, data, seed: the run (bench/lm_fidelity.py's model and corpus).
        ref: the unrecorded plain loop with its optimizer states and rates (``plain_run(mode="reference")``).
    """

    def __init__(self, s: Settings, data: Corpus, seed: int, ref: Trajectory) -> None:
        self.s, self.data, self.ref = s, data, ref
        model = make_model(s, len(data.vocab), seed)
        model.config._attn_implementation = "eager"  # forward-mode derivatives (Hessian-vector products)
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = {n: p.shape for n, p in named}
        sizes = [p.numel() for _, p in named]
        self.offsets = dict(zip(self.names, np.cumsum([0, *sizes[:-1]]).tolist(), strict=True))
        self.size = int(sum(sizes))
        # Index of every coordinate of each dvemb layer (the log's layout: Linear (out, in + bias), row-major).
        self.layer_index: dict[str, torch.Tensor] = {}
        for name in CONV1D:
            nx, nf = self.shapes[f"{name}.weight"]
            w = self.offsets[f"{name}.weight"] + torch.arange(nx * nf).view(nx, nf).T  # (nf, nx)
            b = self.offsets[f"{name}.bias"] + torch.arange(nf).view(nf, 1)
            self.layer_index[name] = torch.cat([w, b], 1).reshape(-1)
        vocab, dim = self.shapes["transformer.wte.weight"]
        self.layer_index["transformer.wte"] = self.offsets["transformer.wte.weight"] + torch.arange(vocab * dim)
        self.tracked = torch.zeros(self.size, dtype=torch.float64)
        for index in self.layer_index.values():
            self.tracked[index] = 1.0
        # AdamW's state of every step, flat, from the reference run's optimizer state dicts.
        optimizer = make_optimizer(model, s)
        ids = {id(p): n for n, p in named}
        order = [ids[id(p)] for g in optimizer.param_groups for p in g["params"]]
        self.decay = torch.zeros(self.size, dtype=torch.float64)
        self.group = torch.zeros(self.size, dtype=torch.long)
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                sl = self._slice(ids[id(p)])
                self.decay[sl], self.group[sl] = g["weight_decay"], gi
        self.betas, self.eps = optimizer.param_groups[0]["betas"], optimizer.param_groups[0]["eps"]
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = []
        for state in ref.optimizer_states:
            m = torch.zeros(self.size, dtype=torch.float64)
            v = torch.zeros(self.size, dtype=torch.float64)
            for i, name in enumerate(order):
                if i in state["state"]:
                    m[self._slice(name)] = state["state"][i]["exp_avg"].reshape(-1)
                    v[self._slice(name)] = state["state"][i]["exp_avg_sq"].reshape(-1)
            self.moments.append((m, v))
        self.flat_params = [self.flatten(p) for p in ref.params]

    def _slice(self, name: str) -> slice:
        start = self.offsets[name]
        return slice(start, start + int(np.prod(self.shapes[name])))

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1).to(torch.float64) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {n: flat[self._slice(n)].view(self.shapes[n]) for n in self.names}
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

    def from_log(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, P) parameter-space vectors of log rows given per layer as (n, d_l)."""
        n = next(iter(rows.values())).shape[0]
        out = torch.zeros(n, self.size, dtype=torch.float64)
        for name, index in self.layer_index.items():
            out[:, index] = rows[name].to(torch.float64)
        return out

    def loss(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, self.unflatten(flat), (), {"input_ids": x, "labels": x}).loss

    def logits(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(self.model, self.unflatten(flat), (), {"input_ids": x}).logits
        return out[:, :-1]

    def grad(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(self.loss)(flat, x)

    def example_grads(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, P) gradient of each sequence's own loss (the mean over its shifted tokens)."""
        return torch.stack([self.grad(flat, x[i : i + 1]) for i in range(len(x))])

    def query_grads(self) -> torch.Tensor:
        """(Q, P) query gradients at the final parameters."""
        flat = self.flat_params[-1]
        return torch.stack([self.grad(flat, q[None]) for q in self.data.queries])

    # curvature products: (P, N) -> (P, N) batch-loss curvature times X

    def hessian(self, flat: torch.Tensor, x: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        grad = torch.func.grad(self.loss)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda f: grad(f, x), (flat,), (v,))[1]

        return torch.cat([torch.func.vmap(hvp, in_dims=1, out_dims=1)(c) for c in X.split(48, 1)], 1)

    def ggn(self, flat: torch.Tensor, x: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Exact Gauss-Newton matrix of the mean causal-LM cross-entropy (every class at every position)."""
        logits, vjp = torch.func.vjp(lambda f: self.logits(f, x), flat)
        p = torch.softmax(logits, -1)
        weight = 1.0 / (logits.shape[0] * logits.shape[1])

        def product(v: torch.Tensor) -> torch.Tensor:
            jv = torch.func.jvp(lambda f: self.logits(f, x), (flat,), (v,))[1]
            u = weight * (p * jv - p * (p * jv).sum(-1, keepdim=True))
            return vjp(u)[0]

        return torch.cat([torch.func.vmap(product, in_dims=1, out_dims=1)(c) for c in X.split(48, 1)], 1)

    def rows_product(self, rows: torch.Tensor, X: torch.Tensor, weight: float, blocks: str) -> torch.Tensor:
        """``w sum_h h h^T X`` for rows (n, P), one matrix or per-layer blocks."""
        if blocks == "full":
            return weight * rows.T @ (rows @ X)
        out = torch.zeros_like(X)
        for index in self.layer_index.values():
            r = rows[:, index]
            out[index] = weight * r.T @ (r @ X[index])
        return out

    def step_maps(self, k: int, second_moment: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """AdamW's derivative at step k, elementwise: ``c`` (decay), ``alpha`` (rate over the first moment),
        ``sigma`` (over the second moment) and ``nu = 2 (1 - b2) g``; ``sigma = nu = 0`` without the term."""
        b1, b2 = self.betas
        m, v = self.moments[k]
        g = self.grad(self.flat_params[k], self.data.train[self.ref.order[k]])
        t = k + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        m_hat = (b1 * m + (1 - b1) * g) / bc1
        v_hat = (b2 * v + (1 - b2) * g * g) / bc2
        den = v_hat.sqrt() + self.eps
        lr = torch.tensor(self.ref.lrs[k], dtype=torch.float64)[self.group]
        alpha = lr / bc1 / den
        zero = torch.zeros_like(v_hat)
        sigma = torch.where(v_hat > 0, lr * m_hat / (2 * v_hat.sqrt() * den * den * bc2), zero)
        nu = 2 * (1 - b2) * g
        if not second_moment:
            sigma, nu = zero, zero
        return 1 - lr * self.decay, alpha, sigma, nu

    def adjoint(
        self,
        queries: torch.Tensor,
        curvature: Callable[[int, torch.Tensor], torch.Tensor],
        *,
        tracked_only: bool,
        second_moment: bool,
    ) -> list[torch.Tensor]:
        """Per step k, (P, Q) ``d (query . theta_T) / d e_k``: a gradient change ``e`` at step k moves the
        queries' final losses by ``e . result[k]`` to first order.

        The transpose of :meth:`run`'s map, one curvature product with Q columns per step, backwards from
        ``lambda_theta = q``: ``mu = lambda_m - alpha M lambda_theta``, ``rho = lambda_v + sigma M lambda_theta``,
        ``delta = (1 - b1) mu + nu rho``; ``result[k] = M delta``, ``lambda_theta = c M lambda_theta + M H M delta``,
        ``lambda_m = b1 mu``, ``lambda_v = b2 rho`` (``M`` the tracked mask).
        """
        b1, b2 = self.betas
        mask = (self.tracked if tracked_only else torch.ones(self.size, dtype=torch.float64))[:, None]
        lam = queries.T.to(torch.float64) * mask
        lam_m = torch.zeros_like(lam)
        lam_v = torch.zeros_like(lam)
        out: list[torch.Tensor] = [lam] * len(self.ref.order)
        for k in range(len(self.ref.order) - 1, -1, -1):
            c, alpha, sigma, nu = self.step_maps(k, second_moment)
            lt = mask * lam
            mu = lam_m - alpha[:, None] * lt
            rho = lam_v + sigma[:, None] * lt
            delta = mask * ((1 - b1) * mu + nu[:, None] * rho)
            out[k] = delta
            lam = c[:, None] * lt + mask * curvature(k, delta) if k > 0 else lt
            lam_m, lam_v = b1 * mu, b2 * rho
        return out


def adjoint_scores(
    lin: Linearised,
    pairs: list[tuple[int, int]],
    curvatures: dict[str, Callable[[int, torch.Tensor], torch.Tensor]],
    variants: dict[str, tuple[str, bool, bool]],
    log: Callable[[str], None] = print,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(raw, centred) (pairs, Q) scores of variants ``name -> (curvature, tracked_only, second_moment)``: the
    removal as ``e = -g_z / B``, and centred, ``e = -(g_z - g_B) / B`` (the step's mean score subtracted)."""
    s = lin.s
    grads = [lin.example_grads(lin.flat_params[k], lin.data.train[b]) for k, b in enumerate(lin.ref.order)]
    q = lin.query_grads()
    out = {}
    for name, (curv, tracked_only, second_moment) in variants.items():
        started = time.time()
        sens = lin.adjoint(q, curvatures[curv], tracked_only=tracked_only, second_moment=second_moment)
        per_step = [(-grads[k] / s.batch) @ sens[k] for k in range(len(sens))]  # (B, Q): e = -g_z / B
        raw = np.stack([per_step[t][p].numpy() for t, p in pairs])
        centred = np.stack([(per_step[t][p] - per_step[t].mean(0)).numpy() for t, p in pairs])
        out[name] = (raw, centred)
        log(f"  lin {name}: {time.time() - started:.0f} s")
    return out


def log_rows(lin: Linearised, log_dir: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per step: the log's Gauss-Newton rows (n_k, P) and its per-example gradients (B, P), in parameter space
    (an unprojected log)."""
    log = dvemb.open_log(log_dir)
    curv: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for shard in log.iter_shards():
        for t in shard.steps.tolist():
            rows = shard.row_step == t
            grads.append(lin.from_log({n: g[rows] for n, g in shard.grads.items()}))
            if shard.curvature:
                c = {n: f[rows].reshape(-1, f.shape[-1]) for n, f in shard.curvature.items()}
                curv.append(lin.from_log(c))
    return curv, grads


# -- one seed -----------------------------------------------------------------------------------------

#: Recorded logs: name -> Recorder options (the plain loop of bench/lm_fidelity.py, bit for bit).
LOGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "random": {"projection": "random"},
    "p64": {"proj_dim": 64},
    "p1024": {"proj_dim": 1024},
    "wte_whole": {"proj_dim": {"transformer.wte": None, "*": 256}},
    "wte_whole_p64": {"proj_dim": {"transformer.wte": None, "*": 64}},
    "wte_v32": {"proj_dim": {"transformer.wte": (32, 32), "*": 256}},
    "wte_e16": {"proj_dim": {"transformer.wte": (92, 16), "*": 256}},
    "no_embedding": {"layers": list(CONV1D)},
    "samples4": {"curvature_samples": 4},
    "whole": {"proj_dim": None},
    "whole_samples4": {"proj_dim": None, "curvature_samples": 4},
}
WTE_WHOLE = '`proj_dim={"transformer.wte": None, "*": 256}`'

#: Engine rows: name -> (log, ComputeArguments options, label). ``e_whole`` runs on the first seed only (the check
#: of the linearised rows; it takes minutes), the rest on every seed.
ENGINE: dict[str, tuple[str, dict[str, Any], str]] = {
    "e_whole": ("whole", {}, 'no projection (per-layer blocks: `blocks="auto"` at 28096 dims), first seed only'),
    "e_defaults": (
        "defaults",
        {},
        '**defaults**: `Recorder(model, log_dir)`: 256 per layer, fitted bases, `blocks="full"`',
    ),
    "e_defaults_layer": ("defaults", {"blocks": "layer"}, 'defaults, `blocks="layer"`'),
    "e_defaults_f64": ("defaults", {"accumulate_dtype": "float64"}, 'defaults, `accumulate_dtype="float64"`'),
    "e_defaults_scalar": (
        "defaults",
        {"projected_preconditioner": "scalar"},
        'defaults, `projected_preconditioner="scalar"`',
    ),
    "e_sgd_proxy": ("defaults", {"propagation": "sgd-proxy"}, 'defaults, `propagation="sgd-proxy"` (no AdamW map)'),
    "e_samples4": ("samples4", {}, "defaults, `curvature_samples=4`"),
    "e_random": ("random", {}, '256 per layer, `projection="random"` (no fitted bases)'),
    "e_p64": ("p64", {}, '64 per layer (8x8), `blocks="full"`'),
    "e_p1024": ("p1024", {"blocks": "full"}, '1024 per layer (32x32), `blocks="full"`'),
    "e_p1024_layer": ("p1024", {}, '1024 per layer, `blocks="layer"` (auto at 9216 dims)'),
    "e_no_embedding": (
        "no_embedding",
        {},
        '256 per layer, `transformer.wte` / `lm_head` not recorded (`layers=` the 8 Conv1D layers), `blocks="full"`',
    ),
    "e_wte_v32": (
        "wte_v32",
        {},
        '`transformer.wte` projected on its vocabulary side only (`(32, 32)`: 92 -> 32, the 32 embedding dims whole), others 256, `blocks="full"`',
    ),
    "e_wte_e16": (
        "wte_e16",
        {},
        '`transformer.wte` projected on its embedding side only (`(92, 16)`), others 256, `blocks="full"`',
    ),
    "e_wte_whole": (
        "wte_whole",
        {"blocks": "full"},
        f'`transformer.wte` whole, others 256 ({WTE_WHOLE}), `blocks="full"`',
    ),
    "e_wte_whole_layer": ("wte_whole", {}, '`transformer.wte` whole, others 256, `blocks="layer"` (auto at 4992 dims)'),
    "e_wte_whole_nosm": (
        "wte_whole",
        {"blocks": "full", "second_moment": False},
        '`transformer.wte` whole, others 256, `blocks="full"`, `second_moment=False`',
    ),
    "e_wte_whole_sgd": (
        "wte_whole",
        {"blocks": "full", "propagation": "sgd-proxy"},
        '`transformer.wte` whole, others 256, `blocks="full"`, `propagation="sgd-proxy"`',
    ),
    "e_wte_whole_p64": ("wte_whole_p64", {}, '`transformer.wte` whole, others 64 (8x8), `blocks="full"`'),
}

#: Linearised rows (unprojected, parameter space): name -> (curvature, tracked only, second moment, label).
LINEAR: dict[str, tuple[str, bool, bool, str]] = {
    "lin_hessian_all": ("hessian", False, True, "true Hessian, every parameter (the ceiling's own derivative)"),
    "lin_hessian": ("hessian", True, True, "true Hessian, tracked parameters only (no `wpe`, LayerNorms)"),
    "lin_ggn": ("ggn", True, True, "exact Gauss-Newton (every class at every token), tracked"),
    "lin_rows4": ("rows4-full", True, True, "Gauss-Newton rows of `curvature_samples=4`, one matrix"),
    "lin_rows": (
        "rows-full",
        True,
        True,
        'the log\'s Gauss-Newton rows (1 sampled label), one matrix (`blocks="full"`)',
    ),
    "lin_rows_nosm": ("rows-full", True, False, "the log's rows, one matrix, no second-moment term"),
    "lin_rows_layer": (
        "rows-layer",
        True,
        True,
        "the log's rows, per-layer blocks (what the engine computes unprojected)",
    ),
    "lin_rows_layer_nosm": ("rows-layer", True, False, "the log's rows, per-layer blocks, no second-moment term"),
    "lin_empirical": ("empirical-full", True, True, "empirical curvature (the log's gradients), one matrix"),
    "lin_empirical_layer": ("empirical-layer", True, True, "empirical curvature, per-layer blocks"),
}


def run_seed(
    s: Settings, data: Corpus, seed: int, work: Path, log: Callable[[str], None] = print, *, first: bool = True
) -> dict[str, Any]:
    """Every row's scores of one seed against the exact removal; ``first``: also the engine on the unprojected
    log (``e_whole``, the linearised rows' check)."""
    started = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal started
        timings[name] = round(time.time() - started, 1)
        log(f" {name}: {timings[name]} s")
        started = time.time()

    order = trainer_run(s, data, seed, work).order  # the Trainer's shuffled order, as bench/lm_fidelity.py
    ref = plain_run(s, data, seed, order, mode="reference")
    checks: dict[str, Any] = {}
    for name, options in LOGS.items():
        checks[f"{name} recorded = plain loop"] = same_trajectory(
            recorded_run(s, data, seed, order, work / f"log-{name}", **options), ref
        )
    if not all(checks.values()):
        raise RuntimeError(f"recording changed the training trajectory: {checks}")
    lap("recorded")

    pairs = sample_pairs(s, seed)
    keys = [(t, order[t][p]) for t, p in pairs]
    model = make_model(s, len(data.vocab), seed)
    base = query_losses(model, ref.params[-1], data.queries)
    if not torch.equal(replay(s, data, seed, ref, s.steps // 2, -1, None), base):
        raise RuntimeError("a replay with nothing removed does not reproduce training")
    truth = np.stack([(replay(s, data, seed, ref, t, p, None) - base).numpy() for t, p in pairs])
    lap("ground truth")
    h = s.ceiling_h
    ceiling = np.stack(
        [
            (-(replay(s, data, seed, ref, t, p, 1.0 + h) - replay(s, data, seed, ref, t, p, 1.0 - h)) / (2 * h)).numpy()
            for t, p in pairs
        ]
    )
    lap("ceiling")

    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {"ceiling": (ceiling, ceiling)}
    settings_seen: dict[str, Any] = {}
    for name, (log_name, options, _) in ENGINE.items():
        if name == "e_whole" and not first:
            continue
        raw, centred, summary = engine_scores(
            work / f"log-{log_name}", work / f"out-{name}", ComputeArguments(**options), keys
        )
        scores[name] = (raw, centred)
        settings_seen[name] = {
            "blocks": summary.get("blocks"),
            "propagation": summary.get("propagation"),
            "curvature": summary.get("curvature"),
            "approximations": sorted(a.get("kind", "?") for a in summary.get("approximations") or []),
        }
        lap(f"engine {name}")
    manifests = {name: json.loads((work / f"log-{name}" / "manifest.json").read_text()) for name in LOGS}
    layers_seen = {
        name: [(e["name"], e["k_out"], e["k_in"], e.get("basis")) for e in m["layers"]] for name, m in manifests.items()
    }
    grad_dot = grad_dot_scores(work / "log-whole", "test", keys)
    scores["grad_dot"] = (grad_dot, grad_dot - _step_means_grad_dot(work / "log-whole", keys))

    lin = Linearised(s, data, seed, ref)
    rows1, grads = log_rows(lin, work / "log-whole")
    rows4, _ = log_rows(lin, work / "log-whole_samples4")
    w = 1.0 / s.batch
    train = data.train
    curvatures: dict[str, Callable[[int, torch.Tensor], torch.Tensor]] = {
        "hessian": lambda k, X: lin.hessian(lin.flat_params[k], train[order[k]], X),
        "ggn": lambda k, X: lin.ggn(lin.flat_params[k], train[order[k]], X),
        "rows-full": lambda k, X: lin.rows_product(rows1[k], X, w, "full"),
        "rows-layer": lambda k, X: lin.rows_product(rows1[k], X, w, "layer"),
        "rows4-full": lambda k, X: lin.rows_product(rows4[k], X, w, "full"),
        "empirical-full": lambda k, X: lin.rows_product(grads[k], X, w, "full"),
        "empirical-layer": lambda k, X: lin.rows_product(grads[k], X, w, "layer"),
    }
    variants = {name: (curv, tracked, sm) for name, (curv, tracked, sm, _) in LINEAR.items()}
    scores.update(adjoint_scores(lin, pairs, curvatures, variants, log=log))
    lap("linearised")

    late = np.array([t >= s.warmup_steps for t, _ in pairs])
    result: dict[str, Any] = {"seed": seed, "pairs": pairs, "checks": checks}
    for which, index in (("raw", 0), ("centred", 1)):
        result[f"spearman_{which}"] = {k: correlation(v[index], truth, spearman=True) for k, v in scores.items()}
        result[f"spearman_{which}_after_warmup"] = {
            k: correlation(v[index][late], truth[late], spearman=True) for k, v in scores.items()
        }
    # The linearised training against the ceiling (the same derivative) and against the engine (the same estimate).
    fa, ea = scores["lin_hessian_all"][1], scores["lin_rows_layer"][0]
    result["check_linearised_vs_ceiling"] = float(np.abs(fa - ceiling).max() / np.abs(ceiling).max())
    if "e_whole" in scores:
        result["check_linearised_vs_engine"] = float(np.abs(scores["e_whole"][0] - ea).max() / np.abs(ea).max())
    result["truth_vs_ceiling"] = correlation(ceiling, truth, spearman=True)
    result["settings_seen"] = settings_seen
    result["layers_seen"] = layers_seen
    result["pairs_after_warmup"] = int(late.sum())
    result["seconds"] = timings
    log(
        f"seed {seed}: "
        + ", ".join(f"{k} {v:.2f}/{result['spearman_centred'][k]:.2f}" for k, v in result["spearman_raw"].items())
    )
    return result


def _step_means_grad_dot(log_dir: Path, keys: list[tuple[int, Any]]) -> np.ndarray:
    """(pairs, Q) mean gradient dot product of each key's step (for the centred gradient dot product)."""
    log = dvemb.open_log(log_dir)
    queries = log.load_query_set("test")
    q = torch.cat([queries.grads[layer.name] for layer in log.layers], 1).double()
    means: dict[int, torch.Tensor] = {}
    for shard in log.iter_shards():
        grads = torch.cat([shard.grads[layer.name] for layer in log.layers], 1).double()
        for t in shard.steps.tolist():
            means[int(t)] = grads[shard.row_step == t].mean(0) @ q.T
    return np.stack([means[t].numpy() for t, _ in keys])


# -- report -------------------------------------------------------------------------------------------


def _rows() -> list[tuple[str, str]]:
    """The table's rows in order: ceiling, linearised (unprojected), engine, gradient dot product."""
    rows = [("ceiling", "first-order ceiling (exact derivative of the real training: central differences of replays)")]
    for name, (_, _, _, label) in LINEAR.items():
        rows.append((name, f"lin: {label}"))
        if name == "lin_rows_layer":
            rows.append(("e_whole", f"engine: {ENGINE['e_whole'][2]}"))
    rows += [(name, f"engine: {label}") for name, (_, _, label) in ENGINE.items() if name != "e_whole"]
    rows.append(("grad_dot", "gradient dot product (final query gradient . recorded gradient, unprojected)"))
    return rows


#: Factors: (what is lost, the row without the loss, the row with it, column); the loss is the difference.
FACTORS: list[tuple[str, str, str, str]] = [
    (
        "`transformer.wte` (tied to `lm_head`) under its random 256 projection instead of stored whole "
        '(the other layers at 256, `blocks="full"`)',
        "e_wte_whole",
        "e_defaults",
        "spearman_centred",
    ),
    (
        "the removal taken as `-g_z/B` (dvemb's scores) instead of `-(g_z - g_B)/B` (centred), at the "
        "`transformer.wte`-whole row",
        "e_wte_whole",
        "e_wte_whole",
        "raw",
    ),
    (
        "the removal taken as `-g_z/B` instead of centred, at exact first order (true Hessian, every parameter)",
        "lin_hessian_all",
        "lin_hessian_all",
        "raw",
    ),
    ("Adam's second-moment term left out (unprojected, one matrix)", "lin_rows", "lin_rows_nosm", "spearman_centred"),
    (
        "Adam's second-moment term left out of `transformer.wte` (whole; the other layers never carry it)",
        "e_wte_whole",
        "e_wte_whole_nosm",
        "spearman_centred",
    ),
    ("per-layer blocks instead of one matrix (unprojected)", "lin_rows", "lin_rows_layer", "spearman_centred"),
    (
        "per-layer blocks instead of one matrix (`transformer.wte` whole, others 256)",
        "e_wte_whole",
        "e_wte_whole_layer",
        "spearman_centred",
    ),
    (
        "the 8 Conv1D layers projected to 256 with fitted bases (`transformer.wte` whole, one matrix)",
        "lin_rows",
        "e_wte_whole",
        "spearman_centred",
    ),
    ("1 sampled label per token instead of the exact Gauss-Newton matrix", "lin_ggn", "lin_rows", "spearman_centred"),
    ("Gauss-Newton instead of the true Hessian (tracked parameters)", "lin_hessian", "lin_ggn", "spearman_centred"),
    ("untracked parameters (`wpe`, LayerNorms) left out", "lin_hessian_all", "lin_hessian", "spearman_centred"),
    ("empirical curvature instead of the log's Gauss-Newton rows", "lin_rows", "lin_empirical", "spearman_centred"),
    (
        "the SGD proxy instead of the AdamW map (`transformer.wte` whole, others 256)",
        "e_wte_whole",
        "e_wte_whole_sgd",
        "spearman_centred",
    ),
]


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]" if values else "-"


def _deltas(runs: list[dict[str, Any]], better: str, worse: str, column: str) -> list[float]:
    """Per seed: the better row's score minus the worse one's (``raw``: centred minus raw of one row)."""
    if column == "raw":
        return [r["spearman_centred"][better] - r["spearman_raw"][worse] for r in runs]
    return [r[column][better] - r[column][worse] for r in runs]


def factors_text(runs: list[dict[str, Any]]) -> str:
    """The factors, largest loss first, with the per-seed spread."""
    found = [(float(np.mean(d)), label, d) for label, b, w, col in FACTORS for d in [_deltas(runs, b, w, col)]]
    found.sort(key=lambda f: -f[0])
    return "\n".join(
        f"{i}. {label}: {mean:+.2f} [{min(d):+.2f}, {max(d):+.2f}]" for i, (mean, label, d) in enumerate(found, 1)
    )


def reading(runs: list[dict[str, Any]]) -> str:
    """The paragraphs under the table (their figures from the runs)."""
    m = lambda name, key="spearman_raw": mean_of(runs, name, key)  # noqa: E731
    c = lambda name: mean_of(runs, name, "spearman_centred")  # noqa: E731
    wte = [ko * ki for name, ko, ki, _ in runs[0]["layers_seen"]["wte_whole"] if name == "transformer.wte"]
    chain = [
        ("defaults", m("e_defaults")),
        ("`transformer.wte` stored whole (its second-moment term with it)", m("e_wte_whole")),
        ("centred (the removal as the ground truth makes it)", c("e_wte_whole")),
        ("no projection of the Conv1D layers either (the same rows, one matrix)", c("lin_rows")),
        ("the exact Gauss-Newton matrix instead of 1 sampled label", c("lin_ggn")),
        ("the true Hessian instead of Gauss-Newton", c("lin_hessian")),
        ("every parameter (`wpe`, LayerNorms too): the ceiling's own derivative", c("lin_hessian_all")),
    ]
    steps = [f"{label} {value:.2f}" for label, value in chain[:1]] + [
        f"{label} {value - chain[i][1]:+.2f} = {value:.2f}" for i, (label, value) in enumerate(chain[1:])
    ]
    return (
        "Reading (means over seeds). From the defaults to the ceiling, one change at a time: "
        + "; ".join(steps)
        + f" (the ceiling: {m('ceiling'):.2f}; {m('ceiling', 'spearman_raw_after_warmup'):.2f} after the warm-up). "
        f"Storing `transformer.wte` whole costs {wte[0]} numbers a row here; projecting it on one side only gives "
        f"{c('e_wte_v32'):.2f} centred with its vocabulary side randomly projected (92 -> 32, embedding dims whole) "
        f"and {c('e_wte_e16'):.2f} with its embedding side projected (32 -> 16, vocabulary whole; "
        f"{c('e_wte_whole_nosm'):.2f} for the whole layer without its second-moment term, which every projected "
        f"layer drops); leaving it out gives {c('e_no_embedding'):.2f}, 1024 per layer {c('e_p1024'):.2f}, and with "
        f"it whole the other layers at 64 per layer {c('e_wte_whole_p64'):.2f}. The gradient dot product: "
        f"{m('grad_dot'):.2f} / {c('grad_dot'):.2f} centred.\n\n"
        "Each factor alone, as the Spearman it costs (the row without it minus the row with it, centred unless the "
        "factor is the centring; mean [min, max] over the seeds), largest first:"
    )


def mean_of(runs: list[dict[str, Any]], name: str, key: str = "spearman_raw") -> float:
    values = [r[key][name] for r in runs if name in r[key]]
    return float(np.mean(values))


def markdown(s: Settings, runs: list[dict[str, Any]], meta: str) -> str:
    first = runs[0]
    engine_check = [r["check_linearised_vs_engine"] for r in runs if "check_linearised_vs_engine" in r]
    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `.venv/bin/python -m bench.lm_ablation` {meta}",
        "",
        'The model, training, sampled occurrences and ground truth of "Transformer LM fidelity" (GPT-2, 2 layers, '
        f"`n_embd` {s.n_embd}, float64, {s.steps} AdamW steps with linear warm-up and decay, batch {s.batch}, the "
        f"Trainer's shuffled order, plain loop; {s.pairs} occurrences x {s.query_size} queries per seed, removal "
        "replayed exactly), one factor at a time. **engine** rows: logs recorded with `dvemb.Recorder` options "
        "(each checked to take the unrecorded run's parameters bit for bit) and computed with "
        "`dvemb.engine.compute` (default `ComputeArguments` unless the row says otherwise). **lin** rows: the "
        "same first-order model with no projection at all, in parameter space (bench/lm_ablation.py "
        "`Linearised`): the exact derivative of every AdamW step of the real run (its moments, rates, weight "
        "decay, and the second-moment term unless the row says otherwise) with the row's curvature, the "
        "queries' gradients carried backwards through it (its transpose), so every occurrence is scored "
        "exactly as the engine's recursion would score it with one unprojected matrix over all 28096 tracked "
        "coordinates, which the engine cannot hold here. Checks: with the true Hessian over every parameter "
        "the linearised rows reproduce the ceiling (every seed; largest difference "
        f"{max(r['check_linearised_vs_ceiling'] for r in runs):.1e} of the largest ceiling score; the same "
        "Spearman to two decimals in every column), and with the log's rows in per-layer blocks the engine on the unprojected log "
        + (
            f"(first seed; largest difference {max(engine_check):.1e} of the largest score: float32 storage and "
            "accumulation)."
            if engine_check
            else "(not run)."
        ),
        "",
        "Cells: mean over queries of the Spearman correlation across occurrences with the exact removal, "
        f"mean [min, max] over {len(runs)} seed{'s' if len(runs) > 1 else ''}; after the warm-up: the occurrences "
        f"at step >= {s.warmup_steps} ({min(r['pairs_after_warmup'] for r in runs)} to "
        f"{max(r['pairs_after_warmup'] for r in runs)} of {s.pairs}). **centred**: the occurrence's score minus "
        "the mean score of its step's examples, i.e. the removal taken as `-(g_z - g_B)/B` (`g_B` the batch's "
        "mean gradient) instead of dvemb's `-g_z/B`. Removing an example from a mean-reduced batch replaces the "
        "batch's mean by the others' mean, a gradient change of `-(g_z - g_B)/(B - 1)`: that is what the ground "
        "truth replays and what the ceiling (a derivative of the batch's weighted mean) measures. For engine "
        "rows the centring is exact post hoc (the embedding is linear in the gradient, and the engine scores "
        "every example of the step). The ceiling is centred by definition (both columns).",
        "",
        "| estimator | Spearman | after warm-up | centred | centred, after warm-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in _rows():
        cells = [
            _cell([r[key][name] for r in runs if name in r[key]])
            for key in (
                "spearman_raw",
                "spearman_raw_after_warmup",
                "spearman_centred",
                "spearman_centred_after_warmup",
            )
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    seen = first["settings_seen"]
    lines += [
        "",
        reading(runs),
        "",
        factors_text(runs),
        "",
        "What the engine computed (first seed): "
        + "; ".join(
            f"{name}: blocks `{v['blocks']}`, propagation `{v['propagation']}`, curvature `{v['curvature']}`, "
            f"approximations {', '.join(v['approximations']) or 'none'}"
            for name, v in seen.items()
        )
        + ". Projected sizes per log (first seed): "
        + "; ".join(
            f"{name}: " + ", ".join(sorted({f"{ko}x{ki} {basis}" for _, ko, ki, basis in layers}))
            for name, layers in first["layers_seen"].items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run; BENCHMARKS.md is left alone")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    parser.add_argument(
        "--from-json", action="store_true", help="re-render the section from bench/out/lm_ablation.json"
    )
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout to write into"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = QUICK if args.quick else Settings()
    out = args.root / "bench" / "out"
    name = "lm_ablation_quick.json" if args.quick else "lm_ablation.json"
    if args.from_json:
        saved = json.loads((out / name).read_text())
        text = markdown(Settings(**saved["settings"]), saved["runs"], saved["meta"])
    else:
        seeds = args.seeds or (1 if args.quick else 3)
        started = time.time()
        data = corpus(s)
        runs = []
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as work:
                runs.append(
                    run_seed(
                        s,
                        data,
                        seed,
                        Path(work),
                        log=lambda m: print(m, f"({time.time() - started:.0f} s)", flush=True),
                        first=seed == 0,
                    )
                )
        elapsed = time.time() - started
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", ".")
        meta = (
            f"{provenance()}, "
            f"one thread, torch {torch.__version__}, transformers {_version('transformers')}, dvemb at {commit}"
            + (" (with uncommitted changes in dvemb/)" if dirty not in ("", "?") else "")
            + f", {seeds} seeds: {elapsed:.0f} s ({elapsed / 60:.1f} min)."
        )
        text = markdown(s, runs, meta)
        out.mkdir(exist_ok=True)
        (out / name).write_text(
            json.dumps({"settings": asdict(s), "seconds": elapsed, "meta": meta, "runs": runs}, indent=1, default=str)
        )
    print(text)
    if not (args.quick or args.no_write):
        _place_after(args.root / "BENCHMARKS.md", "Transformer LM fidelity")
        replace_section(SECTION, text, args.root / "BENCHMARKS.md")


def _place_after(path: Path, title: str) -> None:
    """Put an empty ``## SECTION`` heading right after section ``title`` when the file has none yet (so that
    replace_section fills it there instead of appending it at the end)."""
    text = path.read_text()
    if f"\n## {SECTION}\n" in text or f"\n## {title}\n" not in text:
        return
    start = text.index(f"\n## {title}\n") + 1
    end = text.find("\n## ", start + 1)
    end = len(text) if end == -1 else end + 1
    path.write_text(text[:end].rstrip("\n") + f"\n\n## {SECTION}\n\n" + text[end:])


if __name__ == "__main__":
    main()
