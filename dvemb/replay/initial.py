"""The run's starting point, kept for a later replay: the initial weights and the optimizer's initial state.

A replay starts from the model and optimizer as they were before the first step, which a training script
rarely keeps. One line before training keeps them (safetensors and JSON only, no pickle)::

    dvemb.replay.save_initial(model, optimizer, "runs/exp1-initial")   # before the first step

and :func:`load_initial` puts them back into a freshly built model and optimizer of the same architecture and
settings. Files:

- ``initial.safetensors``: the model's state dict (tied weights once);
- ``initial-optimizer.safetensors``: every tensor of the optimizer's state (``optimizer.<param index>.<key>``, e.g.
  Adam's ``exp_avg`` and ``step`` of a run resumed from a checkpoint; empty before the first step);
- ``initial.json``: ``format: "dvemb-replay-initial"``, ``version: 1``, the model's class, the optimizer's class,
  its parameter groups' hyperparameters and the numbers of its state that are not tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from dvemb.atomic import write_text_atomic
from dvemb.errors import ConfigError

__all__ = ["load_initial", "save_initial"]

WEIGHTS = "initial.safetensors"
OPTIMIZER = "initial-optimizer.safetensors"
RECORD = "initial.json"
FORMAT = "dvemb-replay-initial"


def _plain(value: Any) -> Any:
    """A hyperparameter as JSON (tuples as lists; non-finite floats and other objects refused)."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"optimizer hyperparameter {value} is not finite")
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    raise ConfigError(f"optimizer hyperparameter of type {type(value).__name__} cannot be kept as JSON")


def optimizer_state_parts(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """The optimizer's state as safetensors and JSON: its state tensors (``optimizer.<param index>.<key>``), the
    numbers of its state that are not tensors (``<param index>.<key>``) and its parameter groups as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                numbers[f"{index}.{key}"] = _plain(value)
    groups = [{k: (v if k == "params" else _plain(v)) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, numbers, groups


def saved_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parameter groups kept as JSON, as ``Optimizer.load_state_dict`` takes them (betas as tuples)."""
    return [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    numbers: dict[str, Any],
    groups: list[dict[str, Any]],
) -> None:
    """Put :func:`optimizer_state_parts`'s parts back into ``optimizer`` (``tensors`` keyed ``optimizer.<i>.<key>``)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in numbers.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups(groups)})


def save_initial(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> Path:
    """Keep ``model``'s weights and ``optimizer``'s state as they are now (call it before the first step).

    Returns:
        the record's path.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / WEIGHTS))
    tensors, numbers, groups = optimizer_state_parts(optimizer)
    save_file(tensors, str(path / OPTIMIZER))
    record = {
        "format": FORMAT,
        "version": 1,
        "model": type(model).__name__,
        "optimizer": type(optimizer).__name__,
        "param_groups": groups,
        "state_numbers": numbers,
    }
    return write_text_atomic(path / RECORD, json.dumps(record, indent=2))


def load_initial(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Put the kept weights and optimizer state into ``model`` and ``optimizer`` (built as in training).

    Raises:
        ConfigError: no kept state there, another optimizer class, other parameter groups, or weights that do not
            fit the model.
    """
    path = Path(directory)
    if not (path / RECORD).exists():
        raise ConfigError(f"{path} holds no initial state ({RECORD} is missing); see dvemb.replay.save_initial")
    record = json.loads((path / RECORD).read_text())
    if record.get("format") != FORMAT or record.get("version") != 1:
        raise ConfigError(f"{path / RECORD} is not a {FORMAT} version 1 record")
    if record["optimizer"] != type(optimizer).__name__:
        raise ConfigError(f"the kept optimizer is {record['optimizer']}, not {type(optimizer).__name__}")
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != [len(g["params"]) for g in record["param_groups"]]:
        raise ConfigError("the optimizer's parameter groups differ from the kept ones (parameters per group)")
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"the kept weights do not fit the model: {error}") from error
    if missing or unexpected:
        raise ConfigError(f"the kept weights do not fit the model: missing {missing}, unexpected {unexpected}")
    load_optimizer_state(optimizer, load_file(str(path / OPTIMIZER)), record["state_numbers"], record["param_groups"])
