"""Per-step overhead of the dvemb recorder against a plain training loop and against dattri.

Run (from the repository root)::

    bash bench/setup.sh && bench/.venv-bench/bin/python -m bench.recorder_overhead

Measures, on CPU with two threads, the median wall time of one training step (forward,
mean cross-entropy, backward, SGD step, zero_grad) after warm-up, for:

- ``plain``: the loop alone;
- ``dvemb default``: the loop inside ``rec.step()`` with the recorder's defaults (``curvature="ggn"``, its
  Gauss-Newton rows found at the model's output during ``loss.backward()``: all classes for the MLP's 10,
  one sampled label per token for the LM);
- ``dvemb ggn, 1 sampled label`` and ``2 sampled labels``: the same with ``curvature_samples=1`` / ``2``
  (cheaper rows; the fidelity they cost is in docs/recorder.md);
- ``dvemb empirical``: the loop inside ``rec.step()`` with ``curvature="empirical"`` (no extra backward);
- ``dattri``: the loop with dattri's ``DVEmbAttributor`` (Kronecker factorisation, the paper's),
  used as its documentation shows: ``cache_gradients_context`` where the installed version has
  it, else ``cache_gradients(...)`` called before the training step;
- ``dvemb empirical`` with proj_dim 64 and 1024 (the default is 256): the projection-size sweep;

on an MLP on scikit-learn's digits and on a small causal transformer language model.

Configurations run interleaved: every configuration has its own copy of the model, optimizer and
log; after a warm-up, rounds run each configuration for a few steps in turn (rotating the order),
so that the machine's noise affects all of them alike. The ratio to plain is the median over
rounds of (configuration's median step in the round / plain's median step in the round).

Logs go to temporary directories (deleted after each configuration). Results: a table on stdout,
bench/out/recorder_overhead.json, and the "## Recorder overhead" section of BENCHMARKS.md.
``--profile`` instead breaks the empirical recorder's time down by function.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import gc
import inspect
import io
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dvemb
from bench.harness import cpu_model, replace_section, save_json, utc_stamp

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
SECTION = "## Recorder overhead"
TARGET_RATIO = 1.3
SHARD_SIZE_MB = 4.0  # small, so that shards are written (and timed) inside the measured window
THREADS = 2


# -- models and data ------------------------------------------------------------------------------


class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10 with ReLU: three tracked nn.Linear layers."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block; q, k, v, out and the MLP are separate nn.Linear layers."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        h = self.ln1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, self.heads, D // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Causal character-level LM: token and position embeddings, blocks, final norm, linear head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))  # (B, L, V)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def digits_task(batch_size: int) -> tuple[nn.Module, list[Batch], dict[str, Any]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    n_batches = len(y) // batch_size
    batches = [
        (
            x[order[i * batch_size : (i + 1) * batch_size]],
            y[order[i * batch_size : (i + 1) * batch_size]],
            order[i * batch_size : (i + 1) * batch_size].clone(),
        )
        for i in range(n_batches)
    ]
    torch.manual_seed(0)
    model = MLP()
    info = {
        "data": f"sklearn digits ({len(y)} examples, 64 features, 10 classes)",
        "batch_size": batch_size,
        "architecture": "Linear 64-128, ReLU, Linear 128-128, ReLU, Linear 128-10",
    }
    return model, batches, info


def lm_task(
    batch_size: int, seq_len: int, vocab: int, width: int, layers: int
) -> tuple[nn.Module, list[Batch], dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    n_examples = 512
    tokens = torch.randint(0, vocab, (n_examples, seq_len + 1), generator=g)
    order = torch.randperm(n_examples, generator=g)
    batches = []
    for i in range(n_examples // batch_size):
        ids = order[i * batch_size : (i + 1) * batch_size].clone()
        seq = tokens[ids]
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), ids))
    torch.manual_seed(0)
    model = TinyLM(vocab, width, layers, heads=4, seq_len=seq_len)
    info = {
        "data": f"random tokens, vocab {vocab}, {n_examples} sequences of {seq_len}",
        "batch_size": batch_size,
        "architecture": f"causal transformer, {layers} layers, width {width}, 4 heads, MLP {4 * width}, "
        f"seq {seq_len}, vocab {vocab}",
    }
    return model, batches, info


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


# -- configurations ---------------------------------------------------------------------------------


class Config:
    """One way of running the training step, on its own copy of the model."""

    name = "plain"

    def __init__(self, base: nn.Module, lr: float) -> None:
        self.model = copy.deepcopy(base)
        self.model.train()
        self.lr = lr
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.cursor = 0
        self.info: dict[str, Any] = {}
        self.write_s = 0.0  # time spent writing shards, all steps
        self.writes = 0
        self.measured_write_s = 0.0  # the part of it inside measured steps
        self.measured_writes = 0

    def step(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        loss = ce_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()

    def finish(self, rows: int) -> dict[str, Any]:
        return {}


class RecorderConfig(Config):
    def __init__(
        self, base: nn.Module, lr: float, curvature: str, proj_dim: int, samples: int | None = None, name: str = ""
    ) -> None:
        super().__init__(base, lr)
        self.curvature_mode = curvature
        self.proj_dim = proj_dim
        self.name = (name or f"dvemb {curvature}") + (
            "" if proj_dim == dvemb.DEFAULT_PROJ_DIM else f" proj_dim={proj_dim}"
        )
        self.log_dir = Path(tempfile.mkdtemp(prefix="dvemb-bench-"))
        self.rec = dvemb.Recorder(
            self.model,
            self.log_dir,
            proj_dim=proj_dim,
            curvature=curvature,
            curvature_samples=samples,
            projection="random",
            loss_reduction="mean",
            shard_size_mb=SHARD_SIZE_MB,
            overwrite=True,
        )
        self._time_shard_writes()

    def _time_shard_writes(self) -> None:
        """Wrap this recorder's shard writer with a timer (so its cost per step can be reported apart)."""
        writer = getattr(self.rec, "_writer", None)
        write = getattr(writer, "_write_shard", None)
        if write is None:  # the recorder's internals changed: report no breakdown rather than fail
            self.info["shard_write_timing"] = "unavailable"
            return

        def timed(*args: object) -> None:
            t0 = time.perf_counter()
            try:
                write(*args)
            finally:
                self.write_s += time.perf_counter() - t0
                self.writes += 1

        writer._write_shard = timed

    def step(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        with self.rec.step(ids, self.opt):
            logits = self.model(x)  # ggn: the recorder finds its rows at these logits during backward
            loss = ce_loss(logits, y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()

    def finish(self, rows: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.rec.close()
        close_ms = (time.perf_counter() - t0) * 1e3
        manifest = dvemb.open_log(self.log_dir).manifest  # with its shard list (version 3: from the shard index)
        shard_bytes = sum(s["bytes"] for s in manifest["shards"])
        dir_bytes = sum(p.stat().st_size for p in self.log_dir.iterdir() if p.is_file())
        recorded_rows = sum(s["num_rows"] for s in manifest["shards"])
        dims = {layer["name"]: layer["k_out"] * layer["k_in"] for layer in manifest["layers"]}
        shutil.rmtree(self.log_dir)
        return {
            "bytes_per_example_step": shard_bytes / recorded_rows,
            "log_dir_bytes_per_example_step": dir_bytes / recorded_rows,
            "bytes_where": "written to disk (shard files)",
            "recorded_steps": manifest["num_steps"],
            "recorded_rows": recorded_rows,
            "shards": len(manifest["shards"]),
            "floats_per_example": sum(dims.values()),
            "tracked_layers": len(dims),
            "curvature_rows_per_example": manifest["curvature"]["rows_per_example"],
            "close_ms": close_ms,
        }


class DattriConfig(Config):
    name = "dattri"

    def __init__(self, base: nn.Module, lr: float, proj_dim_per_layer: int) -> None:
        super().__init__(base, lr)
        from dattri.algorithm.dvemb import DVEmbAttributor
        from dattri.task import AttributionTask

        def loss_func(model: nn.Module, data: tuple[torch.Tensor, ...], device: Any) -> torch.Tensor:
            inputs, targets = data
            return ce_loss(model(inputs.to(device)), targets.to(device))

        task = AttributionTask(loss_func=loss_func, model=self.model, checkpoints=[self.model.state_dict()])
        n_linear = sum(1 for m in self.model.modules() if isinstance(m, nn.Linear))
        params = inspect.signature(DVEmbAttributor.__init__).parameters
        if "proj_params" in params:  # later versions: per-layer projected size
            from dattri.params.projection import DVEmbProjectionParams

            self.att = DVEmbAttributor(
                task=task,
                factorization_type="kronecker",
                proj_params=DVEmbProjectionParams(proj_dim_per_layer=proj_dim_per_layer),
            )
            proj_arg = f"proj_params=DVEmbProjectionParams(proj_dim_per_layer={proj_dim_per_layer})"
        else:  # 0.3.0: proj_dim is the total; each Kronecker side gets sqrt(proj_dim / n_layers)
            self.att = DVEmbAttributor(
                task=task, factorization_type="kronecker", proj_dim=proj_dim_per_layer * n_linear
            )
            proj_arg = f"proj_dim={proj_dim_per_layer * n_linear}"  # = 16 x 16 per layer, as dvemb's default
        self.use_context = hasattr(self.att, "cache_gradients_context")
        api = (
            "with att.cache_gradients_context(epoch, ids, lr): forward, loss, backward"
            if self.use_context
            else "att.cache_gradients(epoch, (x, y), ids, lr) before the training step (its own forward and "
            "backward), as in dattri's examples/dvemb/dvemb_mlp.py"
        )
        self.info = {
            "dattri_api": api,
            "dattri_args": f"factorization_type='kronecker', {proj_arg}",
            "dattri_layers": n_linear,
        }

    def step(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        if self.use_context:
            with self.att.cache_gradients_context(0, ids, self.lr):
                loss = ce_loss(self.model(x), y)
                loss.backward()
            self.opt.step()
            self.opt.zero_grad()
        else:
            self.att.cache_gradients(0, (x, y), ids, self.lr)
            self.opt.zero_grad()
            super().step(x, y, ids)

    def finish(self, rows: int) -> dict[str, Any]:
        cached = [t for ts in self.att.cached_gradients.values() for t in ts]
        nbytes = sum(t.numel() * t.element_size() for t in cached)
        n_rows = sum(t.shape[0] for t in cached)
        out = {
            "bytes_per_example_step": nbytes / n_rows if n_rows else None,
            "bytes_where": "kept in RAM (not written)",
            "floats_per_example": int(cached[0].shape[1]) if cached else None,
            "recorded_rows": n_rows,
        }
        self.att.clear_cache()
        return out


def dattri_status() -> tuple[bool, str]:
    try:
        import dattri  # noqa: F401
        from dattri.algorithm.dvemb import DVEmbAttributor  # noqa: F401
    except Exception as exc:  # any import failure makes the peer unavailable, with its reason
        return False, f"{type(exc).__name__}: {exc}"
    from importlib.metadata import version

    return True, f"dattri {version('dattri')}"


# -- timing -------------------------------------------------------------------------------------------


def run_interleaved(
    configs: list[Config], batches: list[Batch], warmup: int, rounds: int, steps_per_round: int
) -> dict[str, list[list[float]]]:
    """Per configuration, per round, the measured step times in seconds."""

    def one_step(c: Config) -> float:
        x, y, ids = batches[c.cursor % len(batches)]
        c.cursor += 1
        t0 = time.perf_counter()
        c.step(x, y, ids)
        return time.perf_counter() - t0

    def measured_step(c: Config) -> float:
        w, n = c.write_s, c.writes
        t = one_step(c)
        c.measured_write_s += c.write_s - w
        c.measured_writes += c.writes - n
        return t

    for c in configs:
        for _ in range(warmup):
            one_step(c)
    times: dict[str, list[list[float]]] = {c.name: [] for c in configs}
    for r in range(rounds):
        gc.collect()
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for c in order:
            one_step(c)  # unmeasured: re-warm caches after switching configuration
            times[c.name].append([measured_step(c) for _ in range(steps_per_round)])
    return times


def summarise(times: dict[str, list[list[float]]], plain: str = "plain") -> dict[str, dict[str, float]]:
    out = {}
    plain_round_medians = [statistics.median(r) for r in times[plain]]
    for name, per_round in times.items():
        flat = [t for r in per_round for t in r]
        round_medians = [statistics.median(r) for r in per_round]
        ratios = [m / p for m, p in zip(round_medians, plain_round_medians, strict=True)]
        mean_ratios = [statistics.fmean(r) / statistics.fmean(p) for r, p in zip(per_round, times[plain], strict=True)]
        out[name] = {
            "median_ms": statistics.median(flat) * 1e3,
            "mean_ms": statistics.fmean(flat) * 1e3,
            "p90_ms": float(np.percentile(flat, 90)) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_p25": float(np.percentile(ratios, 25)),
            "ratio_p75": float(np.percentile(ratios, 75)),
            "ratio_min_round": min(ratios),
            "ratio_max_round": max(ratios),
            "mean_ratio": statistics.median(mean_ratios),
            "measured_steps": len(flat),
        }
    return out


def bench_model(
    label: str,
    base: nn.Module,
    batches: list[Batch],
    lr: float,
    args: argparse.Namespace,
    rounds: int,
    steps: int,
    peer_ok: bool,
    peer_reason: str,
) -> list[dict[str, Any]]:
    print(f"\n== {label}: building configurations", flush=True)
    configs: list[Config] = [
        Config(base, lr),
        RecorderConfig(base, lr, "ggn", 256, name="dvemb default"),
        RecorderConfig(base, lr, "ggn", 256, samples=1, name="dvemb ggn, 1 sampled label"),
        RecorderConfig(base, lr, "ggn", 256, samples=2, name="dvemb ggn, 2 sampled labels"),
        RecorderConfig(base, lr, "empirical", 256),
    ]
    peer_error = None
    if peer_ok:
        try:
            configs.append(DattriConfig(base, lr, 256))
            x, y, ids = batches[0]
            probe = DattriConfig(base, lr, 256)  # a failing step must not abort the whole benchmark
            probe.step(x, y, ids)
            del probe
        except Exception as exc:
            peer_error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            configs = [c for c in configs if c.name != "dattri"]
    configs += [RecorderConfig(base, lr, "empirical", 64), RecorderConfig(base, lr, "empirical", 1024)]
    print(
        f"   {len(configs)} configurations x ({args.warmup} warm-up + {rounds} rounds x (1 + {steps}) steps)",
        flush=True,
    )
    t0 = time.perf_counter()
    times = run_interleaved(configs, batches, args.warmup, rounds, steps)
    print(f"   measured in {time.perf_counter() - t0:.0f} s", flush=True)
    stats = summarise(times)
    rows = []
    batch_size = len(batches[0][2])
    for c in configs:
        st = stats[c.name]
        writes = {
            "shard_write_ms_per_step": c.measured_write_s / st["measured_steps"] * 1e3,
            "shard_writes_measured": c.measured_writes,
            "shard_write_ms_each": c.measured_write_s / c.measured_writes * 1e3 if c.measured_writes else None,
        }
        if isinstance(c, RecorderConfig):
            # Shards are written on the recorder's background thread, overlapping training: the cost the
            # training loop really pays is in its mean step time (which includes any wait for the writer).
            writes["ratio_with_writes"] = st["mean_ratio"]
        rows.append({"model": label, "configuration": c.name, **st, **writes, **c.finish(batch_size), **c.info})
    if not any(c.name == "dattri" for c in configs):
        rows.insert(3, {"model": label, "configuration": "dattri", "unavailable": peer_error or peer_reason})
    return rows


# -- profile ------------------------------------------------------------------------------------------


def profile(args: argparse.Namespace) -> None:
    """Where the empirical recorder's extra time goes: wrapped recorder functions, then cProfile."""
    from dvemb import layers as dl
    from dvemb import writer as dw
    from dvemb.recording import hooks, steps

    # The recorder's parts (dvemb/recording/): its hooks, its step bookkeeping and the id conversion steps use.
    targets = [
        (hooks.LayerHooks, "_on_forward"),
        (hooks.LayerHooks, "_on_output_grad"),
        (steps.StepBook, "finish"),
        (steps.StepBook, "_check_finite"),
        (steps.StepBook, "_collect"),
        (dw.LogWriter, "accept_step"),
        (steps, "as_id_list"),
        (dl.LinearAdapter, "forward_factor"),
        (dl.LinearAdapter, "backward_factor"),
        (dl.LayerAdapter, "combine"),
    ]
    acc: dict[str, float] = {}

    def wrap(owner: Any, attr: str) -> None:
        fn = getattr(owner, attr)
        key = f"{getattr(owner, '__name__', owner)}.{attr}".replace("dvemb.recording.", "")

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)

    report = io.StringIO()
    tasks = [("mlp-digits", *digits_task(64)[:2], 0.05), ("transformer-lm", *lm_task(16, 128, 128, 128, 4)[:2], 0.02)]
    for label, base, batches, lr in tasks:
        n = args.profile_steps if label.startswith("mlp") else max(10, args.profile_steps // 10)
        plain, rec = Config(base, lr), RecorderConfig(base, lr, "empirical", 256)
        times = run_interleaved([plain, rec], batches, args.warmup, 4, n // 4)
        stats = summarise(times)
        print(
            f"\n== {label}: plain {stats['plain']['median_ms']:.3f} ms, empirical "
            f"{stats[rec.name]['median_ms']:.3f} ms (ratio {stats[rec.name]['ratio']:.2f})",
            file=report,
        )
        originals = {(o, a): getattr(o, a) for o, a in targets}
        for o, a in targets:
            wrap(o, a)
        acc.clear()
        writes_before, write_s_before = rec.writes, rec.write_s
        t0 = time.perf_counter()
        for i in range(n):
            rec.step(*batches[i % len(batches)])
        total = time.perf_counter() - t0
        for (o, a), fn in originals.items():
            setattr(o, a, fn)
        # The shard writer is timed on the instance (RecorderConfig), which the class-level wrap cannot see.
        acc[f"LogWriter._write_shard ({rec.writes - writes_before} shards)"] = rec.write_s - write_s_before
        print(
            f"   wrapped functions, {n} steps, {total / n * 1e6:.0f} us/step in all "
            "(nested functions are counted in their callers too):",
            file=report,
        )
        for key, value in sorted(acc.items(), key=lambda kv: -kv[1]):
            print(f"   {value / n * 1e6:10.1f} us/step  {key}", file=report)
        prof = cProfile.Profile()
        prof.enable()
        for i in range(n):
            rec.step(*batches[i % len(batches)])
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print(f"   cProfile ({n} steps, sorted by own time; divide by {n} for per step):", file=report)
        print(s.getvalue(), file=report)
        rec.finish(len(batches[0][2]))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "recorder_profile.txt").write_text(report.getvalue())
    print(report.getvalue())
    print(f"written: {OUT_DIR / 'recorder_profile.txt'}")


# -- report -------------------------------------------------------------------------------------------


def fmt_bytes(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = [
        "model",
        "configuration",
        "median step ms",
        "ratio to plain (IQR over rounds)",
        "shard writing, ms per step (amortised)",
        "ratio incl. shard writing",
        "bytes per example per step",
    ]
    lines = []
    body = []
    for r in rows:
        if "unavailable" in r:
            body.append([r["model"], r["configuration"], "unavailable", "-", "-", "-", r["unavailable"]])
            continue
        bytes_txt = fmt_bytes(r.get("bytes_per_example_step"))
        if r["configuration"] == "dattri":
            bytes_txt += " (in RAM)"
        elif r["configuration"] == "plain":
            bytes_txt = "-"
        ratio = (
            f"{r['ratio']:.2f}x"
            if r["configuration"] == "plain"
            else (f"{r['ratio']:.2f}x ({r['ratio_p25']:.2f}-{r['ratio_p75']:.2f})")
        )
        with_writes = f"{r['ratio_with_writes']:.2f}x" if "ratio_with_writes" in r else "-"
        writes = f"{r['shard_write_ms_per_step']:.2f}" if "ratio_with_writes" in r else "-"
        body.append([r["model"], r["configuration"], f"{r['median_ms']:.2f}", ratio, writes, with_writes, bytes_txt])
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * 5) + "|")
        lines += ["| " + " | ".join(b) + " |" for b in body]
    else:
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


#: Issue 20's targets for the recorder's defaults (ggn found at the output), per model.
DEFAULT_TARGETS = {"mlp-digits": 2.0, "transformer-lm": 1.25}


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per model: the issue's two targets, judged on the median ratio, with the caveats."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["configuration"]: r for r in rows if r["model"] == model}
        emp = by["dvemb empirical"]
        peer = by.get("dattri", {})
        met = emp["ratio"] <= TARGET_RATIO
        line = (
            f"{model}: empirical {emp['ratio']:.2f}x plain (IQR over rounds {emp['ratio_p25']:.2f}-"
            f"{emp['ratio_p75']:.2f}): at most {TARGET_RATIO}x **{'met' if met else 'NOT met'}**"
        )
        if met and emp["ratio_p75"] > TARGET_RATIO:
            line += " (borderline: the upper quartile is above the target)"
        with_writes = emp.get("ratio_with_writes")
        if with_writes is not None:
            line += f"; {with_writes:.2f}x with shard writing amortised"
            if met and with_writes > TARGET_RATIO:
                line += " (above the target)"
        if "ratio" in peer:
            lower = emp["ratio"] < peer["ratio"]
            line += f"; dattri {peer['ratio']:.2f}x: lower overhead than dattri **{'met' if lower else 'NOT met'}**"
        else:
            line += "; dattri unavailable, so the comparison was not made"
        out.append(line + ".")
        default = by.get("dvemb default")
        if default is not None and "ratio" in default:
            target = DEFAULT_TARGETS.get(model, 1.25)
            reached = default["ratio"] <= target
            out.append(
                f"{model}: the defaults (ggn, rows found at the output, "
                f"{default.get('curvature_rows_per_example')} rows per example) {default['ratio']:.2f}x plain (IQR "
                f"{default['ratio_p25']:.2f}-{default['ratio_p75']:.2f}), "
                f"{default.get('ratio_with_writes', float('nan')):.2f}x with shard writing: at most {target}x "
                f"(issue 20) **{'met' if reached else 'NOT met'}**."
            )
    return out


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dvemb": dvemb.__version__,
        "platform": platform.platform(),
    }


def write_benchmarks_md(meta: dict[str, Any], rows: list[dict[str, Any]], lines: list[str]) -> Path:
    m = meta["machine"]
    peer_rows = {r["model"]: r for r in rows if r["configuration"] == "dattri" and "dattri_api" in r}
    section = [
        SECTION,
        "",
        f"Produced by `{meta['command']}` on {meta['date']}, on {m['cores']} CPU cores ({m['cpu']}), "
        f"{m['threads']} torch threads, no GPU, torch {m['torch']}, dvemb {m['dvemb']}, peer: {meta['peer']}. "
        f"Load average (1 min) {meta['load_before']:.2f} before and {meta['load_after']:.2f} after the run "
        f"({meta['elapsed_s']:.0f} s): the machine is shared, and the ratios are what to read.",
        "",
        "Median wall time of one training step after warm-up (forward, mean cross-entropy, backward, SGD step, "
        "zero_grad). Configurations run interleaved, each on its own copy of the model: after "
        f"{meta['warmup']} warm-up steps each, rounds run every configuration for a few steps in turn; the ratio is "
        "the median over rounds of (configuration's median / plain's median in the same round), with the "
        "interquartile range over rounds in brackets; it can differ from the ratio of the overall medians when "
        "the machine's speed drifts between rounds. Shards were "
        f"written every {SHARD_SIZE_MB:g} MB (`shard_size_mb={SHARD_SIZE_MB:g}`, the default is 256) so that writing "
        "happens inside the measured window. The recorder writes shards (safetensors, sha256, fsync, manifest) "
        "on a background thread, overlapping training; 'shard write ms/step' is that thread's time amortised over "
        "the measured steps, and 'ratio incl. shard writing' is the ratio of mean step times, which includes any "
        "step that had to wait for the writer. "
        "Bytes per example per step: shard bytes on disk / recorded rows (ggn mode stores "
        "curvature rows too); for dattri, the projected gradients it keeps in RAM. Logs went to temporary "
        "directories, deleted after each configuration.",
        "",
    ]
    for mi in meta["models"]:
        section.append(
            f"- **{mi['label']}**: {mi['architecture']}; {mi['data']}; batch {mi['batch_size']}; "
            f"SGD lr {mi['lr']}; {mi['rounds']} rounds x {mi['steps_per_round']} measured steps per "
            "configuration."
        )
    for model, r in peer_rows.items():
        section.append(
            f"- **dattri** on {model}: `DVEmbAttributor(task, {r['dattri_args']})` ({r['dattri_layers']} "
            f"Linear layers, so 16 x 16 per layer as in dvemb); {r['dattri_api']}."
        )
    section += [
        "",
        table(rows, markdown=True),
        "",
        f"Targets (from the issues): empirical mode at most {TARGET_RATIO}x the plain step, and lower overhead than "
        "dattri; the defaults (ggn rows found at the output) at most 2x on the MLP and 1.25x on the LM.",
        "",
    ]
    section += [f"- {v}" for v in lines]
    section.append("")
    return replace_section(SECTION.removeprefix("## "), "\n".join(section))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps per configuration first")
    parser.add_argument("--mlp-rounds", type=int, default=20)
    parser.add_argument("--mlp-steps", type=int, default=25, help="measured steps per configuration per round")
    parser.add_argument("--lm-rounds", type=int, default=20)
    parser.add_argument("--lm-steps", type=int, default=6)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few steps only, to recorder_overhead.quick.json; BENCHMARKS.md is not touched",
    )
    parser.add_argument("--no-markdown", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--profile", action="store_true", help="break down the empirical recorder's time instead")
    parser.add_argument("--profile-steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    # dattri's backward hook on the first layer (whose input needs no gradient) warns at every step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.quick:
        args.warmup, args.mlp_rounds, args.mlp_steps, args.lm_rounds, args.lm_steps = 2, 2, 3, 2, 2
    if args.profile:
        profile(args)
        return 0
    load_before = os.getloadavg()[0]
    peer_ok, peer_reason = dattri_status()
    print(f"peer: {peer_reason if peer_ok else 'unavailable: ' + peer_reason}")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    models_info = []
    mlp, mlp_batches, mlp_info = digits_task(64)
    models_info.append(
        {"label": "mlp-digits", "lr": 0.05, "rounds": args.mlp_rounds, "steps_per_round": args.mlp_steps, **mlp_info}
    )
    rows += bench_model(
        "mlp-digits", mlp, mlp_batches, 0.05, args, args.mlp_rounds, args.mlp_steps, peer_ok, peer_reason
    )
    lm, lm_batches, lm_info = lm_task(16, 128, 128, 128, 4)
    models_info.append(
        {"label": "transformer-lm", "lr": 0.02, "rounds": args.lm_rounds, "steps_per_round": args.lm_steps, **lm_info}
    )
    rows += bench_model(
        "transformer-lm", lm, lm_batches, 0.02, args, args.lm_rounds, args.lm_steps, peer_ok, peer_reason
    )
    elapsed = time.perf_counter() - started
    command = "bash bench/setup.sh && bench/.venv-bench/bin/python -m bench.recorder_overhead"
    if len(sys.argv) > 1:
        command += " " + " ".join(sys.argv[1:])
    meta = {
        "command": command,
        "date": utc_stamp(),
        "machine": machine(),
        "peer": peer_reason if peer_ok else f"unavailable ({peer_reason})",
        "warmup": args.warmup,
        "shard_size_mb": SHARD_SIZE_MB,
        "target": f"empirical at most {TARGET_RATIO}x plain, and lower overhead than dattri",
        "models": models_info,
        "elapsed_s": elapsed,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }
    lines = verdicts(rows)
    print("\n" + table(rows, markdown=False) + "\n")
    for v in lines:
        print(v)
    out = save_json(
        "recorder_overhead.quick.json" if args.quick else "recorder_overhead.json",
        {"meta": meta, "results": rows, "verdicts": lines},
    )
    print(f"\nwritten: {out}")
    if not (args.quick or args.no_markdown):
        print(f"written: {write_benchmarks_md(meta, rows, lines)}")
    print(f"total {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
