"""Record a Hugging Face ``Trainer`` run: one line before ``trainer.train()``.

::

    from dvemb.integrations.huggingface import record

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=collator)
    record(trainer, "runs/gpt2-finetune", id_column="id", text_column="text")
    trainer.train()                       # the log is complete when training ends

How it works: the training set is wrapped so that every example carries its dataset index through
the data collator (under :data:`INDEX_KEY`, kept by the Trainer's column filter); a forward
pre-hook on the model takes the indices out before the model sees them and hands the step's
example ids to the recorder (the id column's values, or the dataset index). Before the first step the
callback fits curvature-aware projection bases with look-ahead (a tenth of the run's steps on the first
training batches, with the Trainer's own optimizer and schedule, then everything restored), and the
recorder's Gauss-Newton rows start at the model's output logits: the README recipe, with no options.
:class:`DvembCallback`
opens one recorder step per optimizer step (``on_step_begin`` to ``on_step_end``, so gradient
accumulation and gradient checkpointing are covered), reads the learning rate and optimizer state
from the Trainer's optimizer, unscales gradients with the ``GradScaler`` of an fp16 run (a step the
scaler skipped is logged as skipped, not as an update), records query gradients on the evaluation
set at the end of training and keeps the examples' text for the dashboard. Under ``accelerate`` or
``torchrun`` every rank writes its own shards, as with the plain recorder.

Not supported (refused with a message): FSDP and DeepSpeed (parameters are sharded, per-example
gradients of a layer never exist whole on one rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dvemb.errors import ConfigError, RecorderError
from dvemb.layers import widened
from dvemb.recorder import Recorder

__all__ = ["INDEX_KEY", "DvembCallback", "causal_lm_loss", "record"]

#: The batch key that carries each example's dataset index from the dataset to the model's pre-hook.
INDEX_KEY = "dvemb_index"
_TEXT_LIMIT = 2000  # characters of an example's text kept for the dashboard


class _Indexed(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A map-style dataset whose items are the wrapped dataset's dicts plus their index."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"dvemb records Trainer datasets whose items are dicts of model inputs; item {index} is a "
                f"{type(item).__name__}"
            )
        return {**item, INDEX_KEY: index}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example loss of a causal language model as Hugging Face computes it: labels shifted by one,
    positions labelled -100 ignored, the mean over an example's remaining tokens.

    Args:
        logits: (B, L, V).
        labels: (B, L).

    Returns:
        (B,) losses.
    """
    shifted_logits, shifted = widened(logits[:, :-1]), labels[:, 1:]
    per_token = F.cross_entropy(shifted_logits.flatten(0, 1), shifted.flatten(), reduction="none", ignore_index=-100)
    valid = (shifted != -100).to(per_token.dtype)
    return (per_token.view(shifted.shape) * valid).sum(1) / valid.sum(1).clamp_min(1)


def _sequence_or_class_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if outputs.dim() == 3 and labels.dim() == 2:
        return causal_lm_loss(outputs, labels)
    return F.cross_entropy(widened(outputs), labels, reduction="none")


