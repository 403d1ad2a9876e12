"""What dvemb's Hugging Face ``Trainer`` callback costs a training step, next to Bergson's
(BENCHMARKS.md, "Trainer callback overhead").

A GPT-2 built from ``GPT2Config`` (no download: 4 layers, width 128, 4 heads, byte vocabulary, float32,
no dropout) is trained by ``transformers.Trainer`` (AdamW, batch 8 of 128 bytes of Python's own
standard-library source, CPU, 2 torch threads) in three configurations, each with its own Trainer and its
own copy of the model:

- plain: the Trainer alone;
- dvemb: ``dvemb.integrations.huggingface.record(trainer, log_dir, calibration_batches=0,
  projection="random", proj_dim=256, curvature="empirical", shard_size_mb=4)`` (16 x 16 per layer; shards
  every 4 MB, so that writing happens inside the measured window): the settings of the earlier defaults;
- dvemb default: ``record(trainer, log_dir, shard_size_mb=4)``, the one-liner's defaults (Gauss-Newton rows
  found at the logits, one sampled label per token; bases calibrated with look-ahead before the first step,
  outside the measured window);
- bergson: EleutherAI's ``bergson.huggingface.GradientCollectorCallback`` with ``projection_dim=16``
  (16 x 16 per module, the same size), after ``prepare_for_gradient_collection(trainer)``, its defaults
  otherwise. When bergson cannot be imported or fails, the peer is reported unavailable with the reason.

Step time: wall time from before the first callback's ``on_step_begin`` to after the last callback's
``on_step_end`` (forward, backward with every hook, optimizer step, every callback's step work; the data
loader's fetch is outside), measured with two timing callbacks placed first and last. The three Trainers
run in threads that hand a baton to one another, so exactly one trains at a time and the configurations
interleave in rounds while every Trainer keeps its state: after a warm-up turn each, every round runs each
configuration for a few steps (in a rotating order); the ratio to plain is the median over rounds of
(configuration's median / plain's median in the same round), as in ``bench/projection_fidelity.py``.

Run from the repository root, in the bench environment that has the peer:
``bash bench/setup.sh && bench/.venv-bench/bin/python -m bench.trainer_overhead`` (``.venv/bin/python -m
bench.trainer_overhead`` runs it without bergson). Writes ``bench/out/trainer_overhead.json`` and the
section of BENCHMARKS.md; ``--quick`` checks that it runs (writes ``trainer_overhead.quick.json`` only).
About 70 s on an idle 2-core machine.
"""

from __future__ import annotations

import os

# Nothing may be fetched from a hub: the model is built from a config and the data is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from bench.harness import replace_section, save_json, utc_stamp
from bench.recorder_overhead import machine
from dvemb.integrations.huggingface import record

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Trainer callback overhead"
COMMAND = "bash bench/setup.sh && bench/.venv-bench/bin/python -m bench.trainer_overhead"
THREADS = 2
SEQ, BATCH, LAYERS, WIDTH, HEADS = 128, 8, 4, 128, 4
PROJ_DIM = 256  # dvemb's size per layer (16 x 16)
BERGSON_PROJ = 16  # bergson's per-module side: 16 x 16 = 256, the same size
SHARD_SIZE_MB = 4
TARGET_RATIO = 1.2
SOURCES = ("typing.py", "inspect.py", "argparse.py", "subprocess.py", "tarfile.py", "pathlib.py")


# -- model and data -------------------------------------------------------------------------------


def source_chunks(count: int) -> list[bytes]:
    """``count`` consecutive SEQ-byte chunks of standard-library modules (read from disk)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / name).read_bytes() for name in SOURCES if (stdlib / name).exists())
    if len(data) < count * SEQ:
        raise RuntimeError(f"the standard-library sources give {len(data) // SEQ} chunks, {count} needed")
    return [data[i * SEQ : (i + 1) * SEQ] for i in range(count)]


class ByteChunks(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Byte-level language modelling: input ids and labels of one chunk."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(list(self.chunks[index]), dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


def gpt2() -> GPT2LMHeadModel:
    """The benchmark's GPT-2, seeded (every configuration starts from the same weights), float32."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=LAYERS,
        n_embd=WIDTH,
        n_head=HEADS,
        vocab_size=256,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).to(torch.float32)


