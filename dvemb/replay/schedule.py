"""What a replay follows: the examples of every step, in the log's row order, and every step's learning rates.

:class:`ReplaySchedule` is built from a dvemb gradient log by :func:`schedule_from_log` (the recorder wrote both),
or by hand for a loop that was not recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dvemb.errors import ConfigError

__all__ = ["ReplaySchedule", "schedule_from_log"]


@dataclass(frozen=True)
class ReplaySchedule:
    """The recorded order of training.

    Attributes:
        step_ids: per optimizer step, the ids of its examples in the log's row order (micro-batches in order).
        lrs: per step, the learning rate of each optimizer parameter group (one value: every group).
        loss_reduction: ``"mean"`` (the step's loss is the mean over its examples) or ``"sum"``.
        losses: per step, the training loss the run logged (NaN where it did not), or None: the replay reports how
            far its own losses are from these (``loss_gap``), a check that it follows the recorded run.
    """

    step_ids: Sequence[Sequence[int | str]]
    lrs: Sequence[Sequence[float]]
    loss_reduction: str = "mean"
    losses: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"loss_reduction={self.loss_reduction!r}: use 'mean' or 'sum'")
        if len(self.step_ids) != len(self.lrs):
            raise ConfigError(f"{len(self.step_ids)} steps of ids but {len(self.lrs)} steps of learning rates")
        if not self.step_ids:
            raise ConfigError("the schedule has no steps")
        for t, ids in enumerate(self.step_ids):
            if len(ids) == 0:
                raise ConfigError(f"step {t} has no examples")

    @property
    def num_steps(self) -> int:
        """Optimizer steps T."""
        return len(self.step_ids)

    def rows(self) -> tuple[torch.Tensor, list[int | str]]:
        """(R,) step of every occurrence and its example id, in the engine's row order (chronological)."""
        steps = [t for t, ids in enumerate(self.step_ids) for _ in ids]
        return torch.tensor(steps, dtype=torch.int64), [i for ids in self.step_ids for i in ids]

    def group_lrs(self, step: int, groups: int) -> list[float]:
        """The learning rate of each of ``groups`` parameter groups at ``step``."""
        lrs = list(self.lrs[step])
        if len(lrs) == 1:
            return lrs * groups
        if len(lrs) != groups:
            raise ConfigError(f"step {step} has {len(lrs)} learning rates for an optimizer of {groups} groups")
        return lrs


def schedule_from_log(log_dir: str | Path) -> ReplaySchedule:
    """The order, ids and learning rates of a recorded run (``dvemb.open_log``).

    The log keeps one rate per tracked layer and step; a replay needs one per optimizer parameter group. When
    every layer trained at the same rate at every step that rate is every group's; otherwise pass a
    :class:`ReplaySchedule` with the groups' rates.

    Raises:
        ConfigError: the layers' rates differ at some step.
    """
    from dvemb.reader import open_log

    log = open_log(log_dir)
    step_ids: dict[int, list[int | str]] = {}
    lrs: dict[int, list[float]] = {}
    losses: dict[int, float] = {}
    for shard in log.iter_shards():
        for row, step in enumerate(shard.row_step.tolist()):
            step_ids.setdefault(int(step), []).append(shard.example_ids[row])
        for i, step in enumerate(shard.steps.tolist()):
            rates = shard.lr[i].to(torch.float64)
            if bool((rates != rates[0]).any()):
                raise ConfigError(
                    f"{log_dir}: step {step} trained its layers at different rates {sorted(set(rates.tolist()))}; "
                    "build a ReplaySchedule with one rate per optimizer parameter group"
                )
            lrs[int(step)] = [float(rates[0])]
            losses[int(step)] = float(shard.loss[i])
    steps = sorted(lrs)
    if steps != list(range(steps[0], steps[0] + len(steps))):
        raise ConfigError(f"{log_dir}: the log's steps are not consecutive")
    return ReplaySchedule(
        step_ids=[step_ids.get(t, []) for t in steps],
        lrs=[lrs[t] for t in steps],
        loss_reduction=log.loss_reduction,
        losses=[losses[t] for t in steps],
    )
