"""Composing segments of a segmented computation exactly: propagators and propagated query vectors.

Training steps ``0..T-1`` are split at boundaries ``b_0 = 0 < b_1 < ... < b_K = T``. Segment ``j`` runs
the backward recursion over its steps alone, starting from the identity, and so yields *local*
embeddings (the influence of its rows on the checkpoint ``theta_{b_{j+1}}``) and its final state.

The recursion is linear in its state. For SGD the state is ``R = s (I - M)`` and the global
embedding of a row of segment ``j`` is ``P_{K-1} ... P_{j+1} e_local`` with ``P_k`` segment ``k``'s
final ``R``. For momentum and Adam the state has several slots (``R^theta``, ``R^m`` and, when a
layer carries Adam's second-moment term, ``R^v``); a segment then runs once per slot, seeded with
the identity in that slot (:class:`dvemb.engine.embedder.Embedder` with ``seeded=True``), and the
global embedding is ``sum_k R^k_b e^(k)`` with ``R^k_b`` the global state's slot ``k`` at the
segment's end. Rather than multiplying every embedding, a *query state* ``q R`` (one row vector per
slot and query) is carried backwards through the segments (:meth:`QueryState.propagate`) and each
segment's local embeddings are scored against it (:meth:`QueryState.score`). Started from the
identity, the same query state rebuilds full embeddings.

Matrices are stored transposed, as the recursions keep them (``stored = R^T``), so ``q R = q @ stored.mT``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvemb.engine.embedder import OPTIMIZER_SLOTS, Embedder

__all__ = ["QueryState", "SegmentPropagator", "propagator_from_state"]


@dataclass
class SegmentPropagator:
    """One segment's propagator for one layer group.

    Attributes:
        slots: [seed][slot] (G, d, d) transposed state matrices ``R^T`` of the seed's recursion (unscaled).
        log_scale: [seed] (G,) float64 log of each seed recursion's scale.
    """

    slots: list[list[torch.Tensor]]
    log_scale: list[torch.Tensor]


def propagator_from_state(embedder: Embedder, state: dict[str, torch.Tensor]) -> list[SegmentPropagator]:
    """Per group, the propagator held in a seeded embedder's saved ``state`` (see :meth:`Embedder.state`)."""
    out = []
    for g, group in enumerate(embedder.groups):
        slots, scales = [], []
        for seed in range(len(group.recursions)):
            suffix = f".{g}" if seed == 0 else f".{g}.{seed}"
            scales.append(state[f"log_scale{suffix}"].double().cpu())
            if embedder.optimizer_exact:
                slots.append([state[f"{name}{suffix}"] for name in OPTIMIZER_SLOTS[: embedder.num_seeds]])
            else:  # R = s (I - M), stored transposed: I - M^T
                mt = state[f"Mt{suffix}"]
                slots.append([torch.eye(mt.shape[-1], dtype=mt.dtype) - mt])
        out.append(SegmentPropagator(slots, scales))
    return out