def trainer_for(dataset: Any, out: Path, steps: int) -> Trainer:
    args = TrainingArguments(
        str(out),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=1e-3,
        optim="adamw_torch",
        max_grad_norm=0.0,  # no clipping: dvemb's log describes unclipped updates
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(model=gpt2(), args=args, train_dataset=dataset, data_collator=default_data_collator)


# -- timing ---------------------------------------------------------------------------------------


class Runner:
    """One configuration: its Trainer, trained in a thread that runs only while it holds the baton."""

    def __init__(self, name: str, trainer: Trainer, done: threading.Semaphore, describe: str) -> None:
        self.name, self.trainer, self.done, self.describe = name, trainer, done, describe
        self.go = threading.Semaphore(0)
        self.round = -1  # -1: the warm-up turn, not measured
        self.left = 0
        self.steps: dict[int, list[float]] = {}  # round -> callback-to-callback step seconds
        self.loop: dict[int, list[float]] = {}  # round -> step_end-to-step_end seconds (with data loading)
        self.error: str | None = None
        self._begin = 0.0
        self._last_end: float | None = None
        trainer.callback_handler.callbacks.insert(0, _StepStart(self))
        trainer.add_callback(_StepStop(self))
        self.thread = threading.Thread(target=self._train, name=f"trainer-{name}", daemon=True)

    def begin(self) -> None:
        self._begin = time.perf_counter()

    def end(self) -> None:
        now = time.perf_counter()
        if self.round >= 0:
            self.steps.setdefault(self.round, []).append(now - self._begin)
            if self._last_end is not None:
                self.loop.setdefault(self.round, []).append(now - self._last_end)
        self._last_end = now
        self.left -= 1
        if self.left == 0:  # turn over: hand the baton back and wait for the next turn
            self.done.release()
            self.go.acquire()
            self._last_end = None  # the next step_end-to-step_end interval would contain the wait

    def turn(self, round_: int, steps: int) -> None:
        """Train ``steps`` steps (in the thread) and return when they are done or the run failed."""
        self.round, self.left = round_, steps
        self.go.release()
        self.done.acquire()

    def _train(self) -> None:
        self.go.acquire()
        try:
            self.trainer.train()
            if self.left > 0:
                self.error = f"the Trainer stopped with {self.left} steps of its turn left"
        except BaseException as exc:  # the peer's failure is reported, not raised
            traceback.print_exc()
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.release()


class _StepStart(TrainerCallback):
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.runner.begin()


class _StepStop(TrainerCallback):
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.runner.end()


# -- configurations -------------------------------------------------------------------------------


def bergson_setup() -> tuple[Callable[..., Any] | None, str]:
    """(a factory of the bergson Trainer, its version) or (None, why it is unavailable)."""
    try:
        import datasets
        from bergson.huggingface import GradientCollectorCallback, prepare_for_gradient_collection
    except Exception as exc:  # any import failure makes the peer unavailable, with its reason
        reason = f"`from bergson.huggingface import GradientCollectorCallback` failed: {type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError):
            reason += f" (run `{COMMAND}`: bergson is installed in the bench environment only)"
        return None, reason

    def make(chunks: list[bytes], out: Path, steps: int, log: Path) -> tuple[Trainer, Any]:
        ids = [list(c) for c in chunks]
        table = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")
        trainer = trainer_for(table, out, steps)
        prepare_for_gradient_collection(trainer)
        callback = GradientCollectorCallback(log, projection_dim=BERGSON_PROJ)
        trainer.add_callback(callback)
        return trainer, callback

    from importlib.metadata import version

    return make, f"bergson {version('bergson')}"


def _time_shard_writes(recorder: Any) -> dict[str, float]:
    """Time the recorder's background shard writes (seconds, count), if its writer can be wrapped."""
    totals = {"seconds": 0.0, "count": 0.0}
    writer = getattr(recorder, "_writer", None)
    write = getattr(writer, "_write_shard", None)
    if write is None:  # the recorder's internals changed: report no timing rather than fail
        return {}

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return write(*args)
        finally:
            totals["seconds"] += time.perf_counter() - start
            totals["count"] += 1

    writer._write_shard = timed
    return totals


def stored_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def bergson_rows_written(log: Path) -> int:
    """Rows of bergson's gradient memmap that hold a gradient (the rest stay zero)."""
    info_files = list(log.rglob("info.json"))
    if not info_files:
        return 0
    info = json.loads(info_files[0].read_text())
    width = sum(info["grad_sizes"].values())
    grads = np.memmap(info_files[0].parent / "gradients.bin", dtype=info["base_dtype"], mode="r")
    grads = grads.reshape(info["num_grads"], width)
    return int(np.count_nonzero(np.any(grads != 0, axis=1)))


# -- the run --------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    total = args.warmup + args.rounds * args.steps
    chunks = source_chunks(total * BATCH)  # one epoch: every example is seen once
    make_bergson, peer = bergson_setup()
    print(f"peer: {peer if make_bergson else 'unavailable: ' + peer}", flush=True)
    done = threading.Semaphore(0)
    results: dict[str, Any] = {"peer": peer, "peer_available": make_bergson is not None}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runners = [Runner("plain", trainer_for(ByteChunks(chunks), work / "plain", total), done, "Trainer alone")]
        trainer = trainer_for(ByteChunks(chunks), work / "dvemb", total)
        callback = record(
            trainer,
            work / "dvemb-log",
            calibration_batches=0,
            projection="random",
            proj_dim=PROJ_DIM,
            curvature="empirical",
            shard_size_mb=SHARD_SIZE_MB,
        )
        runners.append(
            Runner(
                "dvemb",
                trainer,
                done,
                f"`record(trainer, log, calibration_batches=0, projection='random', proj_dim={PROJ_DIM}, "
                f"curvature='empirical', shard_size_mb={SHARD_SIZE_MB})` (the earlier defaults)",
            )
        )
        default_trainer = trainer_for(ByteChunks(chunks), work / "dvemb-default", total)
        record(default_trainer, work / "dvemb-default-log", shard_size_mb=SHARD_SIZE_MB)
        runners.append(
            Runner(
                "dvemb default",
                default_trainer,
                done,
                f"`record(trainer, log, shard_size_mb={SHARD_SIZE_MB})`: the defaults (Gauss-Newton rows at the "
                "logits, look-ahead calibration before the first step)",
            )
        )
        bergson_callback = None
        dvemb_layers = None
        writes: dict[str, float] = {}
        if make_bergson is not None:
            try:
                trainer, bergson_callback = make_bergson(chunks, work / "bergson", total, work / "bergson-log")
                runners.append(
                    Runner(
                        "bergson",
                        trainer,
                        done,
                        f"`prepare_for_gradient_collection(trainer)`; "
                        f"`GradientCollectorCallback(log, projection_dim={BERGSON_PROJ})`",
                    )
                )
            except Exception as exc:
                traceback.print_exc()
                results["peer_available"] = False
                results["peer"] = f"{peer}: setting up its Trainer failed: {type(exc).__name__}: {exc}"
        for runner in runners:
            runner.thread.start()
        for round_ in range(-1, args.rounds):
            active = [r for r in runners if r.error is None]
            shift = max(round_, 0) % len(active)
            for runner in active[shift:] + active[:shift]:
                runner.turn(round_, args.warmup if round_ < 0 else args.steps)
                if runner.error is not None:
                    if runner.name in ("plain", "dvemb", "dvemb default"):
                        raise RuntimeError(f"{runner.name} failed: {runner.error}")
                    print(f"{runner.name} failed: {runner.error}", flush=True)
            if round_ < 0 and callback.recorder is not None:
                dvemb_layers = len(callback.recorder.layers)  # the recorder is live between turns
                writes = _time_shard_writes(callback.recorder)
            if round_ >= 0:
                print(
                    f"round {round_ + 1}/{args.rounds}: "
                    + ", ".join(
                        f"{r.name} {1e3 * statistics.median(r.steps[round_]):.1f} ms"
                        for r in runners
                        if round_ in r.steps
                    ),
                    flush=True,
                )
        for runner in runners:  # one at a time: train end (closing the log) runs alone
            if runner.error is None:
                runner.go.release()
                runner.done.acquire()
            runner.thread.join()
        rows = [summary(r, runners[0]) for r in runners]
        rows[1]["gradient_bytes_per_example_step"] = stored_bytes(work / "dvemb-log", "shard-*") / (total * BATCH)
        rows[1]["log_mb"] = stored_bytes(work / "dvemb-log") / 1e6
        rows[1]["layers"] = dvemb_layers
        if writes:  # shards written after the warm-up, the last one at train end (outside any turn)
            rows[1]["shard_writes"] = int(writes["count"])
            rows[1]["shard_write_ms_per_step"] = 1e3 * writes["seconds"] / (args.rounds * args.steps)
        if bergson_callback is not None and len(rows) > 2:
            if runners[2].error is None:
                written = bergson_rows_written(work / "bergson-log")
                rows[2]["rows_written"] = written
                gradients = stored_bytes(work / "bergson-log", "gradients.bin")
                rows[2]["gradient_bytes_per_example_step"] = gradients / (total * BATCH)
                rows[2]["log_mb"] = stored_bytes(work / "bergson-log") / 1e6
                rows[2]["layers"] = len(bergson_callback.grad_sizes)
                if written != total * BATCH:
                    rows[2]["note"] = f"{written} gradient rows written, {total * BATCH} expected"
            else:
                results["peer_available"] = False
                results["peer"] = f"{peer}: training with its callback failed: {runners[2].error}"
                rows[2] = {"configuration": "bergson", "unavailable": results["peer"]}
    results["rows"] = rows
    return results


def summary(runner: Runner, plain: Runner) -> dict[str, Any]:
    if runner.error is not None:
        return {"configuration": runner.name, "unavailable": runner.error}
    rounds = sorted(runner.steps)
    medians = [statistics.median(runner.steps[r]) for r in rounds]
    ratios = [statistics.median(runner.steps[r]) / statistics.median(plain.steps[r]) for r in rounds]
    loop_ratios = [
        statistics.median(runner.loop[r]) / statistics.median(plain.loop[r])
        for r in rounds
        if runner.loop.get(r) and plain.loop.get(r)
    ]
    every = [s for r in rounds for s in runner.steps[r]]
    plain_every = [s for r in rounds for s in plain.steps[r]]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "configuration": runner.name,
        "what": runner.describe,
        "median_step_ms": 1e3 * statistics.median(medians),
        "ratio": statistics.median(ratios),
        "ratio_iqr": [quartiles[0], quartiles[2]],
        "mean_ratio": statistics.fmean(every) / statistics.fmean(plain_every),
        "loop_ratio": statistics.median(loop_ratios) if loop_ratios else None,
        "round_ratios": ratios,
    }


