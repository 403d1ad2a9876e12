"""Exact replay: the first-order influence of every training occurrence on a few queries, by reverse mode.

A forward pass replays training and keeps the state (parameters and optimizer state) every ``N`` steps; the
adjoint pass goes backwards segment by segment, recomputing the states inside a segment from its checkpoint,
and at every step pulls the queries' sensitivities ``lambda`` back through the step's exact derivative
(docs/replay.md): one vector-Jacobian product through the optimizer's update (:mod:`dvemb.replay.optimizers`)
gives the sensitivity of the step's gradient ``u``, then one double-backward product per micro-batch gives the
Hessian-vector product ``H u`` and every example's score ``-d J / d w_z = -u . g_z / B`` at once. Memory: about
``T / N + N`` states (``N = ceil(sqrt(T))`` by default) plus ``K`` sensitivities.

Implementations: :class:`Replayer` (forward, checkpoints, adjoint); :class:`ReplayArguments` (options).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvemb.errors import ConfigError
from dvemb.replay.adjoint import Puller, step_adjoint
from dvemb.replay.files import rows_digest
from dvemb.replay.optimizers import FunctionalOptimizer, OptimizerState
from dvemb.replay.resume import WorkDirectory, fingerprint
from dvemb.replay.schedule import ReplaySchedule
from dvemb.replay.training import Examples, LossFn, TrainingStep, check_replayable

__all__ = ["QUERY_COLUMNS", "REMOVALS", "ReplayArguments", "Replayer", "TrainState"]

#: What removing an occurrence means; ``"auto"``: ``"batch"`` for a mean-reduced loss, ``"weight"`` for a sum
#: (as ``dvemb.engine.ComputeArguments.removal``).
REMOVALS = ("auto", "batch", "weight")
#: ``"mean"``: one query, the mean loss over every query example; ``"each"``: one query per query example.
QUERY_COLUMNS = ("mean", "each")


#: ``ReplayArguments.autocast`` names and their dtypes.
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ReplayArguments:
    """Options of a replay.

    Attributes:
        removal: ``"auto"``, ``"batch"`` (the example leaves its batch: gradient change ``-(g_z - g_B)/(B-1)``) or
            ``"weight"`` (its weight becomes 0: ``-g_z/B`` for a mean, ``-g_z`` for a sum).
        checkpoint_every: steps between kept states; None: ``ceil(sqrt(T))`` (memory about ``2 sqrt(T)``
            states); 1 keeps every state and recomputes nothing.
        micro_batches: parts each step is evaluated in (gradient accumulation; memory of one part).
        query_columns: ``"mean"`` (one query: the mean loss of all query examples) or ``"each"`` (one per example).
        max_queries: refuse more query columns than this (each costs one Hessian-vector product per step).
        probe: occurrences whose removal is retrained at ``probe_scales`` of its weight (the linearity probe;
            each costs ``len(probe_scales)`` retrainings of the tail of the run); 0: no probe.
        probe_scales: multiples of the removal that the probe retrains with.
        seed: chooses the probed occurrences.
        autocast: ``"bfloat16"`` or ``"float16"``: every loss (training steps, queries, probe) is evaluated under
            ``torch.autocast`` of that dtype on the parameters' device, as a run trained with mixed precision
            evaluated it, so that the replay follows the recorded run (its derivatives are then taken through the
            same low-precision operations); None (default): in the parameters' dtype.
    """

    removal: str = "auto"
    checkpoint_every: int | None = None
    micro_batches: int = 1
    query_columns: str = "mean"
    max_queries: int = 64
    probe: int = 0
    probe_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    seed: int = 0
    autocast: str | None = None

    def __post_init__(self) -> None:
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ConfigError(
                f"autocast={self.autocast!r}: use one of {sorted(AUTOCAST_DTYPES)} (the run's mixed-precision dtype), "
                "or None for the parameters' own dtype"
            )
        if self.removal not in REMOVALS:
            raise ConfigError(f"removal={self.removal!r} is not one of {REMOVALS}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every}: use 1 or more (None: sqrt of the steps)")
        if self.micro_batches < 1:
            raise ConfigError(f"micro_batches={self.micro_batches}: use 1 or more")
        if self.query_columns not in QUERY_COLUMNS:
            raise ConfigError(f"query_columns={self.query_columns!r} is not one of {QUERY_COLUMNS}")
        if self.max_queries < 1 or self.probe < 0:
            raise ConfigError("max_queries must be at least 1 and probe at least 0")
        if not self.probe_scales or 1.0 not in self.probe_scales or any(s <= 0 for s in self.probe_scales):
            raise ConfigError(f"probe_scales={self.probe_scales}: positive multiples, 1.0 among them")


def checkpoint_spacing(steps: int, asked: int | None = None) -> int:
    """Steps between kept states: ``asked``, or ``ceil(sqrt(steps))`` (memory about ``2 sqrt(steps)`` states)."""
    return asked or max(1, math.ceil(math.sqrt(steps)))


@dataclass(frozen=True)
class TrainState:
    """The state entering a step: the trained parameters and the optimizer's state."""

    params: tuple[torch.Tensor, ...]
    optimizer: OptimizerState

    def copy(self) -> TrainState:
        """A copy in tensors of its own."""
        return TrainState(
            tuple(p.clone() for p in self.params), self.optimizer.with_flat([t.clone() for t in self.optimizer.flat()])
        )

    def copy_into(self, into: TrainState) -> TrainState:
        """This state written into ``into``'s tensors (same shapes; no new memory, whose first touch costs as much
        as an optimizer step on this machine); the filled state."""
        with torch.no_grad():
            for mine, theirs in zip(
                (*self.params, *self.optimizer.flat()), (*into.params, *into.optimizer.flat()), strict=True
            ):
                theirs.copy_(mine)
        return TrainState(into.params, into.optimizer.with_flat(into.optimizer.flat(), self.optimizer.counts))


