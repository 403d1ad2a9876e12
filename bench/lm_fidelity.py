"""Transformer LM fidelity: dvemb's scores on a small GPT-2 against exact retraining (BENCHMARKS.md).

A tiny causal language model (``transformers.GPT2Config``: 2 layers, 4 heads, no dropout, float64) is
trained from scratch on character sequences cut from Python standard-library source files (read from
``os.path.dirname(os.__file__)``; the vocabulary is built here: no download, no hub) with AdamW, linear
warm-up and linear decay (the Trainer's defaults: torch's fused AdamW, weight decay outside biases and
LayerNorms), 2 epochs. The same training, with the same data order, is taken by:

- ``plain``: a plain loop with ``dvemb.Recorder(model, log_dir)`` and no options (what a user gets);
- ``trainer``: the Hugging Face ``Trainer`` with ``dvemb.integrations.huggingface.record(trainer, log_dir)``
  and no options (the plain loop follows the Trainer's own shuffled order, captured from an unrecorded
  Trainer run);
- ``recipe``: the README's recipe for a causal LM: ``dvemb.Recorder(model, log_dir)`` (Gauss-Newton
  curvature found at the model's output), ``rec.calibrate(first 8 batches, optimizer=...,
  lookahead_steps=total_steps // 10, scheduler=..., lookahead_loss_fn=causal_lm_loss)`` (what
  ``record(trainer)`` does);
- ``recipe_verbatim``: the README's lines as written (``rec.calibrate(batches, optimizer=...,
  lookahead_steps=...)``: no scheduler, so a linear warm-up's rate 0, and unshifted labels);
- ``whole``: no projection (``proj_dim=None``), Gauss-Newton curvature, no calibration;
- ``grad_dot``: the final model's query gradient dotted with the occurrence's recorded gradient (from the
  unprojected log): no training dynamics.

Every log is computed with ``dvemb.engine.compute`` and its default ``ComputeArguments``. Training is
checked bit for bit: every recorded plain loop must take exactly the parameters of the unrecorded one,
and the recorded Trainer those of the unrecorded Trainer. The Trainer's loss is not the plain loop's (it
divides by the labels it counts, ``num_items_in_batch``), so it gets its own ground truth, from a plain
loop that passes the same count (checked to take the Trainer's trajectory bit for bit). Ground truth: for sampled (step, example)
occurrences, training is replayed from that step with the example removed from its one batch (the
Hugging Face loss then averages over the remaining examples' tokens, as the Trainer's does), with the
optimizer's state (AdamW moments, step count) and the learning rate schedule as they were, and every
query's loss change at the end is measured (positive: the example helped). ``ceiling`` is the first-order
ceiling: the exact derivative of the real training in the example's loss weight (a central difference of
the replay), the best any estimate linear in the removal can do. Metric: mean over queries of the
Spearman correlation across occurrences, 3 seeds (model initialisation, the Trainer's data order, the
sampled occurrences).

Run from the repository root: ``.venv/bin/python -m bench.lm_fidelity`` (``--quick`` for a small smoke
run that leaves BENCHMARKS.md alone; ``--root`` to write the results into another checkout than the one
this file is in, e.g. when running a clean worktree of a commit). Writes ``bench/out/lm_fidelity.json``
and the BENCHMARKS.md section "Transformer LM fidelity". About 15 minutes on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import dvemb
from bench.fidelity import correlation
from bench.harness import provenance, replace_block, replace_section
from dvemb.engine import ComputeArguments, compute, load_results

SECTION = "Transformer LM fidelity"
#: Standard-library files cut into training sequences, and (held out) into query sequences.
TRAIN_FILES = ("os.py", "random.py", "textwrap.py", "string.py", "functools.py", "heapq.py")
QUERY_FILES = ("glob.py", "shlex.py", "fnmatch.py")
DATA_SEED = 1234
ESTIMATORS = ("plain", "trainer", "recipe", "recipe_verbatim", "whole", "grad_dot", "ceiling")
RECORDED = ("plain", "trainer", "recipe", "recipe_verbatim", "whole")
LABELS = {
    "plain": "plain loop, `Recorder(model, log_dir)`, no options",
    "trainer": "Trainer, `record(trainer, log_dir)`, no options",
    "recipe": "README recipe for a causal LM: `Recorder(model, log_dir)`, `rec.calibrate(8 batches, optimizer=..., "
    "lookahead_steps=total_steps // 10, scheduler=..., lookahead_loss_fn=causal_lm_loss)`",
    "recipe_verbatim": "README recipe verbatim: `rec.calibrate(8 batches, optimizer=..., "
    "lookahead_steps=total_steps // 10)`",
    "whole": "no projection, ggn, no calibration",
    "grad_dot": "gradient dot product (final query gradient . recorded gradient)",
    "ceiling": "first-order ceiling (exact derivative of the real training)",
}


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration (every seed uses it)."""

    train_size: int = 256
    query_size: int = 48
    seq_len: int = 40
    batch: int = 16
    epochs: int = 2
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 64
    pairs: int = 100
    calibration_batches: int = 8
    ceiling_h: float = 1e-4

    @property
    def steps(self) -> int:
        return self.epochs * (self.train_size // self.batch)

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_ratio * self.steps))