# -- report ---------------------------------------------------------------------------------------


#: Issue 20's target for the one-liner's defaults (Gauss-Newton rows found at the logits).
DEFAULT_TARGET_RATIO = 1.25


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["configuration"]: r for r in rows}
    ours = by["dvemb"]
    line = (
        f"dvemb {ours['ratio']:.2f}x the plain step (IQR over rounds {ours['ratio_iqr'][0]:.2f}-"
        f"{ours['ratio_iqr'][1]:.2f}): at most {TARGET_RATIO}x "
        + ("**met**" if ours["ratio"] <= TARGET_RATIO else "**NOT met**")
    )
    if ours["ratio"] <= TARGET_RATIO < ours["ratio_iqr"][1]:
        line += " (borderline: the upper quartile is above the target)"
    peer = by.get("bergson")
    if peer is None or "unavailable" in peer:
        line += "; bergson unavailable, so the comparison was not made"
    else:
        lower = ours["ratio"] < peer["ratio"]
        line += f"; bergson {peer['ratio']:.2f}x: lower than bergson's " + ("**met**" if lower else "**NOT met**")
    out = [line + "."]
    default = by.get("dvemb default")
    if default is not None and "ratio" in default:
        out.append(
            f"dvemb default (Gauss-Newton) {default['ratio']:.2f}x the plain step (IQR {default['ratio_iqr'][0]:.2f}-"
            f"{default['ratio_iqr'][1]:.2f}): at most {DEFAULT_TARGET_RATIO}x (issue 20) "
            + ("**met**" if default["ratio"] <= DEFAULT_TARGET_RATIO else "**NOT met**")
            + (f"; bergson {peer['ratio']:.2f}x." if peer is not None and "ratio" in peer else ".")
        )
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| configuration | layers recorded | median step ms | ratio to plain (IQR over rounds) | ratio of mean steps "
        "| ratio with data loading | gradient bytes per example per step | log on disk, MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "unavailable" in r:
            out.append(f"| {r['configuration']} | - | unavailable | - | - | - | - | {r['unavailable']} |")
            continue
        stored = r.get("gradient_bytes_per_example_step")
        log_mb = r.get("log_mb")
        loop = r.get("loop_ratio")
        out.append(
            f"| {r['configuration']} | {r.get('layers', '-')} | {r['median_step_ms']:.1f} | {r['ratio']:.2f}x "
            f"({r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}) | {r['mean_ratio']:.2f}x | "
            + (f"{loop:.2f}x" if loop is not None else "-")
            + " | "
            + (f"{stored:,.0f}" if stored is not None else "-")
            + " | "
            + (f"{log_mb:.1f}" if log_mb is not None else "-")
            + " |"
        )
    return out