class QueryState:
    """Row vectors ``q R`` of every query, per layer group and state slot, carried backwards over segments.

    Args:
        embedder: the (seeded) embedder whose groups and offsets the vectors follow.
        queries: (Q, D) query gradients at the checkpoint where propagation starts (D concatenated).
    """

    def __init__(self, embedder: Embedder, queries: torch.Tensor) -> None:
        self.embedder = embedder
        self.vectors: list[torch.Tensor] = []  # per group: (S, G, Q, d)
        self.log_scale: list[torch.Tensor] = []  # per group: (G,) float64
        dtype, device = embedder.dtype, embedder.device
        for group in embedder.groups:
            per_layer = self._split(queries.to(device, dtype), group.layers)  # (G, Q, d)
            vectors = torch.zeros(embedder.num_seeds, *per_layer.shape, dtype=dtype, device=device)
            vectors[0] = per_layer  # at the checkpoint R^theta = I and the other slots are zero
            self.vectors.append(vectors)
            self.log_scale.append(torch.zeros(per_layer.shape[0], dtype=torch.float64))

    @classmethod
    def identity(cls, embedder: Embedder) -> QueryState:
        """The state whose vectors are the identity of each layer block: :meth:`rebuild` gives full embeddings."""
        state = cls(embedder, torch.zeros(0, embedder.total_dim))
        for g, group in enumerate(embedder.groups):
            eye = torch.eye(group.dim, dtype=embedder.dtype, device=embedder.device)
            vectors = torch.zeros(embedder.num_seeds, len(group.recursions[0].log_scale), group.dim, group.dim)
            vectors[0] = eye
            state.vectors[g] = vectors.to(embedder.device, embedder.dtype)
        return state

    def rebuild(self, local: torch.Tensor) -> torch.Tensor:
        """Full embeddings ``sum_k R^k e^(k)`` of rows, for a state made by :meth:`identity`.

        Args:
            local: (S, n, D) local embeddings of one segment's rows, one per seed.

        Returns:
            (n, D) embeddings on the CPU, in the embedder's dtype.
        """
        out = torch.empty(local.shape[1], self.embedder.total_dim, dtype=self.embedder.dtype)
        for group, vectors, log_scale in zip(self.embedder.groups, self.vectors, self.log_scale, strict=True):
            rows = torch.stack([self._split(local[k].to(vectors), group.layers) for k in range(vectors.shape[0])])
            part = torch.einsum("sgnd,sged->gne", rows, vectors)  # (G, n, d)
            part = part * torch.exp(log_scale).to(part).view(-1, 1, 1)
            if self.embedder.blocks == "full":
                out.copy_(part[0].cpu())
            else:
                for position, layer in enumerate(group.layers):
                    out[:, self.embedder.offsets[layer] : self.embedder.offsets[layer + 1]] = part[position].cpu()
        return out

    def _split(self, rows: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """(n, D) concatenated rows -> (G, n, d) for a group's layers."""
        if self.embedder.blocks == "full":
            return rows.unsqueeze(0)
        offsets = self.embedder.offsets
        return torch.stack([rows[..., offsets[i] : offsets[i + 1]] for i in layers])

    def score(self, local: torch.Tensor) -> torch.Tensor:
        """Scores of rows against the propagated queries.

        Args:
            local: (S, n, D) local embeddings of one segment's rows, one per seed.

        Returns:
            (n, Q) float64 scores ``q . (sum_k R^k e^(k))``.
        """
        total: torch.Tensor | None = None
        for group, vectors, log_scale in zip(self.embedder.groups, self.vectors, self.log_scale, strict=True):
            rows = torch.stack([self._split(local[k].to(vectors), group.layers) for k in range(vectors.shape[0])])
            part = torch.einsum("sgnd,sgqd->gnq", rows, vectors).double()  # (G, n, Q)
            part = (part * torch.exp(log_scale).to(part.device).view(-1, 1, 1)).sum(0)
            total = part if total is None else total + part
        assert total is not None
        return total.cpu()

    def propagate(self, propagators: list[SegmentPropagator]) -> None:
        """Carry the vectors back over one segment: ``q_slot' <- sum_k q_k R^{slot'}(seed k)``."""
        for g, prop in enumerate(propagators):
            vectors = self.vectors[g]  # (S, G, Q, d)
            scales = torch.stack(prop.log_scale)  # (S, G)
            peak = scales.amax(0)  # (G,)
            new = torch.zeros_like(vectors)
            for k in range(vectors.shape[0]):
                weight = torch.exp(scales[k] - peak).to(vectors).view(-1, 1, 1)  # (G, 1, 1)
                for slot in range(vectors.shape[0]):
                    matrix = prop.slots[k][slot].to(vectors)  # (G, d, d) R^T
                    new[slot] += weight * (vectors[k] @ matrix.mT)
            size = new.abs().amax(dim=(0, 2, 3)).double().cpu()  # (G,)
            size = torch.where(size > 0, size, torch.ones_like(size))
            self.vectors[g] = new / size.to(new).view(1, -1, 1, 1)
            self.log_scale[g] = self.log_scale[g] + peak + torch.log(size)
