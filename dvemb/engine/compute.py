"""Offline computation of data value embeddings, scores and phases from a gradient log.

:func:`compute` streams the log's shards from the last step to the first, runs the blocked
recursion per layer group (or on the full concatenated vector), scores every occurrence against
every query set, and writes the results documented in docs/results.md. Memory holds the ``M``
blocks, one shard and the aggregates; embeddings and per-occurrence scores go to memory-mapped
files. A checkpoint after every shard makes an interrupted run resume where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dvemb import formats
from dvemb import logformat as fmt
from dvemb.atomic import replacing
from dvemb.engine.approximations import approximations, tracked_share
from dvemb.engine.arrays import open_array, save_safetensors
from dvemb.engine.embedder import AUTO_FULL_MAX_DIM, Embedder, non_finite, resolve_blocks
from dvemb.engine.phases import find_phases
from dvemb.engine.query_sets import checkpoint_series, final_query_sets
from dvemb.engine.removal import REMOVALS, centre_steps, resolve_removal
from dvemb.engine.scoring import RunningTopK
from dvemb.errors import ConfigError
from dvemb.optim import PROPAGATIONS
from dvemb.reader import GradientLog, QuerySet, ShardData, open_log
from dvemb.writer import write_json_atomic

__all__ = ["AUTO_FULL_MAX_DIM", "RESULTS_VERSION", "ComputeArguments", "ComputeProgress", "compute"]

RESULTS_VERSION = 1
#: Working files of a running computation (removed when it finishes).
SCRATCH_DIR = "scratch"
_INDEX = ("row_step", "example_index", "epoch")


def default_block_rows(width: int) -> int:
    """Rows per chunk for a recursion whose widest block is ``width``: 128 up to 2048, 512 beyond (BENCHMARKS.md
    "Engine speed" sweeps 64 to 512 rows: 128 ran fastest at d = 256 and 1024, 512 at d = 4096)."""
    return 128 if width <= 2048 else 512


@dataclass(frozen=True)
class ComputeArguments:
    """Options of :func:`compute`.

    Attributes:
        curvature: ``None`` (the log's own mode), ``"empirical"`` or ``"ggn"`` (needs a ggn log).
        blocks: ``"auto"`` (default: ``"full"`` when the tracked layers' projected dimensions add up to at
            most :data:`AUTO_FULL_MAX_DIM` and share one optimizer setting, else ``"layer"``), ``"layer"``
            (one ``M`` block per layer) or ``"full"`` (one ``M`` over all layers: keeps the cross-layer
            curvature, which the block-diagonal form drops; BENCHMARKS.md "Projection fidelity" measures
            +0.1 Spearman against exact retraining, at ``(4 D^2)`` flops per row for ``D`` in total).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        accumulate_dtype: ``"float32"`` or ``"float64"`` for ``M`` and the recursion.
        block_rows: curvature rows processed together (whole steps; capped by memory). ``None`` follows the
            recursion's width (:func:`default_block_rows`): the blocked recursion does about ``4 d^2 + 2 n d`` flops
            per row, so large chunks add Gram and solve work, while tiny ones run many small, slow products.
        top_k: helpful and harmful examples kept per query and per query set.
        query_sets: names to score, or ``None`` for all query sets of the log.
        save_embeddings: write every occurrence's embedding to ``embeddings.npy``.
        embeddings_dtype: dtype of ``embeddings.npy``: ``"auto"`` (the accumulation dtype), ``"float32"`` or
            ``"float16"`` (half the bytes; scores are computed from the unrounded embeddings).
        segments: split training into this many segments, run independently (in parallel with
            ``compute(workers=...)`` or as Celery tasks) and combined exactly (the paper's influence
            checkpointing, :mod:`dvemb.engine.segmented`); the boundaries also fall at every checkpoint
            query set. Results equal those of one segment.
        propagation: ``"auto"`` (the optimizer-exact propagation of the log's optimizer when dvemb models
            it: SGD, SGD with momentum, Adam, AdamW; otherwise the SGD proxy), ``"optimizer"`` (the same,
            but an error instead of the proxy) or ``"sgd-proxy"`` (learning rate times gradient whatever the
            optimizer, as in the paper; for comparisons). docs/optimizers.md has the math.
        second_moment: under Adam and AdamW, also model how removing the example changes the second
            moment ``v`` (for layers stored without projection, which keep the per-coordinate state the
            term needs; projected layers never carry it). Costs one more ``d x d`` matrix per layer.
        projected_preconditioner: how Adam's diagonal preconditioner acts in a projected layer's
            coordinates: ``"kronecker"`` (default: the least-squares map of the projected vectors from
            Adafactor factors of ``v``, one small matrix per side) or ``"scalar"`` (one number per layer
            and step; kept for comparison, see BENCHMARKS.md).
        self_influence: write ``self_influence.npy``: each occurrence's embedding dotted with its own
            gradient at the step it was used, a stand-in for its influence on its own loss (the log
            holds no final-model gradients of training examples). Large values flag examples the
            model had to bend to fit (memorised, mislabelled).
        removal: what removing an occurrence from its step means. ``"auto"`` (default): ``"batch"`` for a
            log whose loss is the batch mean (``loss_reduction="mean"``), ``"weight"`` for a summed loss.
            ``"batch"``: the example leaves its batch and the step averages over the others, a gradient
            change of ``-(g_z - g_B) / (B - 1)`` (``g_B`` the batch mean), which is what dropping it from
            the data does; ``"weight"``: its weight in the step's loss becomes 0 and the others keep
            theirs, ``-g_z / B`` (the paper's sum-loss definition). Both are exact post hoc from the same
            embeddings (they are linear in the gradient); docs/engine.md and BENCHMARKS.md.
        second_moment_lifted: under Adam and AdamW, carry both moments of projected layers over their own
            coordinates where the log keeps what it needs (small layers; docs/optimizers.md, section 3).
            ``None`` (default): where the lifted states hold at most ``LIFT_AUTO_RATIO`` (16) times the
            recursion's own state, whose work they multiply about as much; ``True``: wherever memory allows
            (``LIFT_STATE_MAX``); ``False``: never. BENCHMARKS.md, "Adam's second moment under projection",
            measures what it buys and costs.
    """

    curvature: str | None = None
    blocks: str = "auto"
    device: str = "auto"
    accumulate_dtype: str = "float32"
    block_rows: int | None = None
    top_k: int = 100
    query_sets: tuple[str, ...] | None = None
    save_embeddings: bool = True
    self_influence: bool = False
    propagation: str = "auto"
    second_moment: bool = True
    projected_preconditioner: str = "kronecker"
    segments: int = 1
    embeddings_dtype: str = "auto"
    removal: str = "auto"
    second_moment_lifted: bool | None = None

    def __post_init__(self) -> None:
        checks = [
            ("curvature", self.curvature, (None, "empirical", "ggn")),
            ("blocks", self.blocks, ("auto", "layer", "full")),
            ("device", self.device, ("auto", "cpu", "cuda")),
            ("accumulate_dtype", self.accumulate_dtype, ("float32", "float64")),
            ("propagation", self.propagation, ("auto", "optimizer", "sgd-proxy")),
            ("projected_preconditioner", self.projected_preconditioner, ("kronecker", "scalar")),
            ("embeddings_dtype", self.embeddings_dtype, ("auto", "float32", "float16")),
            ("removal", self.removal, REMOVALS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        if self.second_moment_lifted not in (None, True, False):
            raise ConfigError(f"second_moment_lifted={self.second_moment_lifted!r} is not one of None, True, False")
        if (self.block_rows is not None and self.block_rows < 1) or self.top_k < 1 or self.segments < 1:
            raise ConfigError("block_rows, top_k and segments must be at least 1")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")


@dataclass(frozen=True)
class ComputeProgress:
    """Where a computation stands (steps are counted backwards from the end of training)."""

    steps_done: int
    total_steps: int
    current_step: int | None  # None where work is not one backward pass (a segmented job counts segments)
    elapsed_s: float
    eta_s: float | None

    @property
    def fraction(self) -> float:
        """Share of steps processed, 0 to 1."""
        return self.steps_done / max(self.total_steps, 1)


ProgressCallback = Callable[[ComputeProgress], None]


@dataclass
class _QueryScores:
    """Aggregates of one query set."""

    queries: QuerySet
    matrix: torch.Tensor  # (Q, D)
    helpful: RunningTopK
    harmful: RunningTopK
    set_helpful: RunningTopK
    set_harmful: RunningTopK
    totals: np.memmap | None = None  # (N, Q) float64, the results file itself
    step_mean: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (T,) mean of the set-mean score
    step_abs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (T,) sum of |set-mean score|
    scores: np.memmap | None = None  # (R, Q) float32
    curves: np.memmap | None = None  # (T, Q) float32: per-query mean score of the step's rows
    # Score rows not yet added to ``totals``: (example indices (n,), scores (n, Q)) per chunk. They are
    # added when the state is saved, with the new rows stored in the checkpoint, so a resume re-applies
    # them idempotently (``totals[rows] = values``) instead of adding twice.
    pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def _fingerprint(log: GradientLog, args: ComputeArguments) -> str:
    # The log's digest covers its shard list: a log still being recorded grows in its index, not its manifest.
    payload = log.digest().encode() + json.dumps(asdict(args), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


def _device(args: ComputeArguments) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


class _Run:
    """One computation: the log, the options, the state, the output directory."""

    def __init__(self, log: GradientLog, out: Path, args: ComputeArguments, progress: ProgressCallback | None) -> None:
        self.log, self.out, self.args, self.progress = log, out, args, progress
        self.device = _device(args)
        self.dtype = torch.float64 if args.accumulate_dtype == "float64" else torch.float32
        self.mode = args.curvature or log.curvature_mode
        if self.mode == "ggn" and log.curvature_mode != "ggn":
            raise ConfigError("curvature='ggn' needs a log recorded with curvature='ggn'; this log is empirical")
        self.propagation = _propagation(log, args)
        self.fingerprint = _fingerprint(log, args)
        self.embedder = make_embedder(log, args, self.mode, self.propagation)
        # Adam's second-moment term of small projected layers, over their own coordinates (not in segments).
        self.lifts_second_moment: bool | None = args.second_moment_lifted
        self.removal = resolve_removal(args.removal, log)
        self.blocks, self.total_dim = self.embedder.blocks, self.embedder.total_dim
        self.num_steps = log.num_steps
        self._index()
        self.scorers = {name: self._scorer(name) for name in self._query_set_names()}
        self.embeddings: np.memmap | None = None
        self.self_influence: np.memmap | None = None
        # Totals rows of the checkpoint being resumed, applied again once the arrays are open.
        self._replay: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.step_lr = self.step_batch = self.step_loss = torch.zeros(
            0
        )  # (T,) views of a scratch file, see _open_arrays

    # -- set-up -----------------------------------------------------------------------------------

    def _index(self) -> None:
        """Occurrence table: step, example index and epoch of every row, in chronological order.

        Kept in memory-mapped scratch files (rebuilt on every start), so memory holds only the table of
        distinct example ids and a per-example counter, whatever the run's length.
        """
        scratch = self.out / SCRATCH_DIR
        scratch.mkdir(parents=True, exist_ok=True)
        num_rows = [self.log.num_rows(i) for i in range(self.log.num_shards())]
        self.shard_offsets = np.cumsum([0, *num_rows]).tolist()
        rows = int(self.shard_offsets[-1])
        arrays = {name: open_array(scratch / f"{name}.npy", (rows,), np.int64, resume=False) for name in _INDEX}
        table: dict[Any, int] = {}
        seen = np.zeros(0, dtype=np.int64)  # occurrences so far of each example
        for index in range(self.log.num_shards()):
            row_step, shard_ids = self.log.read_index(index)
            lo, n = int(self.shard_offsets[index]), len(shard_ids)
            ex = np.fromiter((table.setdefault(i, len(table)) for i in shard_ids), dtype=np.int64, count=n)
            if len(table) > len(seen):
                seen = np.concatenate([seen, np.zeros(max(len(table), 2 * len(seen)) - len(seen), dtype=np.int64)])
            # An example's epoch counts its earlier occurrences, including earlier ones in this shard.
            order = np.argsort(ex, kind="stable")
            sorted_ex = ex[order]
            starts = np.flatnonzero(np.r_[True, np.diff(sorted_ex) != 0]) if n else np.zeros(0, dtype=np.int64)
            within = np.empty(n, dtype=np.int64)
            within[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
            arrays["row_step"][lo : lo + n] = row_step.numpy()
            arrays["example_index"][lo : lo + n] = ex
            arrays["epoch"][lo : lo + n] = seen[ex] + within
            np.add.at(seen, ex, 1)
        self.index_arrays = arrays
        self.row_step = torch.from_numpy(arrays["row_step"])
        self.example_index = torch.from_numpy(arrays["example_index"])
        self.epoch = torch.from_numpy(arrays["epoch"])
        self.example_ids: list[Any] = list(table)

    def _query_set_names(self) -> list[str]:
        """The query sets to score: recorded at the end of training (earlier ones feed value dynamics)."""
        available = self.log.query_set_names()
        finals = final_query_sets(self.log)
        wanted = list(self.args.query_sets) if self.args.query_sets is not None else finals
        missing = [name for name in wanted if name not in available]
        if missing:
            raise ConfigError(f"query set(s) {missing} are not in the log, which has {available}")
        early = [name for name in wanted if name not in finals]
        if early:
            raise ConfigError(
                f"query set(s) {early} were recorded before the end of training: their influence is in the value "
                "dynamics (dynamics-*.safetensors), not in the scores; leave them out of query_sets"
            )
        return wanted

    def _scorer(self, name: str) -> _QueryScores:
        queries = self.log.load_query_set(name)
        matrix = torch.cat([queries.grads[layer.name] for layer in self.log.layers], dim=1)  # (Q, D)
        q = matrix.shape[0]
        k = self.args.top_k
        return _QueryScores(
            queries=queries,
            matrix=matrix.to(self.device, self.dtype),
            helpful=RunningTopK(q, k, largest=True),
            harmful=RunningTopK(q, k, largest=False),
            set_helpful=RunningTopK(1, k, largest=True),
            set_harmful=RunningTopK(1, k, largest=False),
        )

    # -- files ------------------------------------------------------------------------------------

    def _open_arrays(self, resume: bool) -> None:
        rows = len(self.row_step)
        mode = "r+" if resume else "w+"

        def array(name: str, shape: tuple[int, ...], dtype: Any = None) -> np.memmap:
            path = self.out / name
            if resume:
                return np.load(path, mmap_mode="r+")  # type: ignore[no-any-return]
            # float64 accumulation keeps float64 files: the exactness tests read them at 1e-10.
            dtype = dtype or (np.float64 if self.dtype == torch.float64 else np.float32)
            return np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape)

        if self.args.save_embeddings:
            stored = None if self.args.embeddings_dtype == "auto" else np.dtype(self.args.embeddings_dtype)
            self.embeddings = array(formats.EMBEDDINGS, (rows, self.total_dim), stored)
        if self.args.self_influence:
            self.self_influence = array(formats.SELF_INFLUENCE, (rows,))
        scratch = self.out / SCRATCH_DIR
        # Per-step values live in scratch files too: assigned per step, so a resume just continues.
        steps = open_array(scratch / "steps.npy", (3, self.num_steps), np.float64, resume=resume)
        if not resume:
            steps[2] = np.nan  # loss of steps not logged
        self.step_arrays = [steps]
        self.step_lr, self.step_batch, self.step_loss = (torch.from_numpy(steps[i]) for i in range(3))
        for name, scorer in self.scorers.items():
            q = scorer.matrix.shape[0]
            scorer.scores = array(formats.scores_file(name), (rows, q))
            scorer.curves = array(formats.curves_file(name), (self.num_steps, q))
            totals = self.out / formats.totals_file(name)
            scorer.totals = open_array(totals, (len(self.example_ids), q), np.float64, resume=resume)
            per_step = open_array(scratch / f"steps-{name}.npy", (2, self.num_steps), np.float64, resume=resume)
            self.step_arrays.append(per_step)
            scorer.step_mean, scorer.step_abs = torch.from_numpy(per_step[0]), torch.from_numpy(per_step[1])

    def _flush_arrays(self) -> None:
        for array in [
            self.embeddings,
            *(s.scores for s in self.scorers.values()),
            *(s.curves for s in self.scorers.values()),
            *(s.totals for s in self.scorers.values()),
            *self.step_arrays,
        ]:
            if array is not None:
                array.flush()

    def _settle_totals(self, s: _QueryScores) -> tuple[torch.Tensor, torch.Tensor]:
        """The totals rows touched since the last call and their new values, (m,) and (m, Q)."""
        assert s.totals is not None
        q = s.totals.shape[1]
        if not s.pending:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, q, dtype=torch.float64)
        ex = np.concatenate([e for e, _ in s.pending])
        scores = np.concatenate([v for _, v in s.pending])
        s.pending.clear()
        rows, inverse = np.unique(ex, return_inverse=True)
        values = np.array(s.totals[rows])  # (m, Q)
        np.add.at(values, inverse, scores)
        return torch.from_numpy(rows), torch.from_numpy(values)

    @staticmethod
    def _apply_totals(s: _QueryScores, rows: torch.Tensor, values: torch.Tensor) -> None:
        assert s.totals is not None
        s.totals[rows.numpy()] = values.numpy()

    def _save_checkpoint(self, next_shard: int) -> None:
        """Save what a resume needs: the recursion, the top-k and the totals rows of the last shard.

        Its size does not grow with the run: per-step and per-example arrays are files of their own,
        flushed here, and the totals' new rows are applied only after the checkpoint holds them.
        """
        state: dict[str, torch.Tensor] = dict(self.embedder.state())
        settled = {}
        for name, s in self.scorers.items():
            for part in ("helpful", "harmful", "set_helpful", "set_harmful"):
                state.update(getattr(s, part).state(f"{name}.{part}"))
            settled[name] = self._settle_totals(s)
            state[f"{name}.totals_rows"], state[f"{name}.totals_values"] = settled[name]
        self._flush_arrays()
        meta = {"fingerprint": self.fingerprint, "next_shard": str(next_shard)}
        with replacing(self.out / formats.CHECKPOINT) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        for name, s in self.scorers.items():
            self._apply_totals(s, *settled[name])

    def _load_checkpoint(self) -> int | None:
        """The shard to continue from, after restoring the state; None when there is nothing to resume."""
        path = self.out / formats.CHECKPOINT
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != self.fingerprint:
            return None
        state = load_file(str(path))
        if any(f"{name}.totals_rows" not in state for name in self.scorers):
            return None  # a checkpoint of an older dvemb: start again
        self.embedder.load_state(state)
        for name, s in self.scorers.items():
            for part in ("helpful", "harmful", "set_helpful", "set_harmful"):
                getattr(s, part).load(f"{name}.{part}", state)
        self._replay = {name: (state[f"{name}.totals_rows"], state[f"{name}.totals_values"]) for name in self.scorers}
        return int(meta["next_shard"])

    # -- the backward pass ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        resume_from = self._load_checkpoint()
        self._open_arrays(resume=resume_from is not None)
        for name, (rows, values) in self._replay.items():
            self._apply_totals(self.scorers[name], rows, values)  # the checkpoint's totals rows, again
        if resume_from is None:
            self._write_index()
            resume_from = self.log.num_shards() - 1
            self._save_checkpoint(resume_from)
        done_steps = self.num_steps - (
            (self.log.info.shards or ())[resume_from].last_step + 1 if resume_from >= 0 else 0
        )
        for index in range(resume_from, -1, -1):
            shard = self.log.read_shard(index)
            self._process_shard(shard, self.shard_offsets[index])
            self._save_checkpoint(index - 1)
            done_steps += len(shard.steps)
            self._report(done_steps, int(shard.steps[0]), started)
        summary = self._finish(time.monotonic() - started)
        (self.out / formats.CHECKPOINT).unlink(missing_ok=True)
        return summary

    def _report(self, done: int, current: int, started: float) -> None:
        if self.progress is None:
            return
        elapsed = time.monotonic() - started
        eta = elapsed / done * (self.num_steps - done) if done else None
        self.progress(ComputeProgress(done, self.num_steps, current, elapsed, eta))

    def _process_shard(self, shard: ShardData, row_offset: int) -> None:
        self.step_lr[shard.steps], self.step_batch[shard.steps] = shard.lr[:, 0], shard.batch_size.double()
        self.step_loss[shard.steps] = shard.loss
        for s0, s1, r0, r1 in self.embedder.chunks(shard):
            # With query sets the scores are checked, not the embeddings (non-finite either way, 100x fewer numbers).
            embedding = self.embedder.embed(shard, s0, s1, r0, r1, check_finite=not self.scorers)[0]  # (n, D)
            rows = slice(row_offset + r0, row_offset + r1)
            for scorer in self.scorers.values():
                scores = (embedding @ scorer.matrix.T).double().cpu()  # (n, Q): positive = the example helped
                if not bool(torch.isfinite(scores).all()):
                    raise non_finite(int(shard.steps[s0]), int(shard.steps[s1 - 1]))
                self._score_rows(
                    scorer, scores, torch.arange(rows.start, rows.stop), shard.row_step[r0:r1], shard.steps[s0:s1]
                )
            if self.removal == "batch":
                position = (shard.row_step[r0:r1] - shard.steps[s0]).to(embedding.device)
                embedding = centre_steps(embedding, position, s1 - s0)
            if self.embeddings is not None:
                half = self.embeddings.dtype == np.float16  # torch casts to float16 5x faster than numpy
                self.embeddings[rows] = (embedding.half() if half else embedding).cpu().numpy()
            if self.self_influence is not None:
                own = torch.cat([shard.grads[layer.name][r0:r1] for layer in self.log.layers], 1)  # (n, D)
                own = own.to(self.device, self.dtype)
                self.self_influence[rows] = (embedding * own).sum(1).cpu().numpy()

    def _score_rows(
        self, s: _QueryScores, scores: torch.Tensor, rows: torch.Tensor, row_steps: torch.Tensor, steps: torch.Tensor
    ) -> None:
        """Fold the (n, Q) float64 scores of rows ``rows`` (whole steps ``steps``) into the aggregates.

        ``scores`` are those of the ``"weight"`` removal: the per-step curves (each step's data as a whole) come
        from them; the occurrences' scores, tops and totals follow ``self.removal`` (:mod:`dvemb.engine.removal`).
        """
        assert s.scores is not None
        assert s.curves is not None
        position = row_steps - steps[0]  # (n,) step within the chunk
        count = torch.bincount(position, minlength=len(steps)).double().clamp_min(1).unsqueeze(1)
        per_query = torch.zeros(len(steps), scores.shape[1], dtype=torch.float64).index_add_(0, position, scores)
        s.curves[int(steps[0]) : int(steps[-1]) + 1] = (per_query / count).numpy()
        s.step_mean[steps] = (per_query.mean(1, keepdim=True) / count).squeeze(1)
        if self.removal == "batch":
            scores = centre_steps(scores, position, len(steps))
        set_scores = scores.mean(1, keepdim=True)  # (n, 1)
        s.scores[int(rows[0]) : int(rows[-1]) + 1] = scores.numpy()
        s.helpful.update(scores, rows)
        s.harmful.update(scores, rows)
        s.set_helpful.update(set_scores, rows)
        s.set_harmful.update(set_scores, rows)
        s.pending.append((self.example_index[rows].numpy(), scores.numpy()))
        s.step_abs[steps] = torch.zeros(len(steps), dtype=torch.float64).index_add_(0, position, set_scores.abs()[:, 0])

    # -- results ----------------------------------------------------------------------------------

    def _write_index(self) -> None:
        save_safetensors(self.out / formats.OCCURRENCES, {name: self.index_arrays[name] for name in _INDEX})
        save_file(
            fmt.encode_ids(self.example_ids) if self.example_ids else {"example_id": torch.zeros(0, dtype=torch.int64)},
            str(self.out / formats.EXAMPLES),
        )

    def _topk_table(self, s: _QueryScores) -> dict[str, torch.Tensor]:
        parts = []
        for kind, (per_query, per_set) in enumerate([(s.helpful, s.set_helpful), (s.harmful, s.set_harmful)]):
            for query, top in [(q, per_query) for q in range(per_query.values.shape[0])] + [(-1, per_set)]:
                row = 0 if query == -1 else query
                values, rows = top.values[row], top.rows[row]
                n = len(values)
                parts.append(
                    {
                        "query": torch.full((n,), query),
                        "kind": torch.full((n,), kind),
                        "rank": torch.arange(n),
                        "score": values,
                        "row": rows,
                    }
                )
        table = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        table["step"] = self.row_step[table["row"]]
        table["example_index"] = self.example_index[table["row"]]
        table["epoch"] = self.epoch[table["row"]]
        return table

    def _finish(self, seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        for s in self.scorers.values():
            self._apply_totals(s, *self._settle_totals(s))
        self._flush_arrays()
        lr, batch, loss = self.step_lr.clone(), self.step_batch.long(), self.step_loss.clone()
        query_summaries = {}
        for name, s in self.scorers.items():
            save_file(self._topk_table(s), str(self.out / formats.topk_file(name)))
            per_lr = (s.step_mean / torch.where(lr > 0, lr, torch.inf)).numpy()
            save_file(
                {
                    "step": torch.arange(self.num_steps),
                    "lr": lr,
                    "batch_size": batch,
                    "loss": loss,
                    "mean": s.step_mean.clone(),
                    "mean_per_lr": torch.from_numpy(per_lr),
                    "abs_sum": s.step_abs.clone(),
                },
                str(self.out / formats.curve_file(name)),
            )
            phases = find_phases(per_lr, s.step_abs.numpy(), lr.numpy())
            query_summaries[name] = {
                "num_queries": int(s.matrix.shape[0]),
                "query_ids": s.queries.ids,
                "phases": phases.to_dict(),
                "mean_influence": float(s.step_mean.mean()) if self.num_steps else 0.0,
            }
        optimizer = self.log.info.optimizer
        proxy = self.propagation == "proxy"
        note = _propagation_note(self.log, self.propagation)
        approximated = approximations(
            self.log.info.to_json(),
            curvature=self.mode,
            propagation=self.propagation,
            blocks=self.blocks,
            second_moment=self.args.second_moment,
            proxy_note=note,
            lifted=self.lifts_second_moment,
        )
        summary = {
            "format": "dvemb-results",
            "version": RESULTS_VERSION,
            "fingerprint": self.fingerprint,
            "log": str(self.log.directory),
            "log_complete": self.log.complete,
            "steps": self.num_steps,
            "occurrences": len(self.row_step),
            "examples": len(self.example_ids),
            "layers": [{"name": layer.name, "dim": layer.dim} for layer in self.log.layers],
            "curvature": self.mode,
            "blocks": self.blocks,
            "removal": self.removal,
            "arguments": asdict(self.args),
            "device": str(self.device),
            "optimizer": optimizer.get("type"),
            "propagation": self.propagation,
            "propagation_label": PROPAGATIONS[self.propagation],
            "sgd_proxy": proxy,
            "note": note,
            "approximations": [a.to_json() for a in approximated],
            "tracked_share": tracked_share(self.log.manifest),
            "query_sets": query_summaries,
            "seconds": seconds,
            "segments": 1,
            "dynamics": {},
            **(extra or {}),
        }
        write_json_atomic(self.out / formats.SUMMARY, summary)
        shutil.rmtree(self.out / SCRATCH_DIR, ignore_errors=True)
        return summary


def _check_out_dir(log_dir: Path, out: Path) -> None:
    """Results never go where they could replace the log: not the log directory, nor a folder that holds
    it (``overwrite`` empties the results directory), nor any directory that holds a gradient log."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a directory for the results (it is created if missing)")
    log_path, out_path = log_dir.resolve(), out.resolve()
    if out_path == log_path or out_path in log_path.parents or (out_path / formats.MANIFEST).exists():
        raise ConfigError(
            f"--out {out} is (or holds) a gradient log; results would overwrite it: choose a separate directory, "
            f"e.g. {log_dir.name}-results"
        )


def make_embedder(
    log: GradientLog, args: ComputeArguments, mode: str, propagation: str, *, seeded: bool = False
) -> Embedder:
    """The embedder of a computation with these options (``mode`` and ``propagation`` resolved)."""
    total_dim = sum(layer.dim for layer in log.layers)
    blocks = resolve_blocks(args.blocks, log, total_dim)
    width = total_dim if blocks == "full" else max((layer.dim for layer in log.layers), default=1)
    return Embedder(
        log,
        mode=mode,
        propagation=propagation,
        blocks=blocks,
        dtype=torch.float64 if args.accumulate_dtype == "float64" else torch.float32,
        device=_device(args),
        block_rows=args.block_rows or default_block_rows(width),
        second_moment=args.second_moment,
        projected_preconditioner=args.projected_preconditioner,
        seeded=seeded,
        lift_second_moment=args.second_moment_lifted,
    )


def _propagation(log: GradientLog, args: ComputeArguments) -> str:
    """The propagation this computation uses (a key of :data:`dvemb.optim.PROPAGATIONS`)."""
    native = log.propagation
    if args.propagation == "sgd-proxy":
        return "sgd" if native == "sgd" else "proxy"
    if args.propagation == "optimizer" and native == "proxy":
        raise ConfigError(
            f"propagation='optimizer': this log cannot be propagated exactly ({_propagation_note(log, native)}); "
            "use propagation='auto' to accept the SGD proxy"
        )
    return native


def _propagation_note(log: GradientLog, propagation: str) -> str | None:
    """Why the SGD proxy is used, or None when influence follows the optimizer."""
    if propagation != "proxy":
        return None
    optimizer = log.info.optimizer
    kind = optimizer.get("type")
    if log.propagation != "proxy":
        why = "propagation='sgd-proxy' was asked for"
    elif log.info.version < 2:
        why = "the log is format version 1, which records no optimizer state (re-record it with this dvemb)"
    else:
        why = optimizer.get("proxy_reason") or f"{kind} is not modelled"
    return f"{kind} was used and influence follows the SGD proxy because {why}: scores are approximate"


def compute(
    log_dir: str | Path,
    out_dir: str | Path,
    arguments: ComputeArguments | None = None,
    *,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Compute data value embeddings, scores and phases of a gradient log.

    Resumes from a checkpoint in ``out_dir`` left by an interrupted run with the same log and
    arguments; returns the existing summary if the same computation already finished there.

    Args:
        log_dir: the gradient log.
        out_dir: where results go (see docs/results.md).
        arguments: options; defaults to :class:`ComputeArguments()`.
        progress: called after every shard with a :class:`ComputeProgress`.
        overwrite: replace results of a different computation already in ``out_dir``.
        workers: processes that run the segments of a segmented computation (``arguments.segments > 1``,
            or a log with checkpoint query sets); one runs them in this process.

    Returns:
        The summary written to ``summary.json``.
    """
    args = arguments or ComputeArguments()
    log = open_log(log_dir)
    out = Path(out_dir)
    finished = prepare_out(log, out, args, overwrite=overwrite)
    if finished is not None:
        return finished
    if is_segmented(log, args):
        from dvemb.engine.segmented import compute_segmented  # it imports this module

        return compute_segmented(log.directory, out, args, progress=progress, workers=workers)
    return _Run(log, out, args, progress).run()


def is_segmented(log: GradientLog, args: ComputeArguments) -> bool:
    """True when the computation runs in segments: asked for, or needed for the log's checkpoint query sets."""
    return args.segments > 1 or bool(checkpoint_series(log))


def prepare_out(
    log: GradientLog, out: Path, args: ComputeArguments, *, overwrite: bool = False
) -> dict[str, Any] | None:
    """Make ``out`` ready for this computation; the summary when the same computation already finished there.

    Raises:
        ConfigError: ``out`` is (or holds) the log, or holds results of another computation and not ``overwrite``.
    """
    _check_out_dir(log.directory, out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(log, args)
    summary_path = out / formats.SUMMARY
    if summary_path.exists():
        existing = json.loads(summary_path.read_text())
        if existing.get("fingerprint") == fingerprint:
            return existing  # type: ignore[no-any-return]
        if not overwrite:
            raise ConfigError(
                f"{out} holds results of another computation; choose a new directory "
                "or pass overwrite=True (--overwrite)"
            )
    if overwrite and (summary_path.exists() or (out / formats.CHECKPOINT).exists()):
        shutil.rmtree(out)
        out.mkdir(parents=True)
    summary_path.unlink(missing_ok=True)
    return None