def _writer_sentence(rows: list[dict[str, Any]]) -> str:
    ours = next(r for r in rows if r["configuration"] == "dvemb")
    if "shard_write_ms_per_step" not in ours:
        return ""
    return (
        f"dvemb's background writer wrote {ours['shard_writes']} shards after the warm-up (the last at train end), "
        f"{ours['shard_write_ms_per_step']:.1f} ms per measured dvemb step amortised; it can still be busy when the "
        "next configuration's turn starts, which counts against that configuration, not dvemb (the 'ratio of "
        "mean steps' column shows any dvemb step that waited for it). "
    )


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], lines: list[str]) -> str:
    m = meta["machine"]
    described = [f"- **{r['configuration']}**: {r['what']}." for r in rows if "what" in r]
    body = [
        f"## {SECTION}",
        "",
        f"Produced by `{meta['command']}` on {meta['date']}, on {m['cores']} CPU cores ({m['cpu']}), "
        f"{m['threads']} torch threads, no GPU, torch {m['torch']}, transformers {meta['transformers']}, dvemb "
        f"{m['dvemb']}, peer: {meta['peer']}. Load average (1 min) {meta['load_before']:.2f} before and "
        f"{meta['load_after']:.2f} after the run ({meta['elapsed_s']:.0f} s): the machine is shared, and the ratios "
        "are what to read.",
        "",
        f"`transformers.Trainer` training a GPT-2 built from `GPT2Config` ({LAYERS} layers, width {WIDTH}, {HEADS} "
        f"heads, byte vocabulary 256, no dropout, float32; no download) on {SEQ}-byte chunks of standard-library "
        f"sources, batch {BATCH}, AdamW lr 1e-3, no gradient clipping, CPU. Each configuration has its own Trainer "
        "and model (same initial weights); the Trainers run in threads that pass a baton, so one trains at a time: "
        f"a warm-up turn of {meta['warmup']} steps each, then {meta['rounds']} rounds of {meta['steps']} steps of "
        "every configuration (rotating order). Step: from before the first callback's `on_step_begin` to after the "
        "last callback's `on_step_end` (forward, backward with the hooks, optimizer step, every callback's step "
        "work; not the data loader). The ratio is the median over rounds of (configuration's median / plain's "
        "median in the same round), interquartile range over rounds in brackets; 'ratio of mean steps' includes "
        "any step that waited for dvemb's background shard writer; 'ratio with data loading' times "
        "`on_step_end` to the next `on_step_end` (the whole loop, the index column's collation included). "
        f"{_writer_sentence(rows)}"
        "Projection: 16 x 16 per layer for both (dvemb `proj_dim=256`, bergson `projection_dim=16`); dvemb records "
        "the 16 Conv1D layers and the tied embedding / output head, bergson the 16 Conv1D layers of "
        "`model.base_model` (not the head). bergson runs with its defaults (`use_optimizer_state=True`: after the "
        "first step it reads Adam's second moments and, projecting, forms each example's full per-layer gradient "
        "to divide it by them before the two-sided projection). Gradient bytes: "
        "the gradient store on disk / (steps x batch); dvemb: its shards (float32 rows, 17 x 256 x 4 = 17,408 bytes "
        "per example, plus each step's optimizer state, Adam's second-moment row and column factors per layer, "
        "written every 4 MB on a background thread), bergson: its `gradients.bin` (a float16 memmap, one row per "
        "example, sized for the whole data set, filled in place). 'Log on disk': everything each wrote (dvemb also "
        "the manifest and projection seeds, bergson also its processor with the Adam normalizers it read).",
        "",
        *described,
        "",
        *table(rows),
        "",
        f"Targets: the dvemb callback at most {TARGET_RATIO}x the plain Trainer step, and lower overhead than "
        "Bergson's callback.",
        "",
        *(f"- {line}" for line in lines),
        *(f"- {note}" for note in meta["notes"]),
    ]
    return "\n".join(body) + "\n"


