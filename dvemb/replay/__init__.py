"""Exact replay: the first-order ceiling of a recorded run, and how far to trust its fast scores.

- :func:`replay` replays training (model at initialisation, optimizer in its initial state, the log's order and
  rates as a :class:`ReplaySchedule`, the step as a loss function) and scores every occurrence exactly to first
  order on a few queries, by reverse mode with Hessian-vector products and the optimizer's exact map
  (docs/replay.md); :func:`save_replay` and :func:`load_replay` keep it next to a computation's results;
- :func:`save_initial` keeps the initial weights and optimizer state before training, :func:`load_initial` puts them
  back;
- :func:`trust` compares the fast scores of a results directory with the replay and writes ``trust-<set>.json``;
- :class:`Replayer` is the machinery (forward with checkpoints, adjoint, state recomputation).

Attributes are imported on first use (PEP 562), so that ``dvemb --help`` (which registers ``dvemb replay``) does
not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dvemb.replay.api import ReplaySpec, replay
    from dvemb.replay.comparison import agreement, describe, trust, trust_file
    from dvemb.replay.engine import QUERY_COLUMNS, REMOVALS, ReplayArguments, Replayer, TrainState
    from dvemb.replay.files import Replay, load_replay, save_replay
    from dvemb.replay.initial import load_initial, save_initial
    from dvemb.replay.optimizers import SUPPORTED, FunctionalOptimizer, OptimizerState
    from dvemb.replay.probe import linearity_probe, summarise_probe
    from dvemb.replay.schedule import ReplaySchedule, schedule_from_log
    from dvemb.replay.training import Examples, LossFn, ReplayError

_LAZY = {
    **dict.fromkeys(["ReplaySpec", "replay"], "dvemb.replay.api"),
    **dict.fromkeys(["QUERY_COLUMNS", "REMOVALS", "ReplayArguments", "Replayer", "TrainState"], "dvemb.replay.engine"),
    **dict.fromkeys(["Replay", "load_replay", "save_replay"], "dvemb.replay.files"),
    **dict.fromkeys(["load_initial", "save_initial"], "dvemb.replay.initial"),
    **dict.fromkeys(["SUPPORTED", "FunctionalOptimizer", "OptimizerState"], "dvemb.replay.optimizers"),
    **dict.fromkeys(["linearity_probe", "summarise_probe"], "dvemb.replay.probe"),
    **dict.fromkeys(["ReplaySchedule", "schedule_from_log"], "dvemb.replay.schedule"),
    **dict.fromkeys(["Examples", "LossFn", "ReplayError"], "dvemb.replay.training"),
    **dict.fromkeys(["agreement", "describe", "trust", "trust_file"], "dvemb.replay.comparison"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dvemb.replay' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "QUERY_COLUMNS",
    "REMOVALS",
    "SUPPORTED",
    "Examples",
    "FunctionalOptimizer",
    "LossFn",
    "OptimizerState",
    "Replay",
    "ReplayArguments",
    "ReplayError",
    "ReplaySchedule",
    "ReplaySpec",
    "Replayer",
    "TrainState",
    "agreement",
    "describe",
    "linearity_probe",
    "load_initial",
    "load_replay",
    "replay",
    "save_initial",
    "save_replay",
    "schedule_from_log",
    "summarise_probe",
    "trust",
    "trust_file",
]