QUICK = Settings(train_size=64, query_size=16, seq_len=24, pairs=16, calibration_batches=2)


# -- data and model -------------------------------------------------------------------------------


@dataclass
class Corpus:
    vocab: str
    train: torch.Tensor  # (N, L) token ids
    queries: torch.Tensor  # (Q, L)


def _ascii(text: str) -> str:
    return "".join(c if c == "\n" or 32 <= ord(c) < 127 else (" " if c == "\t" else "?") for c in text)


def _chunks(files: tuple[str, ...], length: int, count: int, rng: np.random.Generator) -> list[str]:
    root = Path(os.path.dirname(os.__file__))
    text = _ascii("\n".join((root / name).read_text(encoding="utf-8") for name in files))
    windows = [text[i : i + length] for i in range(0, len(text) - length, length)]
    return [windows[i] for i in rng.choice(len(windows), size=count, replace=False)]


def corpus(s: Settings) -> Corpus:
    """Non-overlapping character windows of the training files and of the held-out query files."""
    rng = np.random.default_rng(DATA_SEED)
    train, queries = (
        _chunks(TRAIN_FILES, s.seq_len, s.train_size, rng),
        _chunks(QUERY_FILES, s.seq_len, s.query_size, rng),
    )
    vocab = "".join(sorted(set("".join(train + queries))))
    index = {c: i for i, c in enumerate(vocab)}

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[index[c] for c in t] for t in texts], dtype=torch.long)

    return Corpus(vocab, encode(train), encode(queries))


def make_model(s: Settings, vocab_size: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=s.n_positions,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).double()


def make_optimizer(model: nn.Module, s: Settings) -> torch.optim.Optimizer:
    """The Trainer's default optimizer: torch's fused AdamW, no decay on biases and LayerNorm weights."""
    from transformers.trainer_pt_utils import get_parameter_names

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], patterns))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": s.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, s: Settings) -> Any:
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, s.warmup_steps, s.steps)