class DvembCallback(TrainerCallback):
    """Records a ``Trainer`` run with a :class:`~dvemb.Recorder`; attach it with :func:`record`.

    Args:
        log_dir: directory of the gradient log.
        dataset: the training set (as given to the Trainer), for example ids and texts.
        id_column: column holding each example's id (int or str); ``None`` uses the dataset index.
        text_column: column whose text the dashboard shows for each example, or None.
        eval_batches: builds the query batches at the end of training (``(inputs, labels)`` pairs),
            or None to record no queries.
        query_set: name of the query set recorded on the evaluation data.
        dynamics_every: also record the query set every this many optimizer steps as a checkpoint
            (``{query_set}.step{N}``), for value dynamics (docs/results.md); 0: only at the end.
        calibration_batches: builds the training batches (in dataset order) that fit curvature-aware
            projection bases before the first step; None keeps the random projection.
        lookahead: share of the run's optimizer steps (``state.max_steps``) that calibration first trains
            on those batches with the Trainer's optimizer and scheduler (then restores everything), so that
            the bases are those of the early training phase; 0 fits them at initialisation.
        loss_fn: per-example loss ``(logits, labels) -> (B,)`` for queries; default the causal-LM loss
            for (B, L, V) logits, cross-entropy for (B, C).
        recorder_options: keyword arguments for :class:`~dvemb.Recorder` (``proj_dim``, ``layers``, ...).
        initial_dir: where to keep the model's weights and the optimizer's state as training starts, for an
            exact replay (:func:`dvemb.integrations.hf_replay.replay_trainer`); None: not kept.
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        dataset: Any,
        id_column: str | None = None,
        text_column: str | None = None,
        eval_batches: Callable[[], Iterator[tuple[Any, torch.Tensor]]] | None = None,
        query_set: str = "eval",
        dynamics_every: int = 0,
        calibration_batches: Callable[[], list[tuple[Any, torch.Tensor]]] | None = None,
        lookahead: float = 0.1,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        recorder_options: Mapping[str, Any] | None = None,
        initial_dir: str | Path | None = None,
    ) -> None:
        if not 0.0 <= lookahead < 1.0:
            raise ConfigError(f"lookahead={lookahead} must be a share of the run's steps in [0, 1)")
        self.log_dir = Path(log_dir)
        self.dataset = dataset
        self.id_column = id_column
        self.text_column = text_column
        self.eval_batches = eval_batches
        self.query_set = query_set
        if dynamics_every < 0:
            raise ConfigError(f"dynamics_every={dynamics_every} must be 0 (off) or a number of steps")
        self.dynamics_every = dynamics_every
        self.calibration_batches = calibration_batches
        self.lookahead = lookahead
        self.loss_fn = loss_fn or _sequence_or_class_loss
        self.recorder_options = dict(recorder_options or {})
        self.initial_dir = None if initial_dir is None else Path(initial_dir)
        self.recorder: Recorder | None = None
        self.seen: dict[Any, int] = {}  # example id -> dataset index, for the texts
        self._step: Any = None
        self._model: nn.Module | None = None
        self.losses: list[tuple[float, bool]] = []  # (micro-batch loss, a share of the step's mean) this step

    # -- ids --------------------------------------------------------------------------------------

    def example_id(self, index: int) -> Any:
        """The id of the training example at dataset position ``index``."""
        if self.id_column is None:
            return index
        value = self.dataset[index][self.id_column]
        return value.item() if isinstance(value, torch.Tensor) else value

    def take_indices(self, indices: Any) -> None:
        """Give the recorder the ids of one micro-batch (called by the model's pre-hook)."""
        if self.recorder is None or self._step is None or not torch.is_grad_enabled():
            return
        positions = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        ids = [self.example_id(int(i)) for i in positions]
        for example, index in zip(ids, positions, strict=True):
            self.seen.setdefault(example, int(index))
        self.recorder.add_ids(ids)

    # -- events -----------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _refuse_sharded(args)
        model = kwargs["model"]
        options = {"loss_reduction": "mean", **self.recorder_options}
        if self.calibration_batches is None:
            options.setdefault("projection", "random")
        self.recorder = Recorder(_unwrapped(model), self.log_dir, **options)
        if self.calibration_batches is not None:
            optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
            steps = int(self.lookahead * state.max_steps) if optimizer is not None else 0
            self.recorder.calibrate(
                self.calibration_batches(),
                optimizer=getattr(optimizer, "optimizer", optimizer),  # accelerate wraps the real one
                scheduler=getattr(scheduler, "scheduler", scheduler),
                lookahead_steps=steps,
                lookahead_loss_fn=self.loss_fn,
            )
        if self.initial_dir is not None:  # after calibration, which restores the model and the optimizer
            from dvemb.replay import save_initial

            optimizer = kwargs.get("optimizer")
            if optimizer is None:
                raise ConfigError("record(trainer, initial_dir=...) needs the Trainer's optimizer at train begin")
            save_initial(_unwrapped(model), getattr(optimizer, "optimizer", optimizer), self.initial_dir)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.recorder is None:
            return
        optimizer = kwargs["optimizer"]
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        self._step = self.recorder.step(None, inner, scaler=getattr(optimizer, "scaler", None))
        self._step.__enter__()
        self.losses = []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step, self._step = self._step, None
        if step is not None:
            if self.losses and self.recorder is not None:  # the training loss, drawn on the dashboard's phase plot
                values = [value for value, _ in self.losses]
                shares = all(share for _, share in self.losses)
                self.recorder.log_loss(sum(values) if shares else sum(values) / len(values))
            step.__exit__(None, None, None)
        rec, every = self.recorder, self.dynamics_every
        at = state.global_step
        if rec is not None and self.eval_batches is not None and every and at % every == 0 and at < state.max_steps:
            rec.record_queries(self.query_set, self.eval_batches(), loss_fn=self.loss_fn, checkpoint=True)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        rec = self.recorder
        if rec is None:
            return
        if self.eval_batches is not None:
            rec.record_queries(self.query_set, self.eval_batches(), loss_fn=self.loss_fn)
        if self.text_column is not None and self.seen:
            ids = list(self.seen)
            texts = [str(self.dataset[self.seen[i]][self.text_column])[:_TEXT_LIMIT] for i in ids]
            rec.describe(ids, texts=texts)
        rec.close()
        self.recorder = None


def record(
    trainer: Trainer,
    log_dir: str | Path,
    *,
    id_column: str | None = None,
    text_column: str | None = None,
    query_set: str = "eval",
    record_eval: bool = True,
    dynamics_every: int = 0,
    calibration_batches: int = 8,
    lookahead: float = 0.1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    initial_dir: str | Path | None = None,
    **recorder_options: Any,
) -> DvembCallback:
    """Attach dvemb to a ``Trainer`` before ``trainer.train()``: the one line a training script needs.

    Args:
        trainer: the Trainer, with its ``train_dataset`` (map-style, items are dicts of model inputs).
        log_dir: directory of the gradient log to write.
        id_column: column holding each example's id; default the dataset index.
        text_column: column with each example's text, shown on the dashboard.
        query_set: name of the query set recorded on ``trainer.eval_dataset`` at the end.
        record_eval: record query gradients on the evaluation set (when the Trainer has one).
        dynamics_every: also record them every this many optimizer steps, as checkpoints for value
            dynamics (the influence of early, basin and late data on each checkpoint); 0: at the end only.
        calibration_batches: training batches (in dataset order, collated as the Trainer does) that fit
            curvature-aware projection bases before the first step; 0 uses the random projection.
        lookahead: share of the run's steps that calibration first trains on those batches (the Trainer's
            optimizer and schedule; everything restored after), so that the bases are those of the early
            training phase (the README recipe); 0 fits them at initialisation.
        loss_fn: per-example query loss ``(logits, labels) -> (B,)``; default :func:`causal_lm_loss` for
            (B, L, V) logits, cross-entropy for (B, C).
        initial_dir: keep the model's weights and the optimizer's state as training starts there, for an exact
            replay of the run (:func:`dvemb.integrations.hf_replay.replay_trainer`; the size of the model and its
            optimizer state); None: not kept.
        **recorder_options: passed to :class:`~dvemb.Recorder` (``proj_dim``, ``layers``, ``dtype``, ...).

    Returns:
        The callback (its ``recorder`` is live during training).
    """
    dataset = trainer.train_dataset
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigError("record(trainer) needs a map-style train_dataset (with __len__ and __getitem__)")
    if id_column is not None and id_column not in dataset[0]:
        raise ConfigError(f"id_column={id_column!r} is not a column of the training set; it has {list(dataset[0])}")
    collate = trainer.data_collator
    batch_size = trainer.args.per_device_train_batch_size
    callback = DvembCallback(
        log_dir,
        dataset=dataset,
        id_column=id_column,
        text_column=text_column,
        eval_batches=_batches(trainer, trainer.eval_dataset, collate) if record_eval and trainer.eval_dataset else None,
        query_set=query_set,
        dynamics_every=dynamics_every,
        calibration_batches=(
            (lambda: list(_collated(dataset, collate, batch_size, calibration_batches, trainer)))
            if calibration_batches
            else None
        ),
        lookahead=lookahead,
        loss_fn=loss_fn,
        recorder_options=recorder_options,
        initial_dir=initial_dir,
    )
    if not isinstance(trainer.model, nn.Module):
        raise ConfigError("record(trainer) needs the Trainer's model")
    trainer.train_dataset = _Indexed(dataset)
    _keep_index_column(trainer)
    _unwrapped(trainer.model).register_forward_pre_hook(_index_taker(callback), with_kwargs=True)
    _unwrapped(trainer.model).register_forward_hook(_loss_taker(callback), with_kwargs=True)
    trainer.add_callback(callback)
    return callback


# -- helpers --------------------------------------------------------------------------------------


def _keep_index_column(trainer: Trainer) -> None:
    """Tell the Trainer's column filter (``remove_unused_columns``) to keep :data:`INDEX_KEY`."""
    trainer._set_signature_columns_if_needed()
    columns = trainer._signature_columns
    if columns is not None and INDEX_KEY not in columns:
        columns.append(INDEX_KEY)


def _index_taker(callback: DvembCallback) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        indices = kwargs.pop(INDEX_KEY, None)
        if indices is not None:
            callback.take_indices(indices)
        elif callback._step is not None and module.training and torch.is_grad_enabled():
            raise RecorderError(
                f"a training batch reached the model without {INDEX_KEY!r}: the data collator dropped it; use a "
                "collator that keeps extra integer keys (transformers' collators do), or pass ids with rec.add_ids()"
            )
        return args, kwargs

    return hook


def _loss_taker(callback: DvembCallback) -> Callable[..., None]:
    """A forward hook that keeps each training micro-batch's loss (the model computes it from its labels): the
    step's training loss is their sum when the Trainer passes ``num_items_in_batch`` (each micro-batch's loss is
    then its share of the step's token mean), else their mean (each is its own mean)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if callback._step is None or not module.training or not isinstance(loss, torch.Tensor) or loss.dim():
            return
        callback.losses.append((float(loss.detach()), kwargs.get("num_items_in_batch") is not None))

    return hook


def _batches(trainer: Trainer, dataset: Any, collate: Callable[[list[Any]], Any]) -> Callable[[], Iterator[Any]]:
    size = trainer.args.per_device_eval_batch_size

    def batches() -> Iterator[tuple[Any, torch.Tensor]]:
        return _collated(dataset, collate, size, math.ceil(len(dataset) / size), trainer)

    return batches


def _collated(
    dataset: Any, collate: Callable[[list[Any]], Any], size: int, count: int, trainer: Trainer
) -> Iterator[tuple[Any, torch.Tensor]]:
    """``count`` batches of ``dataset`` in order, collated like the Trainer's, as ``(inputs, labels)``."""
    for number in range(min(count, math.ceil(len(dataset) / size))):
        items = [dataset[i] for i in range(number * size, min(len(dataset), (number + 1) * size))]
        yield inputs_and_labels(collate(items), trainer.args.device)


def inputs_and_labels(collated: Any, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    """A collated batch as ``(model inputs, labels)`` on ``device``, without dvemb's index column."""
    batch = dict(collated)
    labels = batch.pop("labels", None)
    if labels is None:
        labels = batch.pop("label", None)
    if labels is None:
        raise ConfigError("the collated batches carry no 'labels'; dvemb needs them for query gradients")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != INDEX_KEY}
    return inputs, labels.to(device)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (``.module``), or the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(model, nn.parallel.DistributedDataParallel) and isinstance(inner, nn.Module) else model


def _refuse_sharded(args: TrainingArguments) -> None:
    if getattr(args, "fsdp", None):
        raise ConfigError(
            "dvemb cannot record an FSDP run yet (parameters are sharded across ranks, so no rank sees a layer's "
            "per-example gradient whole); train with DDP (the default under torchrun/accelerate) to record it"
        )
    if getattr(args, "deepspeed", None):
        raise ConfigError("dvemb cannot record a DeepSpeed run yet; train with DDP to record it")