def _interpreter() -> str:
    """The interpreter as the command line names it from the repository root (its venv's path)."""
    path = Path(sys.executable)
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        return str(absolute.relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a few steps to check that it runs; no markdown")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 3, 3
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = measure(args)
    elapsed = time.perf_counter() - started
    rows = results["rows"]
    command = f"{_interpreter()} -m bench.trainer_overhead"
    if command.startswith("bench/.venv-bench/"):
        command = "bash bench/setup.sh && " + command
    if len(sys.argv) > 1:
        command += " " + " ".join(sys.argv[1:])
    notes = []
    by = {r["configuration"]: r for r in rows}
    if "note" in by.get("bergson", {}):
        notes.append(f"bergson: {by['bergson']['note']}.")
    meta = {
        "command": command,
        "date": utc_stamp(),
        "machine": machine(),
        "transformers": transformers.__version__,
        "peer": results["peer"] if results["peer_available"] else f"unavailable ({results['peer']})",
        "warmup": args.warmup,
        "rounds": args.rounds,
        "steps": args.steps,
        "target": f"dvemb at most {TARGET_RATIO}x plain, and lower overhead than bergson",
        "elapsed_s": elapsed,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "notes": notes,
    }
    lines = verdicts(rows)
    print("\n" + "\n".join(table(rows)) + "\n")
    for line in lines:
        print(line)
    out = save_json(
        "trainer_overhead.quick.json" if args.quick else "trainer_overhead.json",
        {"meta": meta, "results": rows, "verdicts": lines},
    )
    print(f"\nwritten: {out}")
    if not (args.quick or args.no_markdown):
        print(f"written: {replace_section(SECTION, markdown(meta, rows, lines))}")
    print(f"total {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