@dataclass
class Timings:
    """Seconds spent in each pass: wall time, and this process's CPU time (``*_cpu``: what a cost ratio on a shared
    machine is taken from, since other processes' load does not count in it)."""

    forward: float = 0.0
    adjoint: float = 0.0
    probe: float = 0.0
    forward_cpu: float = 0.0
    adjoint_cpu: float = 0.0
    steps_replayed: int = 0


class Replayer:
    """Replays a recorded training run and carries queries backwards through it.

    Args:
        model: the model at initialisation (its current parameters are the run's initial weights).
        optimizer: the run's optimizer in its initial state (SGD, Adam or AdamW; its hyperparameters and state
            are read, it is never stepped). Its parameters requiring grad are the trained ones.
        schedule: the order, ids and rates (:func:`dvemb.replay.schedule_from_log`).
        loss_fn, examples: the step as a function (:mod:`dvemb.replay.training`).
        queries: query batches for ``loss_fn`` (each gives per-example losses).
        arguments: options.
        work_dir: where checkpoints and finished adjoint segments are kept (resuming); None: memory only.
        on_saved: called with each file written to ``work_dir`` (:class:`dvemb.replay.resume.WorkDirectory`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: ReplaySchedule,
        loss_fn: LossFn,
        examples: Examples,
        queries: Sequence[Any],
        arguments: ReplayArguments | None = None,
        *,
        work_dir: str | Path | None = None,
        on_saved: Callable[[Path], None] | None = None,
    ) -> None:
        self.arguments = arguments or ReplayArguments()
        check_replayable(model)
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in in_optimizer]
        if not named:
            raise ConfigError("the optimizer trains none of the model's parameters")
        self.names = [n for n, _ in named]
        self.optimizer, initial = FunctionalOptimizer.from_torch(optimizer, [p for _, p in named])
        self.groups = len(optimizer.param_groups)
        self.initial = TrainState(tuple(p.detach().clone() for _, p in named), initial)
        self.schedule = schedule
        self.step = TrainingStep(
            model,
            self.names,
            loss_fn,
            examples,
            reduction=schedule.loss_reduction,
            micro_batches=self.arguments.micro_batches,
            autocast=AUTOCAST_DTYPES.get(self.arguments.autocast or ""),
        )
        self.queries = list(queries)
        if not self.queries:
            raise ConfigError("no query batches: pass at least one")
        self.removal = self.arguments.removal
        if self.removal == "auto":
            self.removal = "batch" if schedule.loss_reduction == "mean" else "weight"
        T = schedule.num_steps
        self.every = checkpoint_spacing(T, self.arguments.checkpoint_every)
        self.checkpoints: dict[int, TrainState] = {}
        self.final: TrainState | None = None
        self.losses: list[float] = []
        self.timings = Timings()
        self.pull = Puller()
        self.work = None if work_dir is None else WorkDirectory(work_dir, self._fingerprint(), on_saved)

    def _fingerprint(self) -> str:
        """What makes this replay's numbers: schedule, options, update rules, initial state and queries."""
        row_step, ids = self.schedule.rows()
        with torch.no_grad():
            query_losses = self.query_losses(self.initial.params)
        parts = {
            "rows": rows_digest(row_step.tolist(), ids),
            "lrs": [list(map(float, r)) for r in self.schedule.lrs],
            "reduction": self.schedule.loss_reduction,
            "every": self.every,
            "micro_batches": self.arguments.micro_batches,
            "query_columns": self.arguments.query_columns,
            "autocast": self.arguments.autocast,
            "optimizer": [repr(x) for x in self.optimizer.settings],
            "counts": list(self.initial.optimizer.counts),
        }
        return fingerprint(parts, [*self.initial.params, *self.initial.optimizer.flat(), query_losses])

    # -- forward ---------------------------------------------------------------------------------------------

    def advance(self, state: TrainState, t: int, weights: torch.Tensor | None = None) -> tuple[TrainState, float]:
        """The state after step ``t`` (examples weighted by ``weights``, (B,), default 1) and the step's loss."""
        grads, loss = self.step.gradient(state.params, list(self.schedule.step_ids[t]), weights)
        params, opt = self.optimizer.step_no_grad(
            state.params, grads, state.optimizer, self.schedule.group_lrs(t, self.groups)
        )
        self.timings.steps_replayed += 1
        return TrainState(tuple(params), opt), loss

    def advance_in_place(self, state: TrainState, t: int) -> tuple[TrainState, float]:
        """:meth:`advance` written into ``state``'s own tensors (as training does: no new memory per step)."""
        grads, loss = self.step.gradient(state.params, list(self.schedule.step_ids[t]))
        opt = self.optimizer.step_in_place(
            state.params, grads, state.optimizer, self.schedule.group_lrs(t, self.groups)
        )
        self.timings.steps_replayed += 1
        return TrainState(state.params, opt), loss

    def forward(self) -> TrainState:
        """Replay the whole run, keeping a checkpoint every ``checkpoint_every`` steps; the final state.

        With a work directory the checkpoints are also written there, and a forward pass found there (whole, or up
        to its last checkpoint) is read back instead of replayed.
        """
        started, cpu_started = time.perf_counter(), time.process_time()
        state, self.losses, first = self.initial, [], 0
        if self.work is not None:
            first, state = self._resume_forward(self.work)
            if self.final is not None:
                return self.final
        # One working state updated in place, as training updates its own; the checkpoints are copies of it.
        state = state.copy()
        for t in range(first, self.schedule.num_steps):
            if t % self.every == 0:
                self.checkpoints[t] = state.copy()
                if self.work is not None and (t > first or t == 0):
                    self.work.save_state(t, state.params, state.optimizer, self.losses)
            state, loss = self.advance_in_place(state, t)
            self.losses.append(loss)
        self.final = state
        if self.work is not None:
            self.work.save_state(None, state.params, state.optimizer, self.losses)
        self.timings.forward += time.perf_counter() - started
        self.timings.forward_cpu += time.process_time() - cpu_started
        return state

    def _resume_forward(self, work: WorkDirectory) -> tuple[int, TrainState]:
        """Read the kept checkpoints back; ``(first step to replay, its state)``; sets ``final`` when complete."""
        like = (self.initial.params, self.initial.optimizer)
        first, state = 0, self.initial
        for t in range(0, self.schedule.num_steps, self.every):
            kept = work.load_state(t, like)
            if kept is None:
                break
            state = TrainState(kept[0], kept[1])
            self.checkpoints[t], self.losses, first = state, kept[2], t
        final = work.load_state(None, like)
        if final is not None and len(self.checkpoints) == len(range(0, self.schedule.num_steps, self.every)):
            self.final, self.losses = TrainState(final[0], final[1]), final[2]
        return first, state

    def state_at(self, t: int) -> TrainState:
        """The state entering step ``t``, recomputed from the checkpoint before it."""
        if self.final is None:
            raise ConfigError("call forward() first")
        if t == self.schedule.num_steps:
            return self.final
        start = t - t % self.every
        state = self.checkpoints[start]
        for k in range(start, t):
            state, _ = self.advance(state, k)
        return state

    def loss_gap(self) -> float | None:
        """Largest ``|replayed - logged| / max(1, |logged|)`` training loss over the logged steps (None: none)."""
        logged = self.schedule.losses
        if logged is None:
            return None
        gaps = [abs(a - b) / max(1.0, abs(b)) for a, b in zip(self.losses, logged, strict=True) if math.isfinite(b)]
        return max(gaps) if gaps else None

    # -- queries ---------------------------------------------------------------------------------------------

    def query_losses(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """(K,) the query columns' losses at ``params`` (differentiable when ``params`` require grad)."""
        per_example = []
        for batch in self.queries:
            losses = self.step.evaluate(params, batch)
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                raise ConfigError("loss_fn must return one loss per query example (reduction='none')")
            per_example.append(losses)
        losses = torch.cat(per_example)
        if self.arguments.query_columns == "mean":
            return losses.mean()[None]
        if len(losses) > self.arguments.max_queries:
            raise ConfigError(
                f"{len(losses)} query examples with query_columns='each' is more than max_queries="
                f"{self.arguments.max_queries}: each costs one Hessian-vector product per step; raise max_queries "
                "or use query_columns='mean'"
            )
        return losses

    def query_gradients(self, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per parameter (K, *shape) the gradient of each query column at ``params``, and the (K,) losses."""
        leaves = [p.detach().requires_grad_(True) for p in params]
        losses = self.query_losses(leaves)
        rows = []
        for k in range(len(losses)):
            grads = torch.autograd.grad(losses[k], leaves, retain_graph=k + 1 < len(losses), allow_unused=True)
            rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)])
        return [torch.stack([row[i] for row in rows]) for i in range(len(leaves))], losses.detach()

    # -- adjoint ---------------------------------------------------------------------------------------------

    def adjoint(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of every occurrence under the ``"weight"`` removal and the queries' final losses.

        Returns:
            (R, K) ``-d J_k / d w_z`` for every occurrence in chronological order (positive: removing the
            occurrence raises query k's loss, it helped), and (K,) the query losses at the final parameters.
        """
        final = self.final if self.final is not None else self.forward()
        started, cpu_started = time.perf_counter(), time.process_time()
        lam_params, final_losses = self.query_gradients(final.params)
        K = len(final_losses)
        lam_slots = [torch.zeros((K, *t.shape), dtype=t.dtype, device=t.device) for t in final.optimizer.flat()]
        sizes = [len(ids) for ids in self.schedule.step_ids]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        scores = torch.zeros(offsets[-1], K, dtype=torch.float64)
        T = self.schedule.num_steps
        segments = list(range(((T - 1) // self.every) * self.every, -1, -self.every))
        done = None if self.work is None else self.work.load_adjoint(len(lam_params) + len(lam_slots))
        if done is not None:  # resume after the last finished segment
            segment, lam, scores = done
            lam = [x.to(final.params[0].device) for x in lam]
            lam_params, lam_slots = lam[: len(lam_params)], lam[len(lam_params) :]
            segments = [s for s in segments if s < segment]
        spare: list[TrainState] = []  # the last segment's recomputed states, whose memory the next one reuses
        for start in segments:
            states = [self.checkpoints[start]]
            for t in range(start, min(start + self.every, T) - 1):
                into = states[-1].copy_into(spare.pop()) if spare else states[-1].copy()
                states.append(self.advance_in_place(into, t)[0])
            for t in range(min(start + self.every, T) - 1, start - 1, -1):
                lam_params, lam_slots, step_scores = self.step_adjoint(states[t - start], t, lam_params, lam_slots)
                scores[offsets[t] : offsets[t + 1]] = step_scores.to(torch.float64)
            spare = states[1:]
            if self.work is not None:
                self.work.save_adjoint(start, [*lam_params, *lam_slots], scores)
        self.timings.adjoint += time.perf_counter() - started
        self.timings.adjoint_cpu += time.process_time() - cpu_started
        return scores, final_losses

    def step_adjoint(
        self, state: TrainState, t: int, lam_params: list[torch.Tensor], lam_slots: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Pull the sensitivities back through step ``t`` (:mod:`dvemb.replay.adjoint`).

        Args:
            state: the state entering step t.
            lam_params: per parameter (K, *shape) ``d J / d theta_{t+1}``.
            lam_slots: per optimizer slot (K, *shape) ``d J / d slot_{t+1}``.

        Returns:
            the same for the state entering step t, and (B, K) ``-d J / d w_z`` of the step's examples.
        """
        ids = list(self.schedule.step_ids[t])
        lam, dw = step_adjoint(
            self.step,
            self.optimizer,
            state.params,
            state.optimizer,
            ids,
            self.schedule.group_lrs(t, self.groups),
            [*lam_params, *lam_slots],
            self.pull,
            t,
        )
        P = len(lam_params)
        return lam[:P], lam[P:], -dw.T
