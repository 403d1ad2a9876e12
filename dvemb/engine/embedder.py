"""Turning a shard's rows into data value embeddings with the backward recursion, chunk by chunk.

:class:`Embedder` owns the recursion state (one ``M`` block per group of equally sized layers, or one
over the concatenated vector) and maps chunks of whole steps to embeddings. The sequential engine
runs one embedder over the whole log; a segment of a segmented computation runs a fresh one over its
steps, with one recursion per *seed* (see :mod:`dvemb.engine.propagators`): the state a segment
starts from is the identity in one slot of the recursion's state and zero in the others, so that the
segment's embeddings and final state are linear pieces the combine step composes exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from dvemb.engine.optimizer_maps import COEFFICIENTS, StepMaps, lift_plan, lifted_size, step_maps
from dvemb.engine.optimizer_recursion import OptimizerRecursion
from dvemb.engine.recursion import BlockedRecursion, Chunk
from dvemb.errors import ConfigError, NumericalError
from dvemb.reader import GradientLog, ShardData

__all__ = [
    "AUTO_FULL_MAX_DIM",
    "OPTIMIZER_PROPAGATIONS",
    "Embedder",
    "Group",
    "Recursion",
    "recursion_state",
    "resolve_blocks",
]

#: ``blocks="auto"`` keeps one full ``M`` up to this total projected dimension (a 64 MiB float32 matrix).
AUTO_FULL_MAX_DIM = 4096
OPTIMIZER_PROPAGATIONS = ("momentum", "adam", "adamw")
#: Slots of the optimizer recursion's state, in the order seeds are numbered.
OPTIMIZER_SLOTS = ("theta", "mom", "vmom")

Recursion = BlockedRecursion | OptimizerRecursion


@dataclass
class Group:
    """Layers sharing one recursion (equal sizes), with one recursion per seed."""

    layers: list[int]
    dim: int
    recursions: list[Recursion]


def recursion_state(recursion: Recursion) -> dict[str, torch.Tensor]:
    """The tensors that make up a recursion's state (for checkpoints and propagators; restored in place)."""
    if isinstance(recursion, OptimizerRecursion):
        return {
            "theta": recursion.theta,
            "mom": recursion.mom,
            "vmom": recursion.vmom,
            **{f"lifted{start}": state for start, state in recursion.lifted.items()},
            **{f"lifted_mom{start}": state for start, state in recursion.lifted_mom.items()},
            "log_scale": recursion.log_scale,
        }
    return {"Mt": recursion.Mt, "log_scale": recursion.log_scale}


def non_finite(first_step: int, last_step: int) -> NumericalError:
    """The error of a non-finite embedding (or score) of steps ``first_step`` to ``last_step``."""
    return NumericalError(
        f"non-finite embedding at steps {first_step} to {last_step}: the learning rate may be too "
        "large for the curvature (the product of (I - lr H) factors overflows), or float16 storage overflowed; "
        "try accumulate_dtype='float64' or re-record with a smaller learning rate or dtype='float32'"
    )


def resolve_blocks(requested: str, log: GradientLog, total_dim: int) -> str:
    """The block structure of ``M`` that a computation uses: ``requested`` unless it is ``"auto"``.

    ``"auto"`` gives ``"full"`` when the whole projected vector is small (``total_dim`` at most
    :data:`AUTO_FULL_MAX_DIM`) and every tracked layer trains in one optimizer setting (the full
    recursion needs one learning rate, weight decay and momentum for the concatenated vector),
    otherwise ``"layer"``.
    """
    if requested != "auto":
        return requested
    if total_dim > AUTO_FULL_MAX_DIM:
        return "layer"
    optimizer = log.info.optimizer
    groups = optimizer.get("param_groups") or []
    used = {int(g) for g in optimizer.get("layer_groups") or range(len(groups))}
    settings = {json.dumps(groups[g], sort_keys=True) for g in used if g < len(groups)}
    return "full" if len(settings) <= 1 else "layer"


