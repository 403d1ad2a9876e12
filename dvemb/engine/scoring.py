"""Streaming score aggregates: running top-k, per-example totals and per-step curves.

Scores arrive chunk by chunk (backwards in time); every aggregate here is exact whatever the
chunking, so a resumed computation equals an uninterrupted one.
"""

from __future__ import annotations

import torch

__all__ = ["RunningTopK"]


class RunningTopK:
    """The k largest values (and their row indices) per column, over all rows seen.

    Args:
        columns: number of independent columns (queries).
        k: how many to keep per column.
        largest: keep the largest (helpful) or the smallest (harmful) values.
    """

    def __init__(self, columns: int, k: int, *, largest: bool) -> None:
        self.k = k
        self.largest = largest
        fill = float("-inf") if largest else float("inf")
        self.values = torch.full((columns, 0), fill, dtype=torch.float64)  # (Q, <=k)
        self.rows = torch.zeros((columns, 0), dtype=torch.int64)  # (Q, <=k)

    def update(self, scores: torch.Tensor, rows: torch.Tensor) -> None:
        """Merge new candidates.

        Args:
            scores: (n, Q) scores of n rows.
            rows: (n,) global row index of each.
        """
        values = torch.cat([self.values, scores.T.double().cpu()], dim=1)  # (Q, m + n)
        index = torch.cat([self.rows, rows.cpu().unsqueeze(0).expand(values.shape[0], -1)], dim=1)
        keep = min(self.k, values.shape[1])
        # Ties broken towards the earlier row, so the result does not depend on the chunking.
        order = torch.argsort(index, dim=1, stable=True)
        values, index = values.gather(1, order), index.gather(1, order)
        top = torch.topk(values, keep, dim=1, largest=self.largest, sorted=True)
        self.values, self.rows = top.values, index.gather(1, top.indices)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint."""
        return {f"{prefix}.values": self.values, f"{prefix}.rows": self.rows}

    def load(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state`."""
        self.values, self.rows = tensors[f"{prefix}.values"], tensors[f"{prefix}.rows"]
