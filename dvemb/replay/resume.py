"""A replay's work directory: its checkpoints and finished adjoint segments on disk, so that a killed replay resumes.

Files (safetensors and JSON only; each written to a temporary name, then renamed):

- ``replay-work.json``: the fingerprint of the replay (the schedule's rows and rates, the options that change the
  numbers, a digest of the initial state); a directory of another replay is refused;
- ``state-<t>.safetensors``: the state entering step ``t`` (``param.<i>``, ``slot.<j>``, ``counts``) and the
  training losses of the steps before it (``losses``); ``state-final.safetensors`` after the last step;
- ``adjoint.safetensors``: after each finished segment of the backward pass, ``segment`` (its first step), the
  sensitivities (``lam.<i>``, (K, *shape)) and ``scores`` (R, K) so far.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dvemb.atomic import replacing
from dvemb.errors import ConfigError
from dvemb.replay.optimizers import OptimizerState

__all__ = ["WorkDirectory", "fingerprint"]

FINGERPRINT = "replay-work.json"
ADJOINT = "adjoint.safetensors"


def fingerprint(parts: dict[str, Any], tensors: list[torch.Tensor]) -> str:
    """sha256 of JSON ``parts`` and the bytes of ``tensors``."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with replacing(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


class WorkDirectory:
    """Checkpoints and adjoint progress of one replay.

    Args:
        directory: created if needed.
        digest: :func:`fingerprint` of the replay; a directory holding another replay's files is refused.
        on_saved: called with each file's path once it is written (a worker copies it to its storage, so that
            another machine can resume).
    """

    def __init__(self, directory: str | Path, digest: str, on_saved: Callable[[Path], None] | None = None) -> None:
        self.on_saved = on_saved
        self.path = Path(directory)
        self.path.mkdir(parents=True, exist_ok=True)
        marker = self.path / FINGERPRINT
        if marker.exists():
            found = json.loads(marker.read_text()).get("fingerprint")
            if found != digest:
                raise ConfigError(
                    f"{self.path} holds the work of another replay (other run, schedule or options); "
                    "use an empty directory"
                )
        else:
            marker.write_text(json.dumps({"format": "dvemb-replay-work", "version": 1, "fingerprint": digest}))
            self._saved(marker)

    def _saved(self, path: Path) -> None:
        if self.on_saved is not None:
            self.on_saved(path)

    def state_file(self, step: int | None) -> Path:
        """The file of the state entering ``step`` (None: after the last step)."""
        return self.path / f"state-{'final' if step is None else step}.safetensors"

    def save_state(
        self, step: int | None, params: tuple[torch.Tensor, ...], opt: OptimizerState, losses: list[float]
    ) -> None:
        """Keep a state and the training losses before it."""
        tensors = {f"param.{i}": p for i, p in enumerate(params)}
        tensors.update({f"slot.{j}": s for j, s in enumerate(opt.flat())})
        tensors["counts"] = torch.tensor(opt.counts, dtype=torch.int64)
        tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
        _save(tensors, self.state_file(step))
        self._saved(self.state_file(step))

    def load_state(
        self, step: int | None, like: tuple[tuple[torch.Tensor, ...], OptimizerState]
    ) -> tuple[tuple[torch.Tensor, ...], OptimizerState, list[float]] | None:
        """A kept state shaped like ``like`` (params, optimizer state) on its device, or None."""
        path = self.state_file(step)
        if not path.exists():
            return None
        tensors = load_file(str(path))
        params, opt = like
        loaded = tuple(tensors[f"param.{i}"].to(p.device) for i, p in enumerate(params))
        slots = [tensors[f"slot.{j}"].to(s.device) for j, s in enumerate(opt.flat())]
        counts = tuple(int(c) for c in tensors["counts"].tolist())
        return loaded, opt.with_flat(slots, counts), [float(x) for x in tensors["losses"].tolist()]

    def save_adjoint(self, segment: int, lam: list[torch.Tensor], scores: torch.Tensor) -> None:
        """Keep the backward pass after finishing the segment that starts at step ``segment``."""
        tensors = {f"lam.{i}": x for i, x in enumerate(lam)}
        tensors["segment"] = torch.tensor([segment], dtype=torch.int64)
        tensors["scores"] = scores
        _save(tensors, self.path / ADJOINT)
        self._saved(self.path / ADJOINT)

    def load_adjoint(self, count: int) -> tuple[int, list[torch.Tensor], torch.Tensor] | None:
        """``(segment, lam, scores)`` of the last finished segment (``count`` sensitivities), or None."""
        path = self.path / ADJOINT
        if not path.exists():
            return None
        tensors = load_file(str(path))
        return int(tensors["segment"][0]), [tensors[f"lam.{i}"] for i in range(count)], tensors["scores"]
