"""Fidelity at the default settings: what a user gets without options, against exact retraining (BENCHMARKS.md).

The digits MLP of :mod:`bench.fidelity` (64-24-10, tanh, float64, summed cross-entropy) is trained
under five runs (SGD at a constant rate, SGD with warmup and cosine decay, SGD with momentum 0.9,
Adam, AdamW with weight decay 0.1; rates of :data:`bench.optimizer_fidelity.RATES`), 3 seeds each.
Every run is trained once without a recorder (the reference trajectory: the exact replays and the
first-order ceiling use it) and once per recorded row; each recorded trajectory must be bit for bit
the unrecorded one. Ground truth: trajectory-specific leave-one-out, replayed from the example's
step with the optimizer in its state of that step (:func:`bench.fidelity.ground_truth`). Rows, mean
over test points of the Spearman correlation across the sampled (step, example) pairs:

1. ``no options``: ``dvemb.Recorder(model, log_dir)`` and nothing else (whatever the library's
   defaults are when this runs; the section records them from the log's manifest), no
   ``rec.curvature()`` call, no ``rec.calibrate()``; ``compute`` with ``ComputeArguments()``.
2. ``Trainer path``: what ``dvemb.integrations.huggingface.record(trainer, ...)`` gives the recorder
   by default. The loop drives the integration's own :class:`DvembCallback` (``on_train_begin``,
   ``on_step_begin`` / ``on_step_end`` around each optimizer step, ``on_train_end``) with real
   ``TrainingArguments`` / ``TrainerState``, the calibration batches ``record()`` would build (the
   first ``calibration_batches`` batches of the training set in dataset order), the run's optimizer
   and scheduler in the events' keyword arguments (its look-ahead uses them) and the query batches
   of the test set; the example ids are handed over as the integration's forward pre-hook does.
   Default ``compute``.
3. ``README recipe``: ``Recorder(model, log_dir, proj_dim=256, curvature="ggn")``,
   ``rec.calibrate(first 8 training batches, optimizer=optimizer, lookahead_steps=total_steps // 10)``
   (no scheduler passed, as the README writes it), no ``rec.curvature()`` call (the README's loop has
   none since "ggn by default": the rows start at the model's output); default ``compute``.
4. ``unprojected ggn, full M``: ``proj_dim=None``, ``curvature="ggn"``, explicit ``rec.curvature(logits)``
   (all ten classes), float64 log; ``compute`` with
   ``blocks="full"`` (float64 accumulation, as the other fidelity benchmarks).
5. ``exact first-order ceiling``: :func:`bench.optimizer_fidelity.first_order_ceiling`.
6. ``gradient dot product``: :func:`bench.fidelity.grad_dot_scores` (no training dynamics).

The one recorder argument every row passes is ``loss_reduction="sum"``: it describes this loop (its
loss is summed over the batch; the ground truth is defined with a summed loss), not a fidelity
option. A mean-reduced loop (``F.cross_entropy``'s default, and the Trainer's) needs nothing.

Run from the repository root: ``.venv/bin/python -m bench.default_fidelity`` (``--quick``: one seed,
fewer pairs, a smoke run that leaves BENCHMARKS.md alone unless ``--write``). Writes
``bench/out/default_fidelity.json`` and the BENCHMARKS.md section "Fidelity at the default settings".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from bench.fidelity import (
    OPTIMIZERS,
    Setup,
    Trajectory,
    _data,
    _lr_at,
    correlation,
    grad_dot_scores,
    ground_truth,
    same_trajectory,
    sample_pairs,
)
from bench.harness import measured_commit, provenance, replace_block, replace_section, save_json
from bench.optimizer_fidelity import RATES, first_order_ceiling
from dvemb.engine import ComputeArguments, compute

SECTION = "Fidelity at the default settings"

#: run -> (optimizer of bench.fidelity.OPTIMIZERS, learning-rate schedule of bench.fidelity._lr_at)
RUNS = {
    "sgd": ("sgd", "constant"),
    "sgd-cosine": ("sgd", "warmup-cosine"),
    "momentum": ("momentum", "constant"),
    "adam": ("adam", "constant"),
    "adamw": ("adamw", "constant"),
}
RUN_LABELS = {
    "sgd": "SGD, constant rate",
    "sgd-cosine": "SGD, warmup + cosine",
    "momentum": "SGD momentum 0.9",
    "adam": "Adam",
    "adamw": "AdamW (wd 0.1)",
}
ROWS = {
    "default": "no options",
    "trainer": "Trainer path",
    "recipe": "README recipe",
    "unprojected": "unprojected ggn, full M",
    "ceiling": "exact first-order ceiling",
    "grad_dot": "gradient dot product",
}
CALIBRATION_BATCHES = 8  # the README's islice(loader, 8); record()'s calibration_batches default is also 8
QUERY_SET = "test"


# -- training -------------------------------------------------------------------------------------


@dataclass
class Recording:
    """How one row records the training loop (None in :func:`run_training`: the unrecorded reference)."""

    step: Callable[[torch.Tensor, torch.optim.Optimizer], contextlib.AbstractContextManager[Any]]
    after_forward: Callable[[torch.Tensor], None] = lambda logits: None
    finish: Callable[[torch.Tensor, torch.Tensor], None] = lambda x_test, y_test: None
    warnings: list[str] = field(default_factory=list)


#: (model, optimizer, scheduler, x, y, setup) -> Recording; builds the recorder before the first step.
RecordingFactory = Callable[[nn.Module, torch.optim.Optimizer, Any, torch.Tensor, torch.Tensor, Setup], Recording]


def training_batches(setup: Setup, n: int) -> list[torch.Tensor]:
    """Example indices of the first ``per_epoch`` training batches, in training order (from a generator of
    their own: training's generator is not touched)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(setup.seed))
    return [perm[i * setup.batch : (i + 1) * setup.batch] for i in range(n // setup.batch)]


def run_training(setup: Setup, make: RecordingFactory | None) -> tuple[Trajectory, Recording | None]:
    """The loop of :func:`bench.fidelity.train`, recorded by ``make`` (or not at all).

    The rate follows :func:`bench.fidelity._lr_at` through a ``LambdaLR`` scheduler stepped after every
    optimizer step, as a real run's schedule is (the Trainer's look-ahead calibration steps it too); the
    rate each step used is kept for the replays.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(setup.seed)
        x, y, x_test, y_test = _data(setup)
        model = nn.Sequential(nn.Linear(64, setup.hidden), nn.Tanh(), nn.Linear(setup.hidden, 10)).double()
        optimizer = OPTIMIZERS[setup.optimizer](model.parameters(), setup.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_at(setup, step) / setup.lr)
        recording = make(model, optimizer, scheduler, x, y, setup) if make is not None else None
        generator = torch.Generator().manual_seed(setup.seed)
        per_epoch = len(x) // setup.batch
        batches: list[torch.Tensor] = []
        params, lrs, states = [], [], []
        for step in range(setup.steps):
            if step % per_epoch == 0:
                perm = torch.randperm(len(x), generator=generator)
            batch = perm[(step % per_epoch) * setup.batch : (step % per_epoch + 1) * setup.batch]
            lr = optimizer.param_groups[0]["lr"]
            params.append({k: v.detach().clone() for k, v in model.named_parameters()})
            if recording is None:
                states.append(copy.deepcopy(optimizer.state_dict()))
            with recording.step(batch, optimizer) if recording is not None else contextlib.nullcontext():
                logits = model(x[batch])
                if recording is not None:
                    recording.after_forward(logits)
                F.cross_entropy(logits, y[batch], reduction="sum").backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            batches.append(batch)
            lrs.append(lr)
        params.append({k: v.detach().clone() for k, v in model.named_parameters()})
        if recording is not None:
            recording.finish(x_test, y_test)
    if recording is not None:
        recording.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return Trajectory(model, params, states, batches, lrs, x, y, x_test, y_test, setup.optimizer), recording


def _plain(rec: dvemb.Recorder, *, ggn_call: bool) -> Recording:
    """A plain training loop: ``with rec.step(ids, optimizer)``, optionally ``rec.curvature(logits)``."""

    def finish(x_test: torch.Tensor, y_test: torch.Tensor) -> None:
        rec.record_queries(QUERY_SET, [(x_test, y_test, list(range(len(x_test))))])
        rec.close()

    return Recording(
        step=lambda batch, optimizer: rec.step(batch, optimizer),
        after_forward=(lambda logits: rec.curvature(logits)) if ggn_call else (lambda logits: None),
        finish=finish,
    )


def no_options(log_dir: Path, **recorder_options: Any) -> RecordingFactory:
    """``dvemb.Recorder(model, log_dir)`` and nothing else (``recorder_options``: for a benchmark that varies one)."""

    def make(
        model: nn.Module, optimizer: Any, scheduler: Any, x: torch.Tensor, y: torch.Tensor, setup: Setup
    ) -> Recording:
        return _plain(dvemb.Recorder(model, log_dir, loss_reduction="sum", **recorder_options), ggn_call=False)

    return make


def readme_recipe(log_dir: Path) -> RecordingFactory:
    def make(
        model: nn.Module, optimizer: Any, scheduler: Any, x: torch.Tensor, y: torch.Tensor, setup: Setup
    ) -> Recording:
        rec = dvemb.Recorder(model, log_dir, proj_dim=256, curvature="ggn", loss_reduction="sum")
        first = training_batches(setup, len(x))[:CALIBRATION_BATCHES]
        # The README's call: no scheduler passed, so the look-ahead runs at the optimizer's current rate.
        rec.calibrate([(x[b], y[b]) for b in first], optimizer=optimizer, lookahead_steps=setup.steps // 10)
        return _plain(rec, ggn_call=False)

    return make


def unprojected(log_dir: Path) -> RecordingFactory:
    def make(
        model: nn.Module, optimizer: Any, scheduler: Any, x: torch.Tensor, y: torch.Tensor, setup: Setup
    ) -> Recording:
        rec = dvemb.Recorder(
            model, log_dir, proj_dim=None, curvature="ggn", loss_reduction="sum", dtype="float64", seed=setup.seed
        )
        return _plain(rec, ggn_call=True)

    return make


def trainer_path(log_dir: Path, work: Path) -> RecordingFactory:
    """Drive ``dvemb.integrations.huggingface.DvembCallback`` as ``record(trainer, log_dir)`` sets it up."""

    def make(
        model: nn.Module, optimizer: Any, scheduler: Any, x: torch.Tensor, y: torch.Tensor, setup: Setup
    ) -> Recording:
        from transformers import TrainerControl, TrainerState, TrainingArguments

        from dvemb.integrations.huggingface import DvembCallback

        with contextlib.redirect_stdout(None):
            args = TrainingArguments(
                output_dir=str(work / "trainer"),
                max_steps=setup.steps,
                per_device_train_batch_size=setup.batch,
                per_device_eval_batch_size=setup.test_size,
                report_to=[],
                use_cpu=True,
            )
        state = TrainerState(max_steps=setup.steps, global_step=0)
        control = TrainerControl()
        # record()'s calibration batches: the first calibration_batches batches of the training set in dataset
        # order, of the Trainer's per-device batch size, as (inputs, labels).
        calibration = [
            (x[i * setup.batch : (i + 1) * setup.batch], y[i * setup.batch : (i + 1) * setup.batch])
            for i in range(CALIBRATION_BATCHES)
        ]
        test: list[tuple[torch.Tensor, torch.Tensor]] = []
        dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
        callback = DvembCallback(
            log_dir,
            dataset=dataset,
            eval_batches=lambda: iter(test),
            query_set=QUERY_SET,
            calibration_batches=lambda: list(calibration),
            recorder_options={"loss_reduction": "sum"},
        )
        events = {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler, "train_dataloader": None}
        callback.on_train_begin(args, state, control, **events)

        @contextlib.contextmanager
        def step(batch: torch.Tensor, optimizer: Any) -> Iterator[None]:
            callback.on_step_begin(args, state, control, **events)
            callback.take_indices(batch)  # what the integration's forward pre-hook does with the batch's indices
            yield
            state.global_step += 1
            callback.on_step_end(args, state, control, **events)

        def finish(x_test: torch.Tensor, y_test: torch.Tensor) -> None:
            test.append((x_test, y_test))
            callback.on_train_end(args, state, control, **events)

        return Recording(step=step, finish=finish)

    return make


# -- measuring ------------------------------------------------------------------------------------


def scores(log_dir: Path, out_dir: Path, pairs: list[tuple[int, int]], setup: Setup, args: ComputeArguments) -> Any:
    """(pairs, test) scores of ``compute(log_dir, out_dir, args)``, and its summary."""
    summary = compute(log_dir, out_dir, args, overwrite=True)
    per_occurrence = np.load(out_dir / f"scores-{QUERY_SET}.npy")
    return np.stack([per_occurrence[s * setup.batch + p] for s, p in pairs]), summary


def _log_settings(log_dir: Path) -> dict[str, Any]:
    manifest = json.loads((log_dir / "manifest.json").read_text())
    return {
        "curvature": manifest.get("curvature"),
        "projection": manifest.get("projection"),
        "layers": [
            {k: layer.get(k) for k in ("name", "kind", "out_dim", "in_dim", "k_out", "k_in", "basis") if k in layer}
            for layer in manifest.get("layers", [])
        ],
        "dtype": manifest.get("dtype"),
        "loss_reduction": manifest.get("loss_reduction"),
    }


def run_one(setup: Setup, work: Path) -> dict[str, Any]:
    """Every row of one (run, seed)."""
    reference, _ = run_training(setup, None)
    rows: dict[str, tuple[RecordingFactory, ComputeArguments]] = {
        "default": (no_options(work / "log-default"), ComputeArguments()),
        "trainer": (trainer_path(work / "log-trainer", work), ComputeArguments()),
        "recipe": (readme_recipe(work / "log-recipe"), ComputeArguments()),
        "unprojected": (
            unprojected(work / "log-unprojected"),
            ComputeArguments(curvature="ggn", blocks="full", accumulate_dtype="float64"),
        ),
    }
    pairs = sample_pairs(setup, reference)
    started = time.time()
    truth = ground_truth(reference, pairs)
    result: dict[str, Any] = {"spearman": {}, "settings": {}, "seconds": {"ground_truth": time.time() - started}}
    for name, (make, args) in rows.items():
        started = time.time()
        traj, recording = run_training(setup, make)
        if not same_trajectory(reference, traj):
            raise RuntimeError(f"recording ({ROWS[name]}) changed the training trajectory")
        log_dir = work / f"log-{name}"
        est, summary = scores(log_dir, work / f"out-{name}", pairs, setup, args)
        result["spearman"][name] = correlation(est, truth, spearman=True)
        assert recording is not None
        result["settings"][name] = {
            **_log_settings(log_dir),
            "compute": {k: summary.get(k) for k in ("curvature", "blocks", "propagation_label")},
            "warnings": recording.warnings,
        }
        result["seconds"][name] = time.time() - started
    started = time.time()
    result["spearman"]["ceiling"] = correlation(first_order_ceiling(reference, pairs), truth, spearman=True)
    result["seconds"]["ceiling"] = time.time() - started
    result["spearman"]["grad_dot"] = correlation(
        grad_dot_scores(work / "log-unprojected", pairs, setup), truth, spearman=True
    )
    with torch.no_grad():
        logits = torch.func.functional_call(reference.model, reference.params[-1], (reference.x_test,))
        result["test_accuracy"] = float((logits.argmax(1) == reference.y_test).double().mean())
    return result


# -- report ---------------------------------------------------------------------------------------


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per run and row: (mean, min, max) over seeds of the Spearman correlation (and test accuracy)."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for run, results in runs.items():
        values = {row: [r["spearman"][row] for r in results] for row in ROWS}
        values["test_accuracy"] = [r["test_accuracy"] for r in results]
        out[run] = {k: (float(np.mean(v)), float(min(v)), float(max(v))) for k, v in values.items()}
    return out


def targets(table: dict[str, dict[str, tuple[float, float, float]]]) -> list[tuple[str, bool | None]]:
    """The issue's targets on the means over seeds: (statement with the figures, met; None: run not measured)."""
    out: list[tuple[str, bool | None]] = []

    def mean(run: str, row: str) -> float | None:
        return table[run][row][0] if run in table else None

    for row in ("default", "trainer"):
        for run in table:
            a, b = table[run][row][0], table[run]["recipe"][0]
            out.append((f"{ROWS[row]} within 0.03 of the recipe, {RUN_LABELS[run]}: {a:.2f} vs {b:.2f}", a >= b - 0.03))
    for run in ("adam", "adamw"):
        a, b = mean(run, "recipe"), mean(run, "unprojected")
        if a is None or b is None:
            out.append((f"recipe within 0.08 of unprojected, {RUN_LABELS[run]}", None))
        else:
            out.append((f"recipe within 0.08 of unprojected, {RUN_LABELS[run]}: {a:.2f} vs {b:.2f}", a >= b - 0.08))
    for run, bound in (("sgd", 0.65), ("adam", 0.75)):
        a = mean(run, "default")
        if a is None:
            out.append((f"no options >= {bound} on {RUN_LABELS[run]}", None))
        else:
            out.append((f"no options >= {bound} on {RUN_LABELS[run]}: {a:.2f}", a >= bound))
    return out


def _cell(stat: tuple[float, float, float], seeds: int) -> str:
    mean, low, high = stat
    return f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def _describe_log(settings: dict[str, Any]) -> str:
    curvature = settings.get("curvature") or {}
    projection = settings.get("projection") or {}
    layers = ", ".join(
        f"layer {layer.get('name')}: ({layer.get('out_dim')}, {layer.get('in_dim')}) -> "
        f"{layer.get('k_out')} x {layer.get('k_in')}, {layer.get('basis')} basis"
        for layer in settings.get("layers", [])
    )
    compute_settings = settings.get("compute") or {}
    return (
        f"curvature mode `{curvature.get('mode')}` (samples `{curvature.get('samples')}`, "
        f"{curvature.get('rows_per_example')} rows per example), projection `{projection.get('kind')}` "
        f"({layers}), stored as `{settings.get('dtype')}`; compute used curvature `{compute_settings.get('curvature')}`, "
        f"blocks `{compute_settings.get('blocks')}`, propagation {compute_settings.get('propagation_label')}"
    )


def markdown(
    table: dict[str, dict[str, tuple[float, float, float]]],
    runs: dict[str, list[dict[str, Any]]],
    setup: Setup,
    seeds: int,
    meta: str,
) -> str:
    first = next(iter(runs.values()))[0]["settings"]
    lines = [
        f"## {SECTION}",
        "",
        f"Produced by `.venv/bin/python -m bench.default_fidelity` {meta}",
        "",
        f"Digits MLP (64-{setup.hidden}-10, tanh), {setup.steps} steps of batch {setup.batch}, summed cross-entropy, "
        f"float64 training, {setup.pairs} sampled (step, example) pairs x {setup.test_size} test points, {seeds} "
        f"seed{'s' if seeds > 1 else ''}; rates: SGD {RATES['sgd']} (constant, and warmup over 10% of the steps then "
        f"cosine to 0), momentum {RATES['momentum']}, Adam {RATES['adam']}, AdamW {RATES['adamw']}. Mean Spearman over "
        "test points against exact trajectory-specific leave-one-out (replay from the example's step without it, the "
        "optimizer's state restored), "
        + ("mean over seeds [min, max]" if seeds > 1 else "one seed")
        + ". The rate is set by a `LambdaLR` scheduler stepped after each optimizer step. Every recorded trajectory "
        "is bit for bit the unrecorded one (checked).",
        "",
        "Rows (every recorder gets `loss_reduction='sum'` because this loop sums its loss; nothing else unless said):",
        "",
        "- **no options**: `dvemb.Recorder(model, log_dir)`, no `rec.curvature()`, no `rec.calibrate()`; "
        "`compute` with `ComputeArguments()`. The library's defaults at this commit, read from the log: "
        + _describe_log(first["default"])
        + ".",
        "- **Trainer path**: the plain loop drives `dvemb.integrations.huggingface.DvembCallback` as "
        "`record(trainer, log_dir)` sets it up (real `TrainingArguments`/`TrainerState`, `on_train_begin`, "
        "`on_step_begin`/`on_step_end` around each step, `on_train_end`; its default `calibration_batches=8`: the first "
        "8 batches of the training set in dataset order; its default `lookahead=0.1` of `state.max_steps` with the run's "
        "optimizer and scheduler passed as the Trainer passes them; the ids handed over as its forward pre-hook does); "
        "no `rec.curvature()` call (the callback makes none); default `compute`. Only the recorder side is the "
        "Trainer's: the training itself is this loop (no gradient clipping, the run's own optimizer and "
        "schedule). From the log: " + _describe_log(first["trainer"]) + ".",
        "- **README recipe**: `Recorder(model, log_dir, proj_dim=256, curvature='ggn')`, "
        "`rec.calibrate(first 8 training batches, optimizer=optimizer, lookahead_steps=total_steps // 10)` (no "
        "`scheduler=`, as the README writes it: the look-ahead runs at the optimizer's current rate), no "
        "`rec.curvature()` call (the README's loop has none); default `compute`. From the log: "
        + _describe_log(first["recipe"])
        + ".",
        "- **unprojected ggn, full M**: `proj_dim=None`, `curvature='ggn'` with an explicit `rec.curvature(logits)` "
        "(all ten classes), float64 log; `compute(curvature='ggn', "
        "blocks='full', accumulate_dtype='float64')`.",
        "- **exact first-order ceiling**: the exact derivative of the real trajectory in the example's loss weight "
        "(central difference of the replay); no estimator linear in the removal beats it.",
        "- **gradient dot product**: `g_s(z) . grad l(theta_T, z_test)`, no training dynamics (unprojected).",
        "",
        "| row | " + " | ".join(RUN_LABELS[r] for r in table) + " |",
        "|---|" + "---:|" * len(table),
    ]
    for row, label in ROWS.items():
        lines.append(f"| {label} | " + " | ".join(_cell(table[r][row], seeds) for r in table) + " |")
    lines.append("| *test accuracy* | " + " | ".join(f"{table[r]['test_accuracy'][0]:.2f}" for r in table) + " |")
    lines += [
        "",
        "Targets (issue 20, on the means over seeds; 'within x of' means not lower by more than x):",
        "",
    ]
    for text, met in targets(table):
        lines.append(f"- {text}: " + ("met" if met else "not measured" if met is None else "**NOT met**"))
    seen: set[str] = set()
    notes = []
    for row in ("default", "trainer", "recipe"):
        for message in first[row]["warnings"]:
            if message not in seen:
                seen.add(message)
                notes.append(f"- {ROWS[row]}: {message}")
    if notes:
        lines += ["", "Warnings the recorder gave (first run):", "", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=None, help="sampled (step, example) pairs per run")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 30 pairs, BENCHMARKS.md untouched")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--commit", help="the commit measured, for a run from an exported tree without .git")
    parser.add_argument(
        "--readme-from-json",
        action="store_true",
        help="only rewrite README.md's table from bench/out/default_fidelity.json (the last full run), then exit",
    )
    args = parser.parse_args()
    if args.readme_from_json:
        saved = json.loads((Path(__file__).parent / "out" / "default_fidelity.json").read_text())
        commit = (
            saved["markdown"].split("at commit ", 1)[1].split(" ", 1)[0] if "at commit " in saved["markdown"] else "?"
        )
        write_readme({run: {k: tuple(v) for k, v in rows.items()} for run, rows in saved["table"].items()}, commit)
        return
    seeds = 1 if args.quick else args.seeds
    torch.set_num_threads(args.threads)
    base = Setup()
    base = replace(base, pairs=args.pairs or (30 if args.quick else base.pairs))
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {}
    for run in args.runs:
        optimizer, schedule = RUNS[run]
        for seed in range(seeds):
            setup = replace(base, seed=seed, optimizer=optimizer, schedule=schedule, lr=RATES[optimizer])
            with tempfile.TemporaryDirectory() as work:
                runs.setdefault(run, []).append(run_one(setup, Path(work)))
            last = runs[run][-1]
            print(
                run,
                seed,
                {k: round(v, 3) for k, v in last["spearman"].items()},
                {k: round(v, 1) for k, v in last["seconds"].items()},
                f"{time.time() - started:.0f}s",
                flush=True,
            )
    table = aggregate(runs)
    meta = (
        f"{provenance(commit=args.commit or measured_commit())} ({args.threads} thread, CPU), "
        f"torch {torch.__version__}, dvemb {dvemb.__version__}, {time.time() - started:.0f} s."
    )
    text = markdown(table, runs, base, seeds, meta)
    save_json(
        "default_fidelity.json", {"setup": asdict(base), "seeds": seeds, "runs": runs, "table": table, "markdown": text}
    )
    print(text)
    if not args.no_write and (args.write or not args.quick):
        replace_section(SECTION, text)
        write_readme(table, meta_commit := (args.commit or measured_commit()))
        print(f"README.md's fidelity table written (commit {meta_commit})")


README = Path(__file__).resolve().parent.parent / "README.md"
README_START, README_END = "<!-- default-fidelity:start -->", "<!-- default-fidelity:end -->"


def readme_table(table: dict[str, dict[str, tuple[float, float, float]]], commit: str) -> str:
    """The README's accuracy table: the means of this benchmark's rows, no options first."""
    runs = [run for run in RUNS if run in table]
    lines = [
        "| digits MLP, Spearman against exact leave-one-out | " + " | ".join(RUN_LABELS[r] for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for row, label in ROWS.items():
        lines.append(f"| {label} | " + " | ".join(f"{table[r][row][0]:.2f}" for r in runs) + " |")
    lines.append("")
    lines.append(
        f"(written by `bench/default_fidelity.py` at commit {commit}; mean of 3 seeds, min and max in "
        "[BENCHMARKS.md](BENCHMARKS.md#fidelity-at-the-default-settings))"
    )
    return "\n".join(lines)


def write_readme(table: dict[str, dict[str, tuple[float, float, float]]], commit: str, path: Path = README) -> None:
    """Replace the README's block between the default-fidelity markers (figures never written by hand)."""
    replace_block(path, README_START, README_END, readme_table(table, commit))


if __name__ == "__main__":
    main()
