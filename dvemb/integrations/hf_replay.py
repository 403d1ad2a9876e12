"""Exact replay of a run recorded with :func:`dvemb.integrations.huggingface.record`: the Trainer supplies the
model, the optimizer's class and groups, the data and its collator; the log supplies the order and the rates.

::

    callback = record(trainer, "runs/gpt2", initial_dir="runs/gpt2-initial")   # keeps the starting point
    trainer.train()
    result = replay_trainer(trainer, "runs/gpt2", "runs/gpt2-initial")        # after training, same process
    save_replay(result, "runs/gpt2-results")                                   # then `dvemb trust` compares

What it rebuilds (docs/replay.md, "A Trainer run"): a copy of the trained model with the kept initial weights, and
an optimizer of the Trainer's class over the same parameter groups with the kept initial state; the examples of a
step by their ids, collated as the Trainer collates them (its column filter included); and the loss as the Trainer
computes it: for a causal LM the summed token losses divided by the labels the Trainer counts per example
(``num_items_in_batch``: the labels not -100, shifted for a model whose loss shifts them), which is the Trainer's
own loss when the examples of a batch count equally many labels (fixed-length chunks); otherwise the replayed loss
drifts from the logged one and the replay's ``loss_gap`` says by how much. A classifier's loss is the mean
cross-entropy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from dvemb.errors import ConfigError
from dvemb.integrations.huggingface import _collated, _Indexed, _unwrapped, inputs_and_labels
from dvemb.replay import ReplayArguments, load_initial, replay, schedule_from_log
from dvemb.replay.bundle import write_bundle
from dvemb.replay.files import Replay
from dvemb.replay.losses import per_example_loss

__all__ = ["bundle_trainer", "mixed_precision", "replay_trainer", "token_count", "trainer_loss"]


def trainer_loss(trainer: Trainer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-example losses ``(logits, labels) -> (B,)`` whose batch mean is ``trainer``'s loss.

    For (B, L, V) logits: the example's summed token cross-entropy (labels shifted by one, -100 ignored) over the
    labels the Trainer counts for it, as its ``_get_num_items_in_batch`` does: the shifted labels for a model whose
    loss shifts them (``*ForCausalLM`` models), all labels otherwise (GPT-2 in transformers 5.25), and the model's
    own mean over its shifted tokens when the Trainer counts nothing (a model that takes no loss arguments). For
    (B, C) logits the cross-entropy."""
    return per_example_loss("causal_lm", token_count(trainer))


def token_count(trainer: Trainer) -> str:
    """How ``trainer`` counts a causal LM's labels (``dvemb.replay.losses``): ``"shifted"`` for a model whose loss
    shifts them or when it counts nothing (the model's own mean), ``"labels"`` otherwise."""
    counts = bool(getattr(trainer, "model_accepts_loss_kwargs", False)) or trainer.compute_loss_func is not None
    shifts = bool(getattr(trainer, "_loss_shifts_labels", False))
    return "shifted" if (shifts or not counts) else "labels"


