"""Query recording: the projected gradients of a named query set at the current model (``rec.record_queries``).

Each query batch runs through the model in eval mode with the layer hooks capturing forward factors and the
outputs' gradient edges; one backward of the summed per-example losses to those edges gives every layer's output
gradients, combined with the forward factors into (B, d) rows (:meth:`LayerHooks.rows_of_one`), in the bases of
the training rows. Parameters' ``.grad`` are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from dvemb import logformat as fmt
from dvemb.errors import ConfigError
from dvemb.recording.batches import LossFn, default_loss, model_outputs
from dvemb.recording.hooks import LayerHooks
from dvemb.recording.ids import as_id_list
from dvemb.recording.layer_set import LayerSet
from dvemb.recording.modes import Capture
from dvemb.writer import LogWriter

__all__ = ["QueryRecorder"]


class QueryRecorder:
    """Records query sets into the log.

    Args:
        model: the model.
        layers: the recorded layers (rows of tied partners are added to their owner's).
        hooks: the layer hooks that capture the query passes.
        writer: the log writer.
    """

    def __init__(self, model: nn.Module, layers: LayerSet, hooks: LayerHooks, writer: LogWriter) -> None:
        self.model = model
        self.layers = layers
        self.hooks = hooks
        self.writer = writer

    def record(
        self,
        name: str,
        batches: Iterable[Sequence[Any]],
        *,
        loss_fn: LossFn | None,
        texts: Sequence[str] | None,
        step: int,
    ) -> int:
        """Record the query set ``name`` from ``(inputs, targets[, ids])`` batches at step ``step``; returns the
        number of queries (``Recorder.record_queries`` checks the name and documents the arguments)."""
        parts, ids, labels, losses = self._pass(batches, loss_fn or default_loss)
        if not ids:
            raise ConfigError(f"query set {name!r} is empty")
        if texts is not None and len(texts) != len(ids):
            raise ConfigError(f"{len(texts)} texts for {len(ids)} queries in query set {name!r}")
        merged = self.layers.merged(dict(enumerate(torch.cat(p) for p in parts)))  # (N, d) per logged layer
        tensors = {fmt.grad_key(layer): rows for layer, rows in merged.items()}
        tensors.update(fmt.encode_ids(ids), loss=torch.cat(losses))
        if len(labels) and sum(len(lab) for lab in labels) == len(ids):
            tensors["labels"] = torch.cat(labels)
        info = {"num_queries": len(ids), "step": step, "texts": list(texts) if texts is not None else None}
        self.writer.write_query_set(name, tensors, info)
        return len(ids)

    def _pass(
        self, batches: Iterable[Sequence[Any]], loss_fn: LossFn
    ) -> tuple[list[list[torch.Tensor]], list[Any], list[torch.Tensor], list[torch.Tensor]]:
        """Per adapter its (B, d) rows of every batch; the ids, integer labels and (B,) float64 losses."""
        parts: list[list[torch.Tensor]] = [[] for _ in self.layers.adapters]
        ids: list[Any] = []
        labels: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                inputs, targets = batch[0], batch[1]
                batch_ids = as_id_list(batch[2]) if len(batch) > 2 else list(range(len(ids), len(ids) + len(targets)))
                self.hooks.begin(Capture.QUERY)
                with torch.enable_grad():
                    per_example = loss_fn(model_outputs(self.model, inputs), targets)  # (B,)
                    slot_of, outputs = self.hooks.latest_outputs("record_queries()")
                    grads = torch.autograd.grad(per_example.sum(), outputs, allow_unused=True)
                for index, rows in enumerate(self.hooks.rows_of_one(slot_of, grads)):
                    parts[index].append(rows.detach())
                self.hooks.end()
                ids.extend(batch_ids)
                losses.append(per_example.detach().double().cpu())
                if targets.dim() == 1 and not targets.is_floating_point():
                    labels.append(targets.detach().cpu().long())
        finally:
            self.hooks.end()
            self.model.train(was_training)
        return parts, ids, labels, losses