class Embedder:
    """Chunks of a log's steps -> embeddings, backwards in time.

    Args:
        log: the gradient log.
        mode: ``"empirical"`` or ``"ggn"``.
        propagation: a key of :data:`dvemb.optim.PROPAGATIONS`.
        blocks: ``"layer"`` or ``"full"`` (resolved).
        dtype, device: of the recursion.
        block_rows: curvature rows per chunk (whole steps).
        second_moment, projected_preconditioner: the optimizer recursion's options.
        lift_second_moment: carry the second-moment term of projected layers over their own coordinates
            (``ComputeArguments.second_moment_lifted``; None, the default: within ``LIFT_AUTO_RATIO``).
        seeded: one recursion per seed slot (a segment of a segmented computation) instead of one.
    """

    def __init__(
        self,
        log: GradientLog,
        *,
        mode: str,
        propagation: str,
        blocks: str,
        dtype: torch.dtype,
        device: torch.device,
        block_rows: int,
        second_moment: bool,
        projected_preconditioner: str,
        seeded: bool = False,
        lift_second_moment: bool | None = False,
    ) -> None:
        self.log, self.mode, self.propagation, self.blocks = log, mode, propagation, blocks
        self.dtype, self.device, self.block_rows = dtype, device, block_rows
        self.second_moment, self.projected_preconditioner = second_moment, projected_preconditioner
        self.layer_dims = [layer.dim for layer in log.layers]
        self.offsets: list[int] = np.cumsum([0, *self.layer_dims]).tolist()
        self.total_dim = int(self.offsets[-1])
        self.seeded = seeded
        self.lift_second_moment = lift_second_moment
        self.num_seeds = self._num_seeds() if seeded else 1
        self.lift_sizes = self._lift_sizes()
        self.groups = self._make_groups()

    @property
    def optimizer_exact(self) -> bool:
        """True when the step-by-step optimizer recursion runs (momentum, Adam, AdamW)."""
        return self.propagation in OPTIMIZER_PROPAGATIONS

    def _num_seeds(self) -> int:
        """Slots of the state a segment must seed: ``M`` alone for SGD; ``theta`` and the momentum's
        sensitivity for the optimizer recursion, and the second moment's when some layer carries it."""
        if not self.optimizer_exact:
            return 1
        carries_v = (
            self.propagation in ("adam", "adamw")
            and self.second_moment
            and any(layer.projection.is_identity for layer in self.log.layers)
        )
        return 3 if carries_v else 2

    def _lift_sizes(self) -> list[int]:
        """Per layer, the own coordinates over which the recursion carries its Adam second-moment term (0: not
        carried): :func:`lift_plan` of what the log carries. Not in a segmented computation: its seeds span only
        the projected state."""
        lifting = self.lift_second_moment is not False and self.second_moment and not self.seeded
        if self.propagation not in ("adam", "adamw") or not lifting:
            return [0] * len(self.layer_dims)
        entries = self.log.info.layers
        sizes = [lifted_size(entries[i], layer.projection) for i, layer in enumerate(self.log.layers)]
        full = self.blocks == "full"
        widths = [self.total_dim] * len(sizes) if full else list(self.layer_dims)
        own = self.total_dim**2 if full else sum(d * d for d in self.layer_dims)
        return lift_plan(sizes, widths, own if self.lift_second_moment is None else None)

    def _lifted(self, layers: list[int]) -> tuple[int, ...]:
        """Positions in ``layers`` of the projected layers whose term the recursion carries (a stacked group of
        per-layer blocks is all of them or none: its key includes the lifted size)."""
        return tuple(position for position, i in enumerate(layers) if self.lift_sizes[i])

    def _lifted_state(self, layers: list[int]) -> dict[int, int]:
        """Segment start -> own coordinates of each lifted segment of a group (the recursion's extra state)."""
        lifted = self._lifted(layers)
        if self.blocks != "full":
            return {0: self.lift_sizes[layers[0]]} if lifted else {}
        return {self.offsets[layers[i]]: self.lift_sizes[layers[i]] for i in lifted}

    def _recursion(self, layers: list[int], groups: int, dim: int, seed: int) -> Recursion:
        if not self.optimizer_exact:
            return BlockedRecursion(groups, dim, dtype=self.dtype, device=self.device)
        recursion = OptimizerRecursion(
            groups, dim, dtype=self.dtype, device=self.device, lifted=self._lifted_state(layers)
        )
        if seed > 0:  # the identity moves from theta to another slot
            identity = recursion.theta.clone()
            recursion.theta.zero_()
            getattr(recursion, OPTIMIZER_SLOTS[seed]).copy_(identity)
        return recursion

    def _make_groups(self) -> list[Group]:
        def group(layers: list[int], dim: int, count: int) -> Group:
            return Group(layers, dim, [self._recursion(layers, count, dim, seed) for seed in range(self.num_seeds)])

        if self.blocks == "full":
            return [group(list(range(len(self.layer_dims))), self.total_dim, 1)]
        # Layers are batched when their blocks have one shape; Adam's preconditioner also needs one layout.
        by_key: dict[tuple[int, ...], list[int]] = {}
        for index, layer in enumerate(self.log.layers):
            p = layer.projection
            # A lifted layer's state also needs one shape of its own coordinates (64 x 32 and 32 x 64 do not stack).
            own = (p.out_dim, p.in_dim) if self.lift_sizes[index] else (0, 0)
            key = (p.dim, p.k_out, p.k_in, int(p.is_identity), *own) if self.optimizer_exact else (p.dim,)
            by_key.setdefault(key, []).append(index)
        return [group(layers, key[0], len(layers)) for key, layers in by_key.items()]

    # -- chunks -----------------------------------------------------------------------------------

    def chunks(self, shard: ShardData, first: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, int, int]]:
        """Chunks of whole steps of ``shard.steps[first:stop]``, newest first, as ``(s0, s1, r0, r1)``:
        step positions and row positions within the shard."""
        stop = len(shard.steps) if stop is None else stop
        factor_rows = 1
        if self.mode == "ggn":
            factor_rows = next(iter(shard.curvature.values())).shape[1]
        budget = self._row_budget()
        step_rows = np.cumsum([0, *shard.batch_size.tolist()])
        end = stop
        while end > first:
            start = end - 1
            while start > first and (step_rows[end] - step_rows[start - 1]) * factor_rows <= budget:
                start -= 1
            yield start, end, int(step_rows[start]), int(step_rows[end])
            end = start

    def _row_budget(self) -> int:
        # Each group holds a (G, n, n) Gram matrix: keep it under about 1 GiB.
        widest = max(len(g.layers) for g in self.groups)
        return max(1, min(self.block_rows, int((2**30 / (8 * widest)) ** 0.5)))

    def embed(self, shard: ShardData, s0: int, s1: int, r0: int, r1: int, *, check_finite: bool = True) -> torch.Tensor:
        """Embeddings of the rows ``r0:r1`` (steps ``s0:s1`` of the shard, later than any seen before).

        ``check_finite``: raise :class:`NumericalError` on a non-finite embedding; a caller that scores every
        embedding checks the scores instead (a non-finite coordinate makes every score non-finite, and the scores
        are about a hundred times fewer numbers).

        Returns:
            (seeds, n, D) embeddings, D the concatenated projected dimension (seeds is 1 unless seeded).
        """
        steps = shard.steps[s0:s1]
        grad_steps = shard.row_step[r0:r1]
        embedding = torch.empty(self.num_seeds, r1 - r0, self.total_dim, dtype=self.dtype, device=self.device)
        full = self.blocks == "full"
        for group in self.groups:
            names = [self.log.layers[i].name for i in group.layers]
            stack, dim = (torch.cat, 1) if full else (torch.stack, 0)
            grads = stack([shard.grads[n][r0:r1] for n in names], dim)
            curv = curv_steps = None
            if self.mode == "ggn":
                factors = [shard.curvature[n][r0:r1] for n in names]  # (n, C, d) each
                curv = stack([f.flatten(0, 1) for f in factors], dim)
                curv_steps = grad_steps.repeat_interleave(factors[0].shape[1])
            if full:
                grads, curv = grads.unsqueeze(0), (curv.unsqueeze(0) if curv is not None else None)
            rate, decay = self._rates(shard, s0, s1, group.layers)
            chunk = Chunk(grads, grad_steps, curv, curv_steps, steps, rate, decay)
            maps = self._maps(shard, s0, s1, group.layers) if self.optimizer_exact else None
            for seed, recursion in enumerate(group.recursions):
                if isinstance(recursion, OptimizerRecursion):
                    assert maps is not None
                    out = recursion.process(chunk, maps)
                else:
                    # Written straight into the embedding buffer when the group's columns form one (G, n, d) view.
                    target = self._group_view(embedding[seed], group)
                    out = recursion.process(chunk, out=target)
                    if target is not None:
                        continue
                if full:
                    embedding[seed].copy_(out[0])
                else:
                    for position, layer in enumerate(group.layers):
                        embedding[seed, :, self.offsets[layer] : self.offsets[layer + 1]] = out[position]
        if check_finite and not bool(torch.isfinite(embedding).all()):
            raise non_finite(int(steps[0]), int(steps[-1]))
        return embedding

    def _group_view(self, embedding: torch.Tensor, group: Group) -> torch.Tensor | None:
        """The (G, n, d) view of a group's columns of ``embedding`` (n, D), or None if they are not adjacent."""
        if self.blocks == "full":
            return embedding.unsqueeze(0)
        first = group.layers[0]
        if group.layers != list(range(first, first + len(group.layers))):
            return None
        columns = embedding[:, self.offsets[first] : self.offsets[first] + len(group.layers) * group.dim]
        view: torch.Tensor = columns.unflatten(1, (len(group.layers), group.dim)).transpose(0, 1)
        return view

    def _rates(self, shard: ShardData, s0: int, s1: int, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lr = shard.lr[s0:s1][:, layers].T  # (G, S)
        wd = shard.weight_decay[s0:s1][:, layers].T
        rate = lr / shard.batch_size[s0:s1].double() if self.log.loss_reduction == "mean" else lr
        decay = 1.0 - lr * wd
        if bool((decay <= 0).any()):
            raise NumericalError(f"learning rate times weight decay reaches 1 at step {int(shard.steps[s0])}")
        if self.blocks == "full" and not (bool((lr == lr[:1]).all()) and bool((wd == wd[:1]).all())):
            raise ConfigError(
                "blocks='full' needs one learning rate and weight decay for all tracked layers; use blocks='layer'"
            )
        return (rate[:1], decay[:1]) if self.blocks == "full" else (rate, decay)

    def _maps(self, shard: ShardData, s0: int, s1: int, layers: list[int]) -> StepMaps:
        optimizer_entry = self.log.info.optimizer
        maps = step_maps(
            {k: v[s0:s1] for k, v in shard.optimizer.items()},
            shard.lr[s0:s1],
            shard.weight_decay[s0:s1],
            shard.batch_size[s0:s1],
            propagation=self.propagation,
            nesterov=bool(optimizer_entry.get("nesterov", False)),
            loss_reduction=self.log.loss_reduction,
            layers=[(self.log.layers[i].name, self.log.layers[i].projection) for i in layers],
            layer_index=layers,
            first_step=int(shard.steps[s0]),
            full=self.blocks == "full",
            second_moment=self.second_moment,
            projected_preconditioner=self.projected_preconditioner,
            lifted=self._lifted(layers),
        )
        if self.blocks == "full":
            maps = _first_row(maps, int(shard.steps[s0]))
        return maps

    # -- state ------------------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """Every recursion's state, keyed ``{tensor}.{group}`` (seed 0) or ``{tensor}.{group}.{seed}``."""
        state: dict[str, torch.Tensor] = {}
        for g, group in enumerate(self.groups):
            for seed, recursion in enumerate(group.recursions):
                suffix = f".{g}" if seed == 0 else f".{g}.{seed}"
                state.update({f"{k}{suffix}": v.cpu() for k, v in recursion_state(recursion).items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned (in place)."""
        for g, group in enumerate(self.groups):
            for seed, recursion in enumerate(group.recursions):
                suffix = f".{g}" if seed == 0 else f".{g}.{seed}"
                for key, value in recursion_state(recursion).items():
                    value.copy_(state[f"{key}{suffix}"])


def _first_row(maps: StepMaps, step: int) -> StepMaps:
    """The maps of the concatenated vector (``blocks="full"``): every layer must share the coefficients."""
    for name in COEFFICIENTS:
        value = getattr(maps, name)
        if not bool((value == value[:1]).all()):
            raise ConfigError(
                f"blocks='full' needs one optimizer setting ({name}) for all tracked layers near step {step}; "
                "use blocks='layer'"
            )
    return replace(maps, **{n: getattr(maps, n)[:1] for n in COEFFICIENTS})