def replay_trainer(
    trainer: Trainer,
    log_dir: str | Path,
    initial_dir: str | Path,
    *,
    id_column: str | None = None,
    queries: list[dict[str, Any]] | None = None,
    arguments: ReplayArguments | None = None,
    query_set: str = "eval",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    work_dir: str | Path | None = None,
) -> Replay:
    """Replay a Trainer run recorded with ``record(trainer, log_dir, initial_dir=...)``.

    Args:
        trainer: the Trainer that ran (its model, optimizer, datasets and collator; not modified).
        log_dir: the run's gradient log.
        initial_dir: where ``record(..., initial_dir=)`` kept the starting weights and optimizer state.
        id_column: the ``id_column`` given to ``record`` (None: the log's ids are dataset indices).
        queries: query batches (dicts of model inputs with ``labels``); default ``trainer.eval_dataset`` collated
            in batches of ``per_device_eval_batch_size``.
        arguments: the replay's options (query columns, removal, checkpoints, probe). Unless they set
            ``autocast``, the Trainer's mixed precision is replayed as it trained: ``bf16=True`` gives
            ``autocast="bfloat16"``, ``fp16=True`` ``"float16"``.
        query_set: the name the replay is saved under (the results' query set it is compared with).
        loss_fn: per-example training loss ``(logits, labels) -> (B,)`` whose batch mean is the Trainer's loss;
            default :func:`trainer_loss` of ``trainer``.
        work_dir: checkpoints of a resumable replay (:func:`dvemb.replay.replay`).
    """
    dataset, model, optimizer = _starting_point(trainer, initial_dir)
    collate = trainer._get_collator_with_removed_columns(trainer.data_collator, description="replay")
    per_example = loss_fn or trainer_loss(trainer)
    index_of = _index_of(dataset, id_column)

    def examples(ids: list[Any]) -> dict[str, Any]:
        return _batch(collate([dataset[index_of(i)] for i in ids]), trainer.args.device)

    def loss(forward: Callable[..., Any], batch: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        output = forward(**inputs)
        logits = output.logits if hasattr(output, "logits") else output
        return per_example(logits, batch["labels"])

    if queries is None:
        queries = list(_eval_batches(trainer, collate))
    arguments = arguments or ReplayArguments()
    if arguments.autocast is None:
        arguments = dataclasses.replace(arguments, autocast=mixed_precision(trainer))
    return replay(
        model,
        optimizer,
        schedule_from_log(log_dir),
        loss,
        examples,
        queries,
        arguments,
        query_set=query_set,
        work_dir=work_dir,
    )


def bundle_trainer(
    trainer: Trainer,
    initial_dir: str | Path,
    path: str | Path,
    *,
    id_column: str | None = None,
    query_set: str = "eval",
    queries: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a replay bundle of a Trainer run recorded with ``record(trainer, log_dir, initial_dir=...)``, for the
    service to replay (``dvemb.replay.bundle``; docs/replay.md, "In the service"): the kept starting point, every
    training example collated by the Trainer's collator (they must collate to one shape: fixed-length chunks, or
    padding to a fixed length), the evaluation set as the query set ``query_set``, and the Trainer's loss.

    Args:
        trainer: the Trainer that ran (after ``trainer.train()``; not modified).
        initial_dir: where ``record(..., initial_dir=)`` kept the starting weights and optimizer state.
        path: the bundle file (``<log>/replay-bundle.safetensors`` is uploaded with the log by ``dvemb upload``).
        id_column: the ``id_column`` given to ``record`` (None: the log's ids are dataset indices).
        query_set: the name of the query set (the results' query set it stands for: ``eval`` for the one-liner's).
        queries: the query set's fields (``input_ids``, ``labels``...); default the Trainer's ``eval_dataset``.
    """
    dataset, model, optimizer = _starting_point(trainer, initial_dir)
    collate = trainer._get_collator_with_removed_columns(trainer.data_collator, description="replay")
    cpu = torch.device("cpu")
    rows = [dataset[i] for i in range(len(dataset))]
    if id_column is None:
        ids: list[Any] = list(range(len(dataset)))
    else:
        ids = [r[id_column].item() if isinstance(r[id_column], torch.Tensor) else r[id_column] for r in rows]
    examples = _batch(collate(rows), cpu)
    if queries is None:
        batches = list(_eval_batches(trainer, collate))
        queries = {k: torch.cat([b[k].to(cpu) for b in batches]) for k in batches[0]}
    return write_bundle(
        path,
        model=model,
        optimizer=optimizer,
        ids=ids,
        examples=examples,
        query_sets={query_set: queries},
        loss="causal_lm",
        token_count=token_count(trainer),
        autocast=mixed_precision(trainer),
    )


def _starting_point(trainer: Trainer, initial_dir: str | Path) -> tuple[Any, nn.Module, torch.optim.Optimizer]:
    """The Trainer's training set, and a copy of its model with an optimizer of its class, both as kept in
    ``initial_dir`` (eager attention; the model's own forward, not accelerate's wrapper)."""
    dataset: Any = trainer.train_dataset
    dataset = dataset.dataset if isinstance(dataset, _Indexed) else dataset
    if dataset is None:
        raise ConfigError("replay_trainer needs the Trainer's train_dataset")
    if not isinstance(trainer.model, nn.Module):
        raise ConfigError("replay_trainer needs the Trainer's model")
    trained = _unwrapped(trainer.model)
    model = copy.deepcopy(trained)
    # Mixed precision: accelerate replaced the model's forward by one under its own autocast that returns float32
    # copies; the replay applies the run's autocast itself (ReplayArguments.autocast), so the copy gets its class's.
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_original_forward", None)
    attention: Any = getattr(model, "set_attn_implementation", None)
    if attention is not None:
        attention("eager")  # torch's fused attention kernels have no double backward
    model.train()
    optimizer = _fresh_optimizer(trainer, trained, model)
    load_initial(model, optimizer, initial_dir)
    return dataset, model, optimizer


def mixed_precision(trainer: Trainer) -> str | None:
    """The autocast dtype the Trainer trained under (``ReplayArguments.autocast``), or None."""
    if getattr(trainer.args, "bf16", False):
        return "bfloat16"
    if getattr(trainer.args, "fp16", False):
        return "float16"
    return None


def _fresh_optimizer(trainer: Trainer, trained: nn.Module, copied: nn.Module) -> torch.optim.Optimizer:
    """The Trainer's optimizer class over ``copied``'s parameters, in the same groups and settings."""
    used = trainer.optimizer
    if used is None:
        raise ConfigError("replay_trainer needs the Trainer's optimizer: call it after trainer.train()")
    inner = getattr(used, "optimizer", used)  # accelerate's wrapper
    twin = dict(zip(trained.parameters(), copied.parameters(), strict=True))
    groups = []
    for group in inner.param_groups:
        missing = [p for p in group["params"] if p not in twin]
        if missing:
            raise ConfigError("the Trainer's optimizer holds parameters that are not the model's")
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": [twin[p] for p in group["params"]]})
    build: Any = type(inner)  # torch's optimizers take their groups (each with its settings) as the first argument
    rebuilt: torch.optim.Optimizer = build(groups)
    return rebuilt


def _index_of(dataset: Any, id_column: str | None) -> Callable[[Any], int]:
    """Example id -> dataset position (the id itself without an id column)."""
    if id_column is None:
        return int
    positions = {}
    for index in range(len(dataset)):
        value = dataset[index][id_column]
        positions[value.item() if isinstance(value, torch.Tensor) else value] = index
    return positions.__getitem__


def _batch(collated: Any, device: torch.device) -> dict[str, Any]:
    inputs, labels = inputs_and_labels(collated, device)
    return {**inputs, "labels": labels}


def _eval_batches(trainer: Trainer, collate: Callable[[list[Any]], Any]) -> Iterator[dict[str, Any]]:
    data: Any = trainer.eval_dataset
    if data is None:
        raise ConfigError("replay_trainer: the Trainer has no eval_dataset; pass queries=[batch, ...]")
    size = trainer.args.per_device_eval_batch_size
    for inputs, labels in _collated(data, collate, size, math.ceil(len(data) / size), trainer):
        yield {**inputs, "labels": labels}