def query_losses(model: nn.Module, params: dict[str, torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """(Q,) per-query causal-LM loss (mean over the shifted tokens) with the given parameters."""
    from dvemb.integrations.huggingface import causal_lm_loss

    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (), {"input_ids": queries}).logits
        return causal_lm_loss(logits, queries)


# -- training paths -------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """One training run: parameters before every step and after the last, and what replays need."""

    params: list[dict[str, torch.Tensor]]
    order: list[list[int]]  # example indices of every step
    optimizer_states: list[dict[str, Any]] = field(default_factory=list)  # before every step
    lrs: list[list[float]] = field(default_factory=list)  # every group's learning rate at every step
    # The Trainer's loss normaliser of every step (``num_items_in_batch``, the labels it counted), or None
    # for the plain loop (the model's own mean over the shifted tokens).
    counts: list[torch.Tensor] | None = None


def batch_loss(model: nn.Module, x: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
    """The Hugging Face loss of a batch: the mean over its shifted tokens, or (the Trainer) their sum divided
    by ``count``."""
    if count is None:
        return model(input_ids=x, labels=x).loss  # type: ignore[no-any-return]
    return model(input_ids=x, labels=x, num_items_in_batch=count).loss  # type: ignore[no-any-return]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def same_trajectory(a: Trajectory, b: Trajectory) -> bool:
    """True when two runs took bit for bit the same parameters at every step."""
    return len(a.params) == len(b.params) and all(
        torch.equal(p[k], q[k]) for p, q in zip(a.params, b.params, strict=True) for k in p
    )


def _query_batches(data: Corpus, size: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]]:
    q = data.queries
    return [
        ({"input_ids": q[i : i + size]}, q[i : i + size], list(range(i, min(i + size, len(q)))))
        for i in range(0, len(q), size)
    ]


def plain_run(
    s: Settings,
    data: Corpus,
    seed: int,
    order: list[list[int]],
    log_dir: Path | None = None,
    mode: str = "plain",
    counts: list[torch.Tensor] | None = None,
) -> Trajectory:
    """The plain training loop; ``mode``: ``"plain"`` (Recorder with no options), ``"recipe"``, ``"whole"``,
    or ``"reference"`` (unrecorded, keeping the optimizer states for the replays; with ``counts``, the
    Trainer's loss normalisers, it takes the Trainer's trajectory)."""
    from dvemb.integrations.huggingface import causal_lm_loss

    model = make_model(s, len(data.vocab), seed)
    optimizer = make_optimizer(model, s)
    scheduler = make_scheduler(optimizer, s)
    rec = None
    if mode == "plain":
        rec = dvemb.Recorder(model, log_dir)
    elif mode in ("recipe", "recipe_verbatim"):
        rec = dvemb.Recorder(model, log_dir)
        calibration = [({"input_ids": data.train[b]}, data.train[b]) for b in order[: s.calibration_batches]]
        if mode == "recipe":
            # The look-ahead follows the warm-up (the scheduler) and trains on the causal-LM loss (labels shifted);
            # the bases' factors stay Gauss-Newton rows. This is what record(trainer) does.
            rec.calibrate(
                calibration,
                optimizer=optimizer,
                lookahead_steps=s.steps // 10,
                scheduler=scheduler,
                lookahead_loss_fn=causal_lm_loss,
            )
        else:
            # As the README writes it: without the scheduler the look-ahead runs at the optimizer's current rate
            # (0 before the first step of a linear warm-up), on cross-entropy of the unshifted labels.
            rec.calibrate(calibration, optimizer=optimizer, lookahead_steps=s.steps // 10)
    elif mode == "whole":
        rec = dvemb.Recorder(model, log_dir, proj_dim=None)
    traj = Trajectory([], order, counts=counts)
    for t, batch in enumerate(order):
        x = data.train[batch]
        traj.params.append(_snapshot(model))
        if mode == "reference":
            traj.optimizer_states.append(copy.deepcopy(optimizer.state_dict()))
            traj.lrs.append([g["lr"] for g in optimizer.param_groups])
        with rec.step(batch, optimizer) if rec is not None else contextlib.nullcontext():
            loss = batch_loss(model, x, None if counts is None else counts[t])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    traj.params.append(_snapshot(model))
    if rec is not None:
        rec.record_queries("test", _query_batches(data, s.batch), loss_fn=causal_lm_loss)
        rec.close()
    return traj


class _Dataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def trainer_run(s: Settings, data: Corpus, seed: int, work: Path, log_dir: Path | None = None) -> Trajectory:
    """The Hugging Face Trainer (recorded with ``record(trainer, log_dir)`` when ``log_dir`` is given); the
    data order is read back from the batches that reach the model."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    model = make_model(s, len(data.vocab), seed)
    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=s.batch,
        per_device_eval_batch_size=s.batch,
        num_train_epochs=s.epochs,
        learning_rate=s.lr,
        weight_decay=s.weight_decay,
        warmup_steps=s.warmup_steps,
        lr_scheduler_type="linear",
        max_grad_norm=0.0,  # no clipping: dvemb does not model it (the plain loop does not clip either)
        seed=seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    traj = Trajectory([], [], counts=[])
    rows = {tuple(r.tolist()): i for i, r in enumerate(data.train)}
    in_step = [False]  # calibration passes before the first step are not training batches

    def take_order(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if in_step[0] and module.training and torch.is_grad_enabled():
            traj.order.append([rows[tuple(r.tolist())] for r in kwargs["input_ids"]])
            traj.counts.append(kwargs["num_items_in_batch"].detach().clone())  # type: ignore[union-attr]

    class Snapshots(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            traj.params.append(_snapshot(model))

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            in_step[0] = True

        def on_step_end(self, *a: Any, **k: Any) -> None:
            in_step[0] = False
            traj.params.append(_snapshot(model))

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Dataset(data.train),
        eval_dataset=_Dataset(data.queries),
        data_collator=default_data_collator,
        callbacks=[Snapshots()],
    )
    if log_dir is not None:
        from dvemb.integrations.huggingface import record

        record(trainer, log_dir)
    model.register_forward_pre_hook(take_order, with_kwargs=True)
    trainer.train()
    return traj


# -- ground truth ---------------------------------------------------------------------------------


def replay(
    s: Settings, data: Corpus, seed: int, ref: Trajectory, step: int, position: int, weight: float | None
) -> torch.Tensor:
    """(Q,) final query losses when the example at ``position`` of step ``step`` is removed (``weight``
    None: the Hugging Face loss on the batch without it) or its loss weighted by ``weight`` in the batch's
    weighted mean of per-example losses (for the derivative); ``position`` -1: nothing changed."""
    from dvemb.integrations.huggingface import causal_lm_loss

    model = make_model(s, len(data.vocab), seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ref.params[step][name])
    optimizer = make_optimizer(model, s)
    optimizer.load_state_dict(copy.deepcopy(ref.optimizer_states[step]))
    for t in range(step, len(ref.order)):
        for group, lr in zip(optimizer.param_groups, ref.lrs[t], strict=True):
            group["lr"] = lr
        batch = ref.order[t]
        count = None if ref.counts is None else ref.counts[t]
        if t == step and position >= 0 and weight is None:
            x = data.train[batch[:position] + batch[position + 1 :]]
            # The Trainer counts the labels of the batch it gets: one example's fewer.
            loss = batch_loss(model, x, None if count is None else count * (len(batch) - 1) / len(batch))
        elif t == step and position >= 0:
            x = data.train[batch]
            per_example = causal_lm_loss(model(input_ids=x).logits, x)
            w = torch.ones_like(per_example)
            w[position] = weight
            loss = (w * per_example).sum() / w.sum()
        else:
            loss = batch_loss(model, data.train[batch], count)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return query_losses(model, _snapshot(model), data.queries)


def sample_pairs(s: Settings, seed: int) -> list[tuple[int, int]]:
    """Distinct (step, position) occurrences, uniformly over all of them."""
    rng = np.random.default_rng(seed + 99)
    chosen = rng.choice(s.steps * s.batch, size=s.pairs, replace=False)
    return [(int(c) // s.batch, int(c) % s.batch) for c in sorted(chosen)]


# -- estimates ------------------------------------------------------------------------------------


def dvemb_scores(log_dir: Path, out_dir: Path, query_set: str, keys: list[tuple[int, Any]]) -> np.ndarray:
    """(pairs, Q) scores of the (step, example id) occurrences, computed with the default arguments."""
    compute(log_dir, out_dir, ComputeArguments(), overwrite=True)
    results = load_results(out_dir)
    scores = results.scores(query_set)
    row = {
        (int(t), results.example_ids[int(e)]): r
        for r, (t, e) in enumerate(zip(results.row_step.tolist(), results.example_index.tolist(), strict=True))
    }
    return np.stack([np.asarray(scores[row[k]], dtype=np.float64) for k in keys])


def grad_dot_scores(log_dir: Path, query_set: str, keys: list[tuple[int, Any]]) -> np.ndarray:
    """(pairs, Q) recorded gradient of each occurrence dotted with the final model's query gradients."""
    log = dvemb.open_log(log_dir)
    queries = log.load_query_set(query_set)
    q = torch.cat([queries.grads[layer.name] for layer in log.layers], 1).double()
    found: dict[tuple[int, Any], torch.Tensor] = {}
    wanted = set(keys)
    for shard in log.iter_shards():
        grads = torch.cat([shard.grads[layer.name] for layer in log.layers], 1).double()
        for r, (t, i) in enumerate(zip(shard.row_step.tolist(), shard.example_ids, strict=True)):
            if (int(t), i) in wanted:
                found[(int(t), i)] = grads[r]
    return np.stack([(found[k] @ q.T).numpy() for k in keys])


# -- one seed -------------------------------------------------------------------------------------


def run_seed(s: Settings, data: Corpus, seed: int, work: Path, log: Any = print) -> dict[str, Any]:
    started = time.time()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal started
        timings[name] = round(time.time() - started, 1)
        started = time.time()

    order_run = trainer_run(s, data, seed, work)  # unrecorded Trainer: its data order
    order = order_run.order
    if len(order) != s.steps:
        raise RuntimeError(f"the Trainer took {len(order)} steps, expected {s.steps}")
    ref = plain_run(s, data, seed, order, mode="reference")
    # The Trainer normalises the loss by the labels it counts (num_items_in_batch), not by the shifted tokens
    # the model averages over: its own reference loop passes the same count.
    ref_trainer = plain_run(s, data, seed, order, mode="reference", counts=order_run.counts)
    lap("reference runs")
    checks = {"trainer (unrecorded) = plain loop with the Trainer's loss": same_trajectory(order_run, ref_trainer)}
    same_as_plain = same_trajectory(order_run, ref)
    trainer_gap = max(float((order_run.params[-1][k] - ref.params[-1][k]).abs().max()) for k in ref.params[-1])
    seen_warnings: dict[str, list[str]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dvemb.DvembWarning)  # what each path tells its user, kept in the JSON
        recorded_trainer = trainer_run(s, data, seed, work, work / "log-trainer")
        seen_warnings["trainer"] = sorted({str(w.message) for w in caught if w.category is dvemb.DvembWarning})
        lap("trainer recorded")
        checks["trainer recorded: same order"] = recorded_trainer.order == order
        checks["trainer recorded = trainer unrecorded"] = same_trajectory(recorded_trainer, ref_trainer)
        for mode in ("plain", "recipe", "recipe_verbatim", "whole"):
            caught.clear()
            checks[f"{mode} recorded = plain loop"] = same_trajectory(
                plain_run(s, data, seed, order, work / f"log-{mode}", mode), ref
            )
            seen_warnings[mode] = sorted({str(w.message) for w in caught if w.category is dvemb.DvembWarning})
            lap(f"{mode} recorded")
    if not all(checks.values()):
        raise RuntimeError(f"recording changed the training trajectory: {checks}")

    pairs = sample_pairs(s, seed)
    keys = [(t, order[t][p]) for t, p in pairs]
    # A replay with nothing removed must land exactly where training did.
    model = make_model(s, len(data.vocab), seed)
    truths = {}
    for name, reference in (("plain", ref), ("trainer", ref_trainer)):
        base = query_losses(model, reference.params[-1], data.queries)
        if not torch.equal(replay(s, data, seed, reference, s.steps // 2, -1, None), base):
            raise RuntimeError(f"{name}: a replay with nothing removed does not reproduce training")
        truths[name] = np.stack([(replay(s, data, seed, reference, t, p, None) - base).numpy() for t, p in pairs])
    truth = truths["plain"]
    base = query_losses(model, ref.params[-1], data.queries)
    lap("ground truth")
    h = s.ceiling_h
    ceiling = np.stack(
        [
            (-(replay(s, data, seed, ref, t, p, 1.0 + h) - replay(s, data, seed, ref, t, p, 1.0 - h)) / (2 * h)).numpy()
            for t, p in pairs
        ]
    )
    lap("ceiling")

    estimates = {
        "plain": dvemb_scores(work / "log-plain", work / "out-plain", "test", keys),
        "trainer": dvemb_scores(work / "log-trainer", work / "out-trainer", "eval", keys),
        "recipe": dvemb_scores(work / "log-recipe", work / "out-recipe", "test", keys),
        "recipe_verbatim": dvemb_scores(work / "log-recipe_verbatim", work / "out-recipe_verbatim", "test", keys),
    }
    lap("compute (projected)")
    estimates["whole"] = dvemb_scores(work / "log-whole", work / "out-whole", "test", keys)
    lap("compute (no projection)")
    estimates["grad_dot"] = grad_dot_scores(work / "log-whole", "test", keys)
    estimates["ceiling"] = ceiling
    truth_of = {k: truths["trainer"] if k == "trainer" else truth for k in estimates}
    spearman = {k: correlation(v, truth_of[k], spearman=True) for k, v in estimates.items()}
    pearson = {k: correlation(v, truth_of[k], spearman=False) for k, v in estimates.items()}
    late = np.array([t >= s.warmup_steps for t, _ in pairs])  # Adam's first steps are where first order is weakest
    spearman_after_warmup = {k: correlation(v[late], truth_of[k][late], spearman=True) for k, v in estimates.items()}
    summaries = {name: json.loads((work / f"out-{name}" / "summary.json").read_text()) for name in RECORDED}
    manifests = {name: json.loads((work / f"log-{name}" / "manifest.json").read_text()) for name in RECORDED}
    result = {
        "seed": seed,
        "spearman": spearman,
        "pearson": pearson,
        "spearman_after_warmup": spearman_after_warmup,
        "pairs_after_warmup": int(late.sum()),
        "pairs": pairs,
        "checks": checks,
        "trainer_equals_plain_loop": same_as_plain,
        "trainer_vs_plain_final_parameter_gap": trainer_gap,
        "trainer_labels_per_example": float(order_run.counts[0]) / s.batch,  # type: ignore[index]
        "trainer_truth_vs_plain_truth": correlation(truths["trainer"], truth, spearman=True),
        "truth_abs_mean": float(np.abs(truth).mean()),
        "truth_abs_max": float(np.abs(truth).max()),
        "final_query_loss": float(base.mean()),
        "initial_query_loss": float(
            query_losses(make_model(s, len(data.vocab), seed), ref.params[0], data.queries).mean()
        ),
        "warnings": seen_warnings,
        "settings_seen": {
            name: {
                "curvature": manifests[name].get("curvature"),
                "projection": manifests[name].get("projection"),
                "compute_curvature": summaries[name].get("curvature"),
                "propagation": summaries[name].get("propagation"),
                "blocks": summaries[name].get("blocks"),
                "approximations": summaries[name].get("approximations"),
                "layers": [(e["name"], e["k_out"], e["k_in"], e.get("basis")) for e in manifests[name]["layers"]],
            }
            for name in manifests
        },
        "seconds": timings,
    }
    log(
        f"seed {seed}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in spearman.items())
        + f" | loss {result['initial_query_loss']:.2f} -> {result['final_query_loss']:.2f} | {timings}",
    )
    return result


# -- report ---------------------------------------------------------------------------------------


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def _git(*args: str) -> str:
    """git in the checkout of the dvemb package actually imported."""
    where = Path(dvemb.__file__).resolve().parent
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=where).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def markdown(s: Settings, runs: list[dict[str, Any]], data: Corpus, meta: str) -> str:
    first = runs[0]["settings_seen"]

    def seen(name: str) -> str:
        entry = first[name]
        curvature = entry["curvature"] or {}
        kinds = {layer[3] for layer in entry["layers"]}
        sizes = {f"{layer[1]}x{layer[2]}" for layer in entry["layers"]}
        return (
            f"recorded curvature `{curvature.get('mode')}`"
            + (f" (source {curvature['source']})" if curvature.get("source") else "")
            + f", bases {'/'.join(sorted(str(k) for k in kinds))}, projected sizes {', '.join(sorted(sizes))}; "
            f"computed with `{entry['compute_curvature']}` curvature, blocks `{entry['blocks']}`, "
            f"propagation `{entry['propagation']}`"
        )

    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `.venv/bin/python -m bench.lm_fidelity` {meta}",
        "",
        f"A GPT-2 (`transformers.GPT2Config`: {s.n_layer} layers, `n_embd` {s.n_embd}, {s.n_head} heads, "
        f"`n_positions` {s.n_positions}, dropout 0, tied embedding and LM head, float64) trained from scratch on "
        f"{s.train_size} sequences of {s.seq_len} characters cut from Python {platform.python_version()}'s standard "
        f"library ({', '.join(TRAIN_FILES)}; vocabulary of {len(data.vocab)} characters built by the script), "
        f"batch {s.batch}, {s.epochs} epochs ({s.steps} steps), the Trainer's default optimizer (torch's fused "
        f"AdamW, lr {s.lr}, weight decay {s.weight_decay} outside biases and LayerNorms), linear warm-up "
        f"({s.warmup_steps} steps) and linear decay, no gradient clipping (`max_grad_norm=0`: dvemb does not "
        f"model clipping). Queries: {s.query_size} sequences from held-out files ({', '.join(QUERY_FILES)}), "
        "per-query loss the mean over its shifted tokens. Query loss "
        f"{np.mean([r['initial_query_loss'] for r in runs]):.2f} at initialisation, "
        f"{np.mean([r['final_query_loss'] for r in runs]):.2f} after training.",
        "",
        "The plain loop follows the Trainer's own shuffled order (read from an unrecorded Trainer run). The "
        "recorded plain loops took bit for bit the parameters of the unrecorded plain loop at every step, "
        "and the recorded Trainer those of the unrecorded Trainer (checked every seed). The Trainer's trajectory "
        "is not the plain loop's: it divides the summed token losses by `num_items_in_batch`, the labels it "
        f"counts ({runs[0]['trainer_labels_per_example']:.0f} per sequence with this transformers version: "
        f"unshifted, where the model's own mean counts {s.seq_len - 1}), so its steps are scaled by "
        f"{s.seq_len - 1}/{s.seq_len} and, through AdamW's epsilon, its parameters end up to "
        f"{max(r['trainer_vs_plain_final_parameter_gap'] for r in runs):.0e} apart. It gets its own ground "
        "truth: a plain loop that passes the same count takes the Trainer's trajectory bit for bit (checked), "
        "and its replays remove the example with the count of the smaller batch (Spearman between the two "
        f"ground truths {_cell([r['trainer_truth_vs_plain_truth'] for r in runs])}). "
        f"Ground truth: {s.pairs} sampled (step, example) occurrences per seed; training replayed "
        "from the occurrence's step with the example removed from its one batch (the Hugging Face loss then "
        "averages over the remaining examples' tokens, as the Trainer's does), AdamW's moments and step count and "
        "the learning rate schedule restored as they were; the change of every query's loss at the end "
        "(|change| mean "
        f"{np.mean([r['truth_abs_mean'] for r in runs]):.1e}, max {max(r['truth_abs_max'] for r in runs):.1e}). "
        "Cells: mean over queries of the Spearman correlation across occurrences, mean [min, max] over "
        f"{len(runs)} seeds (model initialisation, the Trainer's data order and the sampled occurrences change "
        "with the seed). Every log is computed with `dvemb.engine.compute` and its default `ComputeArguments`.",
        "",
        f"| estimator | Spearman | Spearman, occurrences after the warm-up (step >= {s.warmup_steps}) | Pearson |",
        "|---|---:|---:|---:|",
    ]
    for name in ESTIMATORS:
        lines.append(
            f"| {LABELS[name]} | {_cell([r['spearman'][name] for r in runs])} | "
            f"{_cell([r['spearman_after_warmup'][name] for r in runs])} | {_cell([r['pearson'][name] for r in runs])} |"
        )

    def mean(name: str, key: str = "spearman") -> float:
        return float(np.mean([r[key][name] for r in runs]))

    projected = [mean(n) for n in ("plain", "trainer", "recipe", "recipe_verbatim")]
    seeded = [layer[0] for layer in first["recipe"]["layers"] if layer[3] == "seeded"]
    approximations = sorted(
        {a.get("kind", "?") for entry in first.values() for a in (entry.get("approximations") or [])}
    )
    lines += [
        "",
        f"Reading: the four projected paths (256 per layer) score {min(projected):.2f} to {max(projected):.2f}, the "
        f"gradient dot product {mean('grad_dot'):.2f}, the same Gauss-Newton curvature and AdamW propagation "
        f"without projection {mean('whole'):.2f}, and the first-order ceiling {mean('ceiling'):.2f} "
        f"({mean('ceiling', 'spearman_after_warmup'):.2f} on the occurrences after the warm-up: first order is "
        "weakest at AdamW's first steps, where the second moment is still tiny; under the linear warm-up step 0 "
        "has rate 0, so an example there acts only through the moments). Calibration: "
        + (
            f"{', '.join(seeded)} (the embedding tied to the LM head) keeps its seeded projection in the calibrated "
            "paths (tied layers are not calibrated). "
            if seeded
            else ""
        )
        + "The README's lines verbatim run the look-ahead at the optimizer's current rate without the scheduler "
        "(0 before a linear warm-up's first step: the look-ahead does not move the model) and on cross-entropy of "
        "the unshifted labels; `record(trainer)` passes its scheduler and the causal-LM loss. Approximations that "
        f"`dvemb.engine.compute` lists for these logs (summary.json): {', '.join(approximations) or 'none'}.",
        "",
        "What each path recorded (first seed): " + "; ".join(f"{name}: {seen(name)}" for name in first) + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run; BENCHMARKS.md is left alone")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="rebuild the section from the measurements in bench/out/lm_fidelity.json (no training)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="checkout whose BENCHMARKS.md and bench/out/ receive the results (default: this file's)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = QUICK if args.quick else Settings()
    out = args.root / "bench" / "out"
    name = "lm_fidelity_quick.json" if args.quick else "lm_fidelity.json"
    if args.from_json:
        saved = json.loads((out / name).read_text())
        s = Settings(**saved["settings"])
        data = corpus(s)
        print(markdown(s, saved["runs"], data, saved["meta"]))
        if not (args.quick or args.no_write):
            _write(s, saved["runs"], data, saved["meta"], args.root)
        return
    seeds = args.seeds or (1 if args.quick else 3)
    started = time.time()
    data = corpus(s)
    runs = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as work:
            runs.append(
                run_seed(
                    s, data, seed, Path(work), log=lambda m: print(m, f"({time.time() - started:.0f} s)", flush=True)
                )
            )
    elapsed = time.time() - started
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", ".")
    meta = (
        f"{provenance()}, "
        f"one thread, torch {torch.__version__}, transformers {_version('transformers')}, dvemb at {commit}"
        + (" (with uncommitted changes in dvemb/)" if dirty not in ("", "?") else "")
        + f": {elapsed:.0f} s ({elapsed / 60:.1f} min)."
    )
    text = markdown(s, runs, data, meta)
    out.mkdir(exist_ok=True)
    (out / name).write_text(
        json.dumps({"settings": asdict(s), "seconds": elapsed, "meta": meta, "runs": runs}, indent=1, default=str)
    )
    print(text)
    if not (args.quick or args.no_write):
        _write(s, runs, data, meta, args.root)


README_START, README_END = "<!-- lm-fidelity:start -->", "<!-- lm-fidelity:end -->"
#: The README's short table: no options first (docs: README "Accuracy"), then the best and the references.
README_ROWS = ("plain", "trainer", "recipe", "whole", "grad_dot", "ceiling")


def readme_table(runs: list[dict[str, Any]], meta: str) -> str:
    """The README's rows of this benchmark: mean Spearman over seeds, all occurrences and after the warm-up."""
    lines = [
        "| GPT-2 LM (from scratch, AdamW), Spearman against exact leave-one-out | all occurrences | after warm-up |",
        "|---|---:|---:|",
    ]
    for name in README_ROWS:
        every = np.mean([r["spearman"][name] for r in runs])
        late = np.mean([r["spearman_after_warmup"][name] for r in runs])
        lines.append(f"| {LABELS[name]} | {every:.2f} | {late:.2f} |")
    commit = meta.split("dvemb at ", 1)[1].split(":", 1)[0].split(" ", 1)[0] if "dvemb at " in meta else "?"
    lines += [
        "",
        f"(written by `bench/lm_fidelity.py` at commit {commit}; mean of {len(runs)} seeds, min and max in "
        "[BENCHMARKS.md](BENCHMARKS.md#transformer-lm-fidelity))",
    ]
    return "\n".join(lines)


def _write(s: Settings, runs: list[dict[str, Any]], data: Corpus, meta: str, root: Path) -> None:
    """BENCHMARKS.md's section and the README's short table."""
    replace_section(SECTION, markdown(s, runs, data, meta), root / "BENCHMARKS.md")
    replace_block(root / "README.md", README_START, README_END, readme_table(runs, meta))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
